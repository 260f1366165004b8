"""``bemi-worker``: the change-tracking worker, configured like the published Docker image.

Does not import Django: it runs next to any application.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from psycopg.conninfo import make_conninfo

from bemi.cli_nats import add_publish_argument, add_stream_arguments, stream_settings
from bemi.worker.partitions import DEFAULT_INTERVAL, INTERVALS, parse_retention
from bemi.worker.runner import Config, configure_logging, main_loop

DESCRIPTION = """\
Read the logical replication slot of a PostgreSQL database (pgoutput) and
write one row per changed row into the `changes` table, with the application
context the bemi Django app put in the write-ahead log. Exactly once: killed
at any moment, it loses and duplicates nothing.

Source database (the one to track): --dsn, or the environment variables
DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD (libpq PG* variables fill the rest).
Destination (where `changes` is written): --destination-dsn, or DESTINATION_DB_HOST,
DESTINATION_DB_PORT, DESTINATION_DB_NAME, DESTINATION_DB_USER, DESTINATION_DB_PASSWORD;
by default the source database itself.

What is tracked (docs/tracking.md): BEMI_SCHEMAS, BEMI_IGNORED_TABLES,
BEMI_IGNORED_COLUMNS, BEMI_MASKED_COLUMNS, BEMI_UNSAFE_TRACK_BUILTINS,
BEMI_SKIP_UNCHANGED_UPDATES, BEMI_MASKING_KEY, or the flags below; without any,
the settings `migrate bemi` stored from Django's.

On first start it creates what is missing and says so: the publication
(the tracked tables, see "what is tracked" below; new tables join it as they appear),
the replication slot, the `changes` table with its indexes, and its checkpoint
table `_bemi_worker_checkpoints`. It never drops or recreates a slot.
"""

EPILOG = """\
`bemi-worker status` (see `bemi-worker status --help`) tells whether tracking works:
slot, retained WAL, lag, worker, tables; exit status 0 when healthy.
`bemi-worker ingest --from nats://HOST:PORT` stores what `bemi-worker --publish
nats://HOST:PORT` published (see `bemi-worker ingest --help`, docs/scale-out.md).
`bemi-worker verify` (see `bemi-worker verify --help`) checks the chain of stored
changes: exit status 0 when intact, 1 when tampered with, 2 when it cannot check.

exit status: 0 done (--once, or stopped by SIGINT/SIGTERM after committing the batch
in hand); 1 unexpected database error in a --once run; 2 something to fix
(privileges, missing or invalidated slot, wal_level, configuration); 3 another
worker is reading the same slot (without --standby). A lost connection or a
server restart is not an exit: the worker logs, backs off and resumes.

The role needs the REPLICATION attribute (or superuser), CREATE on the source
database the first time (for the publication), ownership of the tracked tables
(to add them to the publication) and CREATE on the destination's public schema.
"""


def _dsn_from_env(prefix: str) -> str | None:
    names = {"host": "HOST", "port": "PORT", "dbname": "NAME", "user": "USER", "password": "PASSWORD"}
    params = {key: os.environ[prefix + env] for key, env in names.items() if os.environ.get(prefix + env)}
    return make_conninfo(**params) if params else None


def _add_dsn_arguments(parser) -> None:
    """``--dsn`` and ``--destination-dsn``: the same for the worker, ``status`` and ``verify``."""
    parser.add_argument("--dsn", help="libpq connection string of the source database (overrides DB_*)")
    parser.add_argument("--destination-dsn",
                        help="libpq connection string of the destination (overrides DESTINATION_DB_*)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bemi-worker", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_worker_arguments(parser)
    _add_dsn_arguments(parser)
    parser.add_argument("-v", "--verbosity", type=int, default=1, choices=[0, 1, 2],
                        help="0: warnings only, 1: one line per batch (default), 2: debug")
    return parser


def add_name_arguments(parser, names_from_settings: bool = False) -> None:
    """``--slot`` and ``--publication``; with ``names_from_settings`` (manage.py) they default to None,
    which the command reads as ``BEMI_SLOT`` / ``BEMI_PUBLICATION`` (bemi.conf), else bemi."""
    for flag, what in (("slot", "replication slot name"), ("publication", "publication name")):
        if names_from_settings:
            parser.add_argument(f"--{flag}", default=None,
                                help=f"{what} (default: the setting BEMI_{flag.upper()}, else bemi)")
        else:
            parser.add_argument(f"--{flag}", default="bemi", help=f"{what} (default: bemi)")


def add_worker_arguments(parser, names_from_settings: bool = False) -> None:
    """The options shared with ``python manage.py bemi_worker``."""
    parser.add_argument("--once", action="store_true",
                        help="drain what the slot holds now, then exit 0 (for tests, cron, demos)")
    add_name_arguments(parser, names_from_settings)
    parser.add_argument("--batch-rows", type=int, default=10_000,
                        help="commit the destination after about this many changes (default: 10000)")
    parser.add_argument("--standby", action="store_true",
                        help="wait while another worker reads the slot, and take over when it stops or dies")
    parser.add_argument("--poll-interval", type=float, default=0.1,
                        help="longest wait for the replication stream before looking around (default: 0.1)")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0,
                        help="seconds between status updates to the server when idle (default: 10)")
    parser.add_argument("--takeover", action="store_true",
                        help="taking over from the published Docker worker (e.g. --slot bemi_local --publication "
                             "dbz_publication): do not store again the changes it stored (docs/upgrading.md)")
    parser.add_argument("--takeover-memory", type=int, default=64, metavar="MIB",
                        help="with --takeover: memory for the keys of the changes it stored (default: 64 MiB, "
                             "20 bytes per change)")
    parser.add_argument("--decoding-memory", type=int, default=Config.decoding_memory_mb, metavar="MIB",
                        help=f"logical_decoding_work_mem of the worker's walsender (default: "
                             f"{Config.decoding_memory_mb} MiB; 0: the "
                             "server's setting): a larger transaction is streamed to the worker before it commits "
                             "and kept in a temporary file until it does")
    parser.add_argument("--partition-interval", choices=INTERVALS, default=None,
                        help="one partition of changes per day, week or month of committed_at "
                             "(default: month; BEMI_PARTITION_INTERVAL with manage.py)")
    parser.add_argument("--retention", default=None, metavar="DAYS",
                        help="drop partitions of changes older than this many days, at most once an hour "
                             "(default: keep everything; BEMI_RETENTION with manage.py)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics and a health probe at /healthz "
                             "(200 while streaming, else 503); needs pip install prometheus_client")
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                        help="address for --metrics-port (default: 127.0.0.1; 0.0.0.0 for every interface)")
    # Benchmarks only (bench/ingest.py): changes stored without links fail bemi_verify.
    parser.add_argument("--no-chain", action="store_true", help=argparse.SUPPRESS)
    add_publish_argument(parser)
    add_stream_arguments(parser)
    add_tracking_arguments(parser)


# -- what is tracked (bemi/tracking.py, docs/tracking.md) -----------------------------------------

_TRACKING_FLAGS = (  # (option, environment variable, help)
    ("--schemas", "BEMI_SCHEMAS", "schemas whose tables are tracked (default: public)"),
    ("--ignored-tables", "BEMI_IGNORED_TABLES", "tables never tracked, added to the built-in django_session"),
    ("--ignored-columns", "BEMI_IGNORED_COLUMNS",
     "table.column patterns: an UPDATE that changed only these is not recorded"),
    ("--masked-columns", "BEMI_MASKED_COLUMNS",
     "table.column patterns whose values are stored as a keyed digest, added to the built-ins "
     "(auth_user.password, the tokens of popular packages: docs/tracking.md)"),
    ("--unsafe-track-builtins", "BEMI_UNSAFE_TRACK_BUILTINS",
     "built-ins to track anyway (django_session, auth_user.password, authtoken_token.key...): they hold credentials"),
)


def add_tracking_arguments(parser) -> None:
    """What is tracked: comma-separated shell-style patterns, or the BEMI_* environment variables.

    Without any of them the worker uses what `migrate bemi` stored from the Django settings
    (or the defaults). Changes take effect on the worker's next start.
    """
    group = parser.add_argument_group(
        "what is tracked", "comma-separated patterns (table, schema.table; table.column, schema.table.column); "
        "each flag defaults to its environment variable. Without any, the settings `migrate bemi` stored are used.")
    for flag, env, text in _TRACKING_FLAGS:
        group.add_argument(flag, default=None, metavar="PATTERNS", help=f"{text} [env {env}]")
    group.add_argument("--skip-unchanged-updates", action="store_const", const=True, default=None,
                       help="do not record updates that change nothing [env BEMI_SKIP_UNCHANGED_UPDATES=1]")
    group.add_argument("--masking-key", default=None,
                       help="secret the masking digest is keyed with; prefer the environment variable "
                            "[env BEMI_MASKING_KEY] (default: SECRET_KEY with manage.py bemi_worker, else a random "
                            "key the worker keeps in the source database)")


def tracking_from_options(options, environ=os.environ):
    """``(Tracking or None, masking key or None)`` from the flags and environment variables.

    None: nothing given, use what the database stores. Raises TrackingError naming the flag's setting.
    """
    from bemi.tracking import Tracking, TrackingError, split_env

    values: dict[str, Any] = {}
    for flag, env, _text in _TRACKING_FLAGS:
        attr = flag[2:].replace("-", "_")
        given = getattr(options, attr, None)
        value = given if given is not None else environ.get(env)
        if value is not None:
            values[attr] = split_env(value)
    skip = getattr(options, "skip_unchanged_updates", None)
    if skip is None and environ.get("BEMI_SKIP_UNCHANGED_UPDATES") is not None:
        raw = environ["BEMI_SKIP_UNCHANGED_UPDATES"].strip().lower()
        if raw not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
            raise TrackingError("BEMI_SKIP_UNCHANGED_UPDATES", f"must be 1 or 0, not {raw!r}")
        skip = raw in ("1", "true", "yes", "on")
    if skip is not None:
        values["skip_unchanged_updates"] = skip
    key = getattr(options, "masking_key", None) or environ.get("BEMI_MASKING_KEY") or None
    return (Tracking.build(**values) if values else None), key


def config_from_options(options, source_dsn: str, destination_dsn: str | None, tracking=None,
                        masking_key: str | None = None) -> Config:
    if tracking is None and masking_key is None:
        tracking, masking_key = tracking_from_options(options)
    return Config(
        source_dsn=source_dsn,
        destination_dsn=destination_dsn,
        slot=options.slot,
        publication=options.publication,
        once=options.once,
        standby=getattr(options, "standby", False),
        batch_rows=max(1, options.batch_rows),
        poll_interval=options.poll_interval,
        heartbeat_interval=options.heartbeat_interval,
        takeover=options.takeover,
        takeover_max_bytes=max(1, options.takeover_memory) * 1024 * 1024,
        decoding_memory_mb=max(0, getattr(options, "decoding_memory", Config.decoding_memory_mb)),
        partition_interval=getattr(options, "partition_interval", None) or DEFAULT_INTERVAL,
        retention=parse_retention(getattr(options, "retention", None)),
        metrics_port=getattr(options, "metrics_port", None),
        metrics_host=getattr(options, "metrics_host", "127.0.0.1"),
        tracking=tracking,
        masking_key=masking_key,
        chain=not getattr(options, "no_chain", False),
        publish=stream_settings(options, options.publish) if getattr(options, "publish", None) else None,
    )


def build_status_parser() -> argparse.ArgumentParser:
    from bemi.status import STATUS_EPILOG, add_status_arguments

    parser = argparse.ArgumentParser(
        prog="bemi-worker status", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=STATUS_EPILOG,
        description="Is change tracking working? The slot (and who reads it), the WAL it retains, the "
                    "publication and the tracked tables, the worker's checkpoint, the lag, dead letters and "
                    "warnings; exit status 0 when healthy. Source and destination as for bemi-worker.",
    )
    add_name_arguments(parser)
    add_status_arguments(parser)
    _add_dsn_arguments(parser)
    return parser


def status_main(argv: list[str]) -> int:
    from bemi import status

    options = build_status_parser().parse_args(argv)
    source = options.dsn or _dsn_from_env("DB_") or ""
    destination = options.destination_dsn or _dsn_from_env("DESTINATION_DB_")
    return status.run(source, destination, options, sys.stdout, sys.stderr)


def build_verify_parser() -> argparse.ArgumentParser:
    from bemi.verify import add_verify_arguments

    parser = argparse.ArgumentParser(
        prog="bemi-worker verify",
        description="Recompute the chain of stored changes and compare it with the stored links: exit 0 when "
                    "intact, 1 when a change was altered, removed or inserted after the fact, 2 when it cannot "
                    "check. Reads the destination (DESTINATION_DB_*, else DB_*). See docs/security.md.")
    add_verify_arguments(parser)
    _add_dsn_arguments(parser)
    return parser


def verify_main(argv: list[str]) -> int:
    from bemi import verify

    options = build_verify_parser().parse_args(argv)
    dsn = (options.destination_dsn or _dsn_from_env("DESTINATION_DB_") or options.dsn or _dsn_from_env("DB_")
           or "")
    return verify.run(dsn, options, sys.stdout, sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    if argv[:1] == ["ingest"]:
        from bemi.cli_nats import ingest_main

        return ingest_main(argv[1:])
    parser = build_parser()
    options = parser.parse_args(argv)
    try:
        parse_retention(options.retention)
    except ValueError as exc:
        parser.error(str(exc))
    if options.publish and options.takeover:
        parser.error("--takeover stores what the published worker did not: not with --publish")
    configure_logging(options.verbosity)
    from bemi.tracking import TrackingError

    try:
        tracking, masking_key = tracking_from_options(options)
    except TrackingError as exc:
        parser.exit(2, f"bemi-worker: error: {exc}\n")
    source = options.dsn or _dsn_from_env("DB_") or ""
    destination = options.destination_dsn or _dsn_from_env("DESTINATION_DB_")
    return main_loop(config_from_options(options, source, destination, tracking, masking_key))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
