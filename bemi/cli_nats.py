"""The options of scale-out through NATS JetStream (docs/scale-out.md), for ``bemi-worker`` and ``manage.py``.

``--publish URL`` makes the worker a reader that publishes to the stream;
``bemi-worker ingest --from URL`` (``manage.py bemi_worker ingest --from URL``)
stores from it. Django-free.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from bemi.worker.partitions import DEFAULT_INTERVAL, INTERVALS, parse_retention

__all__ = ["add_stream_arguments", "add_ingest_arguments", "stream_settings", "ingest_config", "ingest_main"]

INGEST_DESCRIPTION = """\
Store the changes a reader (bemi-worker --publish nats://HOST:PORT) published to
a NATS JetStream stream into `changes`, exactly once. Any number of ingesters, on
any machines, share one durable consumer (--consumer); each batch is acknowledged
only after the destination committed it. See docs/scale-out.md.

Destination: --destination-dsn, else DESTINATION_DB_*, else --dsn / DB_*.
"""


def add_stream_arguments(parser: Any) -> None:
    """The stream's names and limits (the same for the reader and the ingesters)."""
    group = parser.add_argument_group("NATS JetStream (docs/scale-out.md)")
    group.add_argument("--stream", default=os.environ.get("BEMI_NATS_STREAM", "BEMI"),
                       help="JetStream stream name, created if missing (default: BEMI) [env BEMI_NATS_STREAM]")
    group.add_argument("--subject-prefix", default=os.environ.get("BEMI_NATS_SUBJECT_PREFIX", "bemi"),
                       help="subjects are PREFIX.<database>.<schema>.<table> (default: bemi)")
    group.add_argument("--stream-max-age", type=float, default=7 * 24 * 3600.0, metavar="SECONDS",
                       help="when creating the stream: keep a message this long (default: 604800, 7 days; 0: "
                            "no limit). An ingester down for longer loses what expired")
    group.add_argument("--stream-max-bytes", type=int, default=-1, metavar="BYTES",
                       help="when creating the stream: at most this many bytes, the oldest dropped first "
                            "(default: -1, no limit)")
    group.add_argument("--duplicate-window", type=float, default=300.0, metavar="SECONDS",
                       help="when creating the stream: how long JetStream drops a message id seen before "
                            "(default: 300)")


def add_publish_argument(parser: Any) -> None:
    parser.add_argument("--publish", default=None, metavar="nats://HOST:PORT",
                        help="publish every change to a NATS JetStream stream instead of storing it; "
                             "`bemi-worker ingest --from` stores them (docs/scale-out.md); needs nats-py")


def add_ingest_arguments(parser: Any) -> None:
    parser.add_argument("--from", dest="nats_from", default=None, metavar="nats://HOST:PORT",
                        help="the NATS server of the stream to store from")
    parser.add_argument("--consumer", default="bemi_ingest",
                        help="durable consumer shared by the ingesters of one destination (default: bemi_ingest)")
    parser.add_argument("--ingest-batch", type=int, default=10_000, metavar="N",
                        help="messages fetched and stored per destination transaction (default: 10000; "
                             "at most 32 MiB of them)")
    parser.add_argument("--ack-wait", type=float, default=60.0, metavar="SECONDS",
                        help="when creating the consumer: redeliver what an ingester fetched and did not "
                             "acknowledge after this long (default: 60)")


def stream_settings(options: Any, url: str) -> Any:
    from bemi.worker.jetstream import StreamSettings

    return StreamSettings(url=url, stream=options.stream, prefix=options.subject_prefix,
                          max_age=max(options.stream_max_age, 0.0), max_bytes=options.stream_max_bytes,
                          duplicate_window=options.duplicate_window)


def ingest_config(options: Any, url: str, destination_dsn: str) -> Any:
    from bemi.worker.ingest import IngestConfig

    return IngestConfig(
        stream=stream_settings(options, url), destination_dsn=destination_dsn, consumer=options.consumer,
        batch=max(1, options.ingest_batch), ack_wait=max(options.ack_wait, 1.0), once=options.once,
        partition_interval=getattr(options, "partition_interval", None) or DEFAULT_INTERVAL,
        retention=parse_retention(getattr(options, "retention", None)),
        metrics_port=getattr(options, "metrics_port", None), metrics_host=getattr(options, "metrics_host", "127.0.0.1"))


def build_ingest_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bemi-worker ingest", description=INGEST_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ingest_arguments(parser)
    add_stream_arguments(parser)
    parser.add_argument("--once", action="store_true", help="store what the stream holds now, then exit 0")
    parser.add_argument("--partition-interval", choices=INTERVALS, default=None,
                        help="one partition of changes per day, week or month (default: month)")
    parser.add_argument("--retention", default=None, metavar="DAYS",
                        help="drop partitions of changes older than this many days (default: keep everything)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus metrics at /metrics (ingest counters, consumer pending)")
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST")
    parser.add_argument("--dsn", help="libpq connection string of the destination, when --destination-dsn is not "
                                      "given (overrides DB_*)")
    parser.add_argument("--destination-dsn", help="libpq connection string of the destination "
                                                  "(overrides DESTINATION_DB_*)")
    parser.add_argument("-v", "--verbosity", type=int, default=1, choices=[0, 1, 2])
    return parser


def ingest_main(argv: list[str]) -> int:
    from bemi.cli import _dsn_from_env
    from bemi.worker.ingest import main_loop
    from bemi.worker.runner import configure_logging

    parser = build_ingest_parser()
    options = parser.parse_args(argv)
    if not options.nats_from:
        parser.error("--from nats://HOST:PORT is required")
    try:
        parse_retention(options.retention)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(options.verbosity)
    destination = (options.destination_dsn or _dsn_from_env("DESTINATION_DB_") or options.dsn or _dsn_from_env("DB_")
                   or "")
    return main_loop(ingest_config(options, options.nats_from, destination))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(ingest_main(sys.argv[1:]))
