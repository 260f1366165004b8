"""``python manage.py bemi_export``: the recorded changes as JSON lines or CSV, for auditors and other tools.

One line (JSON lines) or row (CSV) per change, oldest first, with every column
of ``changes``. ``before``, ``after`` and ``context`` are written as
PostgreSQL's own JSON text (a number keeps every digit it was stored with),
times in ISO 8601 with their offset. Streamed through a server-side cursor
(``QuerySet.iterator``): at most ``CHUNK`` changes are held at once, whatever
the export's size. A progress line goes to stderr only when it is a terminal.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from typing import IO, Any, Iterator, cast

from django.core.management.base import BaseCommand, CommandError
from django.db.models import TextField
from django.db.models.functions import Cast
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from bemi.models import BemiChange

#: Changes fetched from the server-side cursor at a time (the export's memory bound).
CHUNK = 500
JSON_COLUMNS = ("before", "after", "context")


def columns() -> list[str]:
    """Every column of ``changes``, in the table's order (BemiChange maps each one)."""
    return [field.column for field in BemiChange._meta.concrete_fields if field.column is not None]


class Command(BaseCommand):
    help = ("Export recorded changes as JSON lines or CSV (one per change, every column of changes), "
            "oldest first, streamed; to stdout unless --output.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
        parser.add_argument("--table", help="only this table ('todo' or 'schema.todo')")
        parser.add_argument("--since", help="committed at or after (YYYY-MM-DD or an ISO datetime; naive: TIME_ZONE)")
        parser.add_argument("--until", help="committed before (same forms)")
        parser.add_argument("--context", action="append", default=[], metavar="KEY=VALUE",
                            help="context has KEY = VALUE (the text, or the JSON value it reads as); repeatable")
        parser.add_argument("--output", help="write to this file instead of stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        changes = self.selection(options)
        names = columns()
        fields = [f"_{name}_text" if name in JSON_COLUMNS else name for name in names]
        rows = changes.annotate(**{f"_{name}_text": Cast(name, TextField()) for name in JSON_COLUMNS}) \
            .values_list(*fields).iterator(chunk_size=CHUNK)
        progress = sys.stderr.isatty() and options["verbosity"] > 0
        total = changes.count() if progress else 0
        out: IO[str]
        if options["output"]:
            out = open(options["output"], "w", encoding="utf-8", newline="")
        else:
            out = cast(IO[str], self.stdout._out)  # the real stream: OutputWrapper would add line endings of its own
        try:
            write = self.jsonl if options["format"] == "jsonl" else self.csv
            written = 0
            for written in write(out, names, rows):
                if progress and written % 1000 == 0:
                    sys.stderr.write(f"\rexported {written:,} of {total:,} changes")
            out.flush()
        finally:
            if options["output"]:
                out.close()
        if progress:
            sys.stderr.write(f"\rexported {written:,} of {total:,} changes\n")

    def selection(self, options: dict) -> Any:
        changes = BemiChange.objects.all()
        if options["table"]:
            schema, dot, table = options["table"].rpartition(".")
            changes = changes.filter(table=table, **({"schema": schema} if dot else {}))
        if options["since"]:
            changes = changes.filter(committed_at__gte=_moment(options["since"], "--since"))
        if options["until"]:
            changes = changes.filter(committed_at__lt=_moment(options["until"], "--until"))
        for item in options["context"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CommandError(f"--context takes KEY=VALUE, e.g. --context user_id=42; got {item!r}")
            changes = changes.context_value(key, value)
        return changes.asc()

    @staticmethod
    def jsonl(out: IO[str], names: list[str], rows: Iterator[tuple]) -> Iterator[int]:
        for count, row in enumerate(rows, 1):
            parts = (f"{json.dumps(name)}: {value if name in JSON_COLUMNS else json.dumps(_plain(value))}"
                     for name, value in zip(names, row))
            out.write("{" + ", ".join(parts) + "}\n")
            yield count

    @staticmethod
    def csv(out: IO[str], names: list[str], rows: Iterator[tuple]) -> Iterator[int]:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        for count, row in enumerate(rows, 1):
            writer.writerow(["" if value is None else _plain(value) for value in row])
            yield count


def _plain(value: Any) -> Any:
    """A value as text JSON and CSV carry exactly: ISO times, UUIDs as text, the rest as is."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if value is None or isinstance(value, (int, str)):
        return value
    return str(value)


def _moment(raw: str, option: str) -> dt.datetime:
    try:
        moment = parse_datetime(raw)
        if moment is None:
            day = parse_date(raw)
            moment = dt.datetime(day.year, day.month, day.day) if day else None
    except ValueError:
        moment = None
    if moment is None:
        raise CommandError(f"{option} takes a date (2024-01-31) or an ISO datetime (2024-01-31T12:00:00+00:00); got {raw!r}")
    return moment if timezone.is_aware(moment) else timezone.make_aware(moment)
