"""``python manage.py bemi_worker``: the change-tracking worker for this project's database."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from psycopg.conninfo import make_conninfo

from bemi import conf
from bemi.cli_nats import add_ingest_arguments, ingest_config
from bemi.cli import DESCRIPTION, add_worker_arguments, config_from_options, tracking_from_options
from bemi.tracking import TrackingError
from bemi.worker.partitions import parse_retention
from bemi.worker.runner import configure_logging, main_loop

# OPTIONS keys that Django's PostgreSQL backend consumes itself (not libpq parameters).
_DJANGO_ONLY_OPTIONS = {"isolation_level", "server_side_binding", "pool", "assume_role", "cursor_factory",
                        "prepare_threshold", "context"}


def dsn_for_alias(alias: str) -> str:
    settings = connections[alias].settings_dict
    if settings["ENGINE"] not in ("django.db.backends.postgresql", "django.contrib.gis.db.backends.postgis"):
        raise CommandError(f"database {alias!r} is not PostgreSQL")
    params = {
        "host": settings.get("HOST") or None,
        "port": str(settings["PORT"]) if settings.get("PORT") else None,
        "dbname": settings.get("NAME") or None,
        "user": settings.get("USER") or None,
        "password": settings.get("PASSWORD") or None,
    }
    for key, value in (settings.get("OPTIONS") or {}).items():
        if key not in _DJANGO_ONLY_OPTIONS and isinstance(value, (str, int)):
            params[key] = str(value)
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def slot_and_publication(alias: str, options: dict) -> tuple[str, str]:
    """The slot and publication of the database ``alias``: the flags, else the settings (bemi.conf)."""
    try:
        return options.get("slot") or conf.slot(alias), options.get("publication") or conf.publication(alias)
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from exc


def source_and_destination(alias: str) -> tuple[str, str | None]:
    """The DSNs of the tracked database ``alias`` and of where ``changes`` is written: the alias
    ``bemi`` when DATABASES has one (BemiDatabaseRouter), else None (the source itself)."""
    if alias not in connections.settings:
        raise CommandError(f"no database alias {alias!r} in DATABASES")
    destination = dsn_for_alias("bemi") if "bemi" in connections.settings and alias != "bemi" else None
    return dsn_for_alias(alias), destination


class Command(BaseCommand):
    help = DESCRIPTION.split("\n\n")[0].replace("\n", " ") + (
        " Source: the --database alias (default 'default'). Destination: the alias 'bemi' when "
        "DATABASES has one, else the source database."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("mode", nargs="?", choices=["ingest"], default=None,
                            help="ingest: store what readers published to NATS JetStream (--from; docs/scale-out.md)")
        parser.add_argument("--database", default="default", help="alias of the database to track (default: default)")
        add_worker_arguments(parser, names_from_settings=True)
        add_ingest_arguments(parser)

    def handle(self, *args, **options) -> None:
        configure_logging(options["verbosity"])
        source, destination = source_and_destination(options["database"])

        class Opts:
            partition_interval: str
            retention: object

        opts = Opts()
        options["slot"], options["publication"] = slot_and_publication(options["database"], options)
        for key in ("once", "standby", "slot", "publication", "batch_rows", "poll_interval", "heartbeat_interval",
                    "takeover", "takeover_memory", "metrics_port", "metrics_host", "publish", "stream",
                    "subject_prefix", "stream_max_age", "stream_max_bytes", "duplicate_window", "consumer",
                    "ingest_batch", "ack_wait"):
            setattr(opts, key, options[key])
        try:  # --partition-interval / --retention, else BEMI_PARTITION_INTERVAL / BEMI_RETENTION
            opts.partition_interval = options["partition_interval"] or conf.partition_interval()
            opts.retention = options["retention"] if options["retention"] is not None else conf.retention()
            parse_retention(opts.retention)
        except (ValueError, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc
        if options["mode"] == "ingest":
            if not options["nats_from"]:
                raise CommandError("manage.py bemi_worker ingest needs --from nats://HOST:PORT")
            from bemi.worker.ingest import main_loop as ingest_loop

            code = ingest_loop(ingest_config(opts, options["nats_from"], destination or source))
            if code:
                raise CommandError(f"bemi ingester stopped with exit status {code} (see the log above)",
                                   returncode=code)
            return
        if options["publish"] and options["takeover"]:
            raise CommandError("--takeover stores what the published worker did not: not with --publish")
        for key in ("schemas", "ignored_tables", "ignored_columns", "masked_columns", "unsafe_track_builtins",
                    "skip_unchanged_updates", "masking_key"):
            setattr(opts, key, options.get(key))
        try:
            tracking, masking_key = tracking_from_options(opts)
            if tracking is None:  # no flag and no BEMI_* variable: the Django settings
                tracking = conf.tracking()
            masking_key = masking_key or conf.masking_secret()
        except TrackingError as exc:
            raise CommandError(str(exc)) from exc
        code = main_loop(config_from_options(opts, source, destination, tracking, masking_key))
        if code:
            raise CommandError(f"bemi worker stopped with exit status {code} (see the log above)", returncode=code)
