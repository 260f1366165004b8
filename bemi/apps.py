"""The ``bemi`` Django app."""

from django.apps import AppConfig


class BemiConfig(AppConfig):
    name = "bemi"
    label = "bemi"
    verbose_name = "Bemi audit trail"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        pass
