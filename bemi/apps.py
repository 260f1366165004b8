"""The ``bemi`` Django app."""

from django.apps import AppConfig


class BemiConfig(AppConfig):
    name = "bemi"
    label = "bemi"
    verbose_name = "Bemi audit trail"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from bemi import checks  # noqa: F401  (registers the system checks)
        from bemi.wrapper import install_execute_wrapper

        install_execute_wrapper()
        from django.db.models.signals import post_migrate

        from bemi.installer import sync_tracking

        post_migrate.connect(sync_tracking, sender=self, dispatch_uid="bemi.sync_tracking")
