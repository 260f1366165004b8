"""``python manage.py bemi_prune [--before DATE | --older-than DAYS] [--dry-run]``: remove old history.

Without a cutoff it prunes to ``BEMI_RETENTION`` (exactly, not by whole
partitions as the worker does); without that setting either, it says what to pass.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import router

from bemi import conf
from bemi.management.commands.bemi_worker import dsn_for_alias
from bemi.trust import BEMI_TABLES, untrusted_tables
from bemi.words import counted
from bemi.worker.partitions import Partitions, as_utc_date


def _parse_date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        try:
            value = datetime.combine(date.fromisoformat(text), datetime.min.time())
        except ValueError:
            raise CommandError(f"--before takes a date or time such as 2025-01-01 or 2025-01-01T12:00+02:00; "
                               f"got {text!r}") from None
    return as_utc_date(value)


def connect(alias: str, check_owners: bool = True) -> psycopg.Connection:
    """A connection to the database holding `changes`, search_path pinned (bemi's names are qualified).

    ``check_owners``: refuse when one of bemi's tables was made by another role (bemi/trust.py):
    its owner's trigger, rule or default would run with this command's privileges.
    """
    try:
        conn = psycopg.connect(dsn_for_alias(alias), autocommit=True, application_name="bemi-manage")
    except psycopg.OperationalError as exc:
        raise CommandError(f"cannot connect to database {alias!r}: {exc}".strip()) from exc
    conn.execute("SET search_path = pg_catalog, pg_temp")
    if check_owners:
        untrusted = untrusted_tables(conn, BEMI_TABLES)
        if untrusted:
            conn.close()
            raise CommandError(
                "refusing to work on bemi's tables made by another role: " + ", ".join(t.why for t in untrusted)
                + ". Their owner could run code with this command's privileges through them. Run this command as "
                "their owner (the worker's role: docs/retention.md) if that role is trusted; otherwise check them "
                "and drop them.")
    return conn


def _retention() -> timedelta:
    """``BEMI_RETENTION``, the cutoff when no option gives one; a CommandError saying what to pass without it."""
    try:
        retention = conf.retention()
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from exc
    if retention is None:
        raise CommandError(
            "bemi_prune needs a cutoff: --before DATE (e.g. --before 2025-01-01) or --older-than DAYS "
            "(e.g. --older-than 365), or the setting BEMI_RETENTION (then bemi_prune alone prunes to it). "
            "Add --dry-run to see what would go.")
    return retention


class Command(BaseCommand):
    help = ("Remove every change committed before a date: partitions of changes entirely before it are "
            "dropped (detach + drop: milliseconds, whatever their size), the partition that straddles it is "
            "trimmed in batches. Safe while the worker runs. Time travel to before the cutoff then raises "
            "HistoryPrunedError. See docs/retention.md.")

    def add_arguments(self, parser) -> None:
        when = parser.add_mutually_exclusive_group()
        when.add_argument("--before", help="cutoff date or time (UTC unless it has an offset), e.g. 2025-01-01")
        when.add_argument("--older-than", type=float, metavar="DAYS",
                          help="cutoff: now minus this many days (default: the setting BEMI_RETENTION)")
        parser.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
        parser.add_argument("--batch-rows", type=int, default=10_000,
                            help="rows per DELETE when trimming a straddling partition (default: 10000)")
        parser.add_argument("--database", default=None,
                            help="alias of the database holding changes (default: where BemiChange is written)")

    def handle(self, *args, **options) -> None:
        from bemi.models import BemiChange

        if options["before"]:
            cutoff = _parse_date(options["before"])
        elif options["older_than"] is not None:
            if options["older_than"] <= 0:
                raise CommandError("--older-than takes a positive number of days")
            cutoff = datetime.now(timezone.utc) - timedelta(days=options["older_than"])
        else:
            cutoff = datetime.now(timezone.utc) - _retention()
        alias = options["database"] or router.db_for_write(BemiChange) or "default"
        started = time.perf_counter()
        with connect(alias) as conn:
            partitions = Partitions(conn)
            if not partitions.is_partitioned():
                raise CommandError("table changes is not partitioned: convert it first with "
                                   "python manage.py bemi_partition (docs/retention.md)")
            say = (lambda text: self.stdout.write(text)) if options["verbosity"] else (lambda text: None)
            result = partitions.prune(cutoff, dry_run=options["dry_run"], batch_rows=max(1, options["batch_rows"]),
                                      progress=say, by="manage.py bemi_prune")
        verb = "would remove" if options["dry_run"] else "removed"
        dropped = "would be dropped" if options["dry_run"] else "dropped"
        deleted = "would be deleted" if options["dry_run"] else "deleted"
        self.stdout.write(f"{verb} {counted(result.rows, 'change')} committed before {cutoff.isoformat()} "
                          f"({counted(len(result.dropped), 'partition')} {dropped}, "
                          f"{counted(sum(result.trimmed.values()), 'row')} {deleted} in batches) "
                          f"in {time.perf_counter() - started:.2f} s")
