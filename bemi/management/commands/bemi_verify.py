"""``python manage.py bemi_verify [--head HEX] [--json]``: is the stored history as the worker wrote it?"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import router

from bemi import verify
from bemi.management.commands.bemi_worker import dsn_for_alias


class Command(BaseCommand):
    help = ("Recompute the chain of stored changes (each carries sha256 of the previous link and its own "
            "content, computed by the worker) and compare it with the stored links. Exit status 0 when intact; "
            "1 when a change was altered, removed or inserted after the fact (naming the first one where the "
            "chain breaks); 2 when it cannot check. See docs/security.md.")
    requires_system_checks: list = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--database", default=None,
                            help="alias of the database holding changes (default: where BemiChange is written)")
        verify.add_verify_arguments(parser)

    def handle(self, *args, **options) -> None:
        from bemi.models import BemiChange

        alias = options["database"] or router.db_for_write(BemiChange) or "default"

        class Opts:
            pass

        opts = Opts()
        for key in ("head", "json", "source_database"):
            setattr(opts, key, options[key])
        code = verify.run(dsn_for_alias(alias), opts, self.stdout, self.stderr)
        if code == verify.EXIT_BROKEN:
            raise CommandError("the chain is broken (see above)", returncode=code)
        if code:
            raise CommandError("could not verify the chain (see above)", returncode=code)
