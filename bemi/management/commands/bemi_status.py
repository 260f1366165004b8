"""``python manage.py bemi_status``: is change tracking working? (``bemi-worker status`` in Django)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from bemi import status
from bemi.cli import add_name_arguments
from bemi.management.commands.bemi_worker import slot_and_publication, source_and_destination


class Command(BaseCommand):
    help = ("Is change tracking working? The slot (and who reads it), the WAL it retains, the publication and "
            "the tracked tables, the worker's checkpoint, the lag, dead letters and warnings. Exit status 0 "
            "when healthy, 1 when not, 2 when it cannot tell. Source: the --database alias (default 'default'); "
            "destination: the alias 'bemi' when DATABASES has one. See docs/operations.md.")
    requires_system_checks: list = []  # a probe: answer fast, and also when checks would complain

    def add_arguments(self, parser) -> None:
        parser.add_argument("--database", default="default", help="alias of the tracked database (default: default)")
        add_name_arguments(parser, names_from_settings=True)
        status.add_status_arguments(parser)

    def handle(self, *args, **options) -> None:
        source, destination = source_and_destination(options["database"])

        class Opts:
            pass

        opts = Opts()
        options["slot"], options["publication"] = slot_and_publication(options["database"], options)
        for key in ("slot", "publication", "json", "max_lag_seconds", "max_retained_bytes", "nats", "nats_stream",
                    "nats_consumer"):
            setattr(opts, key, options[key])
        code = status.run(source, destination, opts, self.stdout, self.stderr)
        if code == status.EXIT_UNHEALTHY:
            raise CommandError("bemi is unhealthy (see problems above)", returncode=code)
        if code:
            raise CommandError("could not read the status (see above)", returncode=code)
