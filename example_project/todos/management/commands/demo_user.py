"""Create (or reset) the user the demo logs in as, so changes carry a user_id."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create or reset the demo user (username and password given as arguments)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username", nargs="?", default="demo")
        parser.add_argument("password", nargs="?", default="demo")

    def handle(self, username: str, password: str, **options) -> None:
        user, _ = get_user_model().objects.get_or_create(username=username)
        user.set_password(password)
        user.save()
        self.stdout.write(f"user {username} (id {user.pk})")
