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
