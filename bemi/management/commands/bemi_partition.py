"""``python manage.py bemi_partition``: convert an unpartitioned ``changes`` to partitions (online, resumable)."""

from __future__ import annotations

import sys
import time

from django.core.management.base import BaseCommand, CommandError
from django.db import router

from bemi import conf
from bemi.management.commands.bemi_prune import connect
from bemi.worker.convert import ConversionError, convert
from bemi.worker.partitions import INTERVALS


class Command(BaseCommand):
    help = ("Convert an unpartitioned changes table (an earlier version's, or the published worker's) to a table "
            "partitioned by committed_at, while the worker keeps running: a trigger copies new changes, older ones "
            "are copied in batches (resumable: run it again after an interruption), then a swap of a few "
            "milliseconds. The old table is kept as changes_unpartitioned unless --drop-old. See docs/retention.md.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--interval", choices=INTERVALS, default=None,
                            help="one partition per day, week or month (default: BEMI_PARTITION_INTERVAL or month)")
        parser.add_argument("--batch-pages", type=int, default=1000,
                            help="table pages (8 kB) copied per transaction (default: 1000)")
        parser.add_argument("--drop-old", action="store_true", help="drop changes_unpartitioned once converted")
        parser.add_argument("--database", default=None,
                            help="alias of the database holding changes (default: where BemiChange is written)")

    def handle(self, *args, **options) -> None:
        from bemi.models import BemiChange

        interval = options["interval"] or conf.partition_interval()
        alias = options["database"] or router.db_for_write(BemiChange) or "default"
        verbose = options["verbosity"] > 0
        started = time.monotonic()
        tty = sys.stderr.isatty()

        def progress(done: int, total: int, copied: int) -> None:
            if not verbose:
                return
            width = 30
            filled = int(width * done / total) if total else width
            line = (f"copying [{'#' * filled}{'.' * (width - filled)}] {100 * done / max(total, 1):5.1f}% "
                    f"{done}/{total} pages, {copied} changes, {time.monotonic() - started:.0f} s")
            self.stderr.write(("\r" + line) if tty else line, ending="" if tty else "\n")

        def say(text: str) -> None:
            if verbose:
                if tty:
                    self.stderr.write("")
                self.stdout.write(text)

        with connect(alias) as conn:
            try:
                result = convert(conn, interval, batch_pages=max(1, options["batch_pages"]), progress=progress,
                                 say=say, drop_old=options["drop_old"])
            except ConversionError as exc:
                raise CommandError(str(exc)) from exc
        if tty and verbose:
            self.stderr.write("")
        self.stdout.write(f"changes: {result}")
