"""The command line shared by ``bemi-worker status`` and ``manage.py bemi_status``: options, exit
status, and which of the two outputs is printed."""

from __future__ import annotations

import psycopg

from bemi.status.collector import collect
from bemi.status.health import DEFAULT_MAX_LAG_SECONDS, DEFAULT_MAX_RETAINED_BYTES
from bemi.status.report import EXIT_ERROR
from bemi.status.session import connect
from bemi.status.sizes import parse_bytes
from bemi.status.text import render_text


def add_status_arguments(parser) -> None:
    """The options after ``--slot`` and ``--publication`` (``bemi.cli.add_name_arguments``)."""
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of the screen")
    parser.add_argument("--max-lag-seconds", type=float, default=DEFAULT_MAX_LAG_SECONDS,
                        help="unhealthy when no worker runs and a change has waited longer than this "
                             f"(default: {DEFAULT_MAX_LAG_SECONDS:g})")
    parser.add_argument("--max-retained-bytes", type=parse_bytes, default=DEFAULT_MAX_RETAINED_BYTES,
                        help="unhealthy when the slot retains more WAL than this; units kB, MB, GB, TB; "
                             "0: never (default: 1GB)")
    parser.add_argument("--nats", default=None, metavar="nats://HOST:PORT",
                        help="scale-out (docs/scale-out.md): also the NATS JetStream stream and the ingesters' "
                             "consumer and lag; unhealthy when NATS cannot be reached or the stream is missing")
    parser.add_argument("--nats-stream", default="BEMI", help="with --nats: the stream (default: BEMI)")
    parser.add_argument("--nats-consumer", default="bemi_ingest",
                        help="with --nats: the ingesters' consumer (default: bemi_ingest)")


STATUS_EPILOG = """\
exit status: 0 healthy; 1 unhealthy (slot missing or lost, retained WAL above
--max-retained-bytes, or no worker running and a change waiting longer than
--max-lag-seconds); 2 the status could not be read (connection, privileges).
Warnings (max_slot_wal_keep_size = -1, wal_status extended/unreserved, tables
without trigger, publication or REPLICA IDENTITY FULL, dead letters) do not
change the exit status. See docs/operations.md.
"""


def with_nats(status, source: psycopg.Connection, options):
    """The status with its NATS part (bemi/status/nats.py) and what it finds wrong."""
    from dataclasses import replace

    from bemi.status.nats import judge_nats, read_nats

    found = read_nats(options.nats, options.nats_stream, options.nats_consumer, source, options.slot)
    problems, warnings = judge_nats(found)
    return replace(status, nats=found.as_dict(), problems=status.problems + problems,
                   warnings=status.warnings + warnings, healthy=status.healthy and not problems)


def run(source_dsn: str, destination_dsn: str | None, options, out, err) -> int:
    """Collect, print (screen or JSON), return the exit status."""
    try:
        source = connect(source_dsn)
    except psycopg.Error as exc:
        err.write(f"bemi status: cannot connect to the source database: {exc}".strip() + "\n")
        return EXIT_ERROR
    destination = None
    try:
        if destination_dsn:
            try:
                destination = connect(destination_dsn)
            except psycopg.Error as exc:
                err.write(f"bemi status: cannot connect to the destination database: {exc}".strip() + "\n")
                return EXIT_ERROR
        try:
            status = collect(source, destination, slot=options.slot, publication=options.publication,
                             max_lag_seconds=options.max_lag_seconds,
                             max_retained_bytes=options.max_retained_bytes)
            if getattr(options, "nats", None):
                status = with_nats(status, source, options)
        except psycopg.Error as exc:
            err.write(f"bemi status: cannot read the status: {exc}".strip() + "\n")
            return EXIT_ERROR
    finally:
        source.close()
        if destination is not None:
            destination.close()
    out.write((status.to_json() if options.json else render_text(status)) + "\n")
    return status.exit_code
