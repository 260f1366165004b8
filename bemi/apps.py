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
        from django.db.models.signals import post_migrate, pre_migrate

        from bemi.installer import forget_installs, sync_tracking

        pre_migrate.connect(forget_installs, sender=self, dispatch_uid="bemi.forget_installs")
        post_migrate.connect(sync_tracking, sender=self, dispatch_uid="bemi.sync_tracking")
