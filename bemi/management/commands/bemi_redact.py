"""``python manage.py bemi_redact``: apply the current tracking settings to recorded history.

Changing ``BEMI_IGNORED_TABLES`` or ``BEMI_MASKED_COLUMNS`` (or upgrading from a
version without the built-ins) does not rewrite what ``changes`` already holds.
This command does: it deletes the changes of ignored tables and replaces the
values of masked columns in ``before`` and ``after`` by the same keyed marker
the worker writes (``bemi.tracking``). Batched (each batch its own transaction,
so it can be stopped at any time), resumable (a masked value is never masked
again and deleted rows are gone: running it again continues where it stopped),
with a progress bar; ``--dry-run`` only counts.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import connections, router, transaction
from psycopg import sql

from bemi import conf, exactjson
from bemi import tracking as tr
from bemi.models import BemiChange
from bemi.tables import CHANGES
from bemi.trust import untrusted_tables
from bemi.worker.stitch import PRIMARY_KEY_MAX

#: Values held per batch at most (their stored size), whatever --batch-size says.
MAX_BATCH_BYTES = 16 * 1024 * 1024

# A value that is not NULL and not a marker of this version (a raw value, or a marker of an earlier
# version, keyed alike for every column: re-keyed per column).
NOT_MASKED = sql.SQL(
    "EXISTS (SELECT 1 FROM pg_catalog.jsonb_each({side}) e WHERE e.key OPERATOR(pg_catalog.~) %s "
    "AND pg_catalog.jsonb_typeof(e.value) OPERATOR(pg_catalog.<>) 'null' "
    "AND (e.value OPERATOR(pg_catalog.#>>) '{{}}') OPERATOR(pg_catalog.!~) %s)"
)
MARKER_REGEX = "^" + tr.MARKER.pattern.replace("\\Z", "$")


def _table_condition(patterns: list[tr.Pattern]) -> tuple[sql.Composable, list[Any]]:
    parts, params = [], []
    for p in patterns:
        parts.append(sql.SQL('("schema" OPERATOR(pg_catalog.~) %s AND "table" OPERATOR(pg_catalog.~) %s)'))
        params += [p.schema, p.table]
    return (sql.SQL(" OR ").join(parts) if parts else sql.SQL("false")), params


def _masked_condition(patterns: list[tr.Pattern]) -> tuple[sql.Composable, list[Any]]:
    parts, params = [], []
    for p in patterns:
        parts.append(sql.SQL('("schema" OPERATOR(pg_catalog.~) %s AND "table" OPERATOR(pg_catalog.~) %s AND ({} OR {}))')
                     .format(NOT_MASKED.format(side=sql.Identifier("before")),
                             NOT_MASKED.format(side=sql.Identifier("after"))))
        params += [p.schema, p.table, p.column, MARKER_REGEX, p.column, MARKER_REGEX]
    return (sql.SQL(" OR ").join(parts) if parts else sql.SQL("false")), params


class Command(BaseCommand):
    help = ("Apply the current BEMI_IGNORED_TABLES and BEMI_MASKED_COLUMNS (with the built-ins) to the changes "
            "already recorded: delete the changes of ignored tables, mask the values of masked columns. "
            "Batched and resumable; --dry-run only counts.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--database", default=None,
                            help="alias of the database holding `changes` (default: where BemiChange is written)")
        parser.add_argument("--dry-run", action="store_true", help="count what would change, change nothing")
        parser.add_argument("--batch-size", type=int, default=1000, help="changes per transaction (default: 1000)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            tracking = conf.tracking()
        except tr.TrackingError as exc:
            raise CommandError(str(exc)) from exc
        alias = options["database"] or router.db_for_write(BemiChange) or "default"
        if alias not in connections.settings:
            raise CommandError(f"no database alias {alias!r} in DATABASES")
        self.connection = connections[alias]
        # Qualified: Django's connection has the application's search_path, which may find another `changes`.
        self.table = CHANGES
        self.connection.ensure_connection()
        with self.connection.connection.cursor() as cursor:  # psycopg's own: every name in it is qualified
            untrusted = untrusted_tables(cursor, ["changes"])
        if untrusted:  # its owner's triggers would run with this command's privileges (bemi/trust.py)
            raise CommandError("refusing to rewrite changes: " + ", ".join(t.why for t in untrusted)
                               + " was not made by the worker's role nor a superuser; check it, then have a superuser "
                               "run manage.py bemi_grants")
        self.batch = max(1, options["batch_size"])
        self.progress = not options["no_progress"] and options["verbosity"] > 0
        key = tr.derive_key(conf.masking_secret())
        tables = list(tracking.ignored_tables)
        masked = list(tracking.masked_columns)

        if options["dry_run"]:
            for p in tables:
                n = self._count(*_table_condition([p]))
                self.stdout.write(f"would delete {n} change(s) of ignored table {p.text}")
            for p in masked:
                n = self._count(*_masked_condition([p]))
                self.stdout.write(f"would mask {p.text} in {n} change(s)")
            return

        deleted = self._delete(*_table_condition(tables))
        changed = self._mask(masked, key)
        self.stdout.write(f"bemi_redact: deleted {deleted} change(s) of ignored tables, "
                          f"masked values in {changed} change(s)")

    # -- steps ---------------------------------------------------------------------------------

    def _count(self, condition: sql.Composable, params: list[Any]) -> int:
        self.connection.ensure_connection()
        with self.connection.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(self.table, condition)
                           .as_string(self.connection.connection), params)
            return cursor.fetchone()[0]

    def _delete(self, condition: sql.Composable, params: list[Any]) -> int:
        total = self._count(condition, params)
        done = 0
        query = sql.SQL("DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE {c} LIMIT %s)").format(
            t=self.table, c=condition).as_string(self.connection.connection)
        while done < total:
            with transaction.atomic(using=self.connection.alias), self.connection.cursor() as cursor:
                cursor.execute(query, [*params, self.batch])
                if not cursor.rowcount:
                    break
                done += cursor.rowcount
            self._bar("deleting changes of ignored tables", done, total)
        self._bar_end(total)
        return done

    def _mask(self, patterns: list[tr.Pattern], key: bytes) -> int:
        condition, params = _masked_condition(patterns)
        total = self._count(condition, params)
        # A batch is bounded by rows and by the bytes its values take (as stored): first the ids and sizes.
        sizes = sql.SQL("SELECT id, pg_catalog.pg_column_size(before) + pg_catalog.pg_column_size(after) "
                        "FROM {t} WHERE ({c}) AND id > %s ORDER BY id LIMIT %s").format(t=self.table, c=condition)
        select = sql.SQL('SELECT id, "schema", "table", primary_key, before, after FROM {t} '
                         "WHERE id = ANY (%s::pg_catalog.uuid[]) ORDER BY id FOR UPDATE").format(t=self.table)
        update = sql.SQL("UPDATE {t} SET primary_key = %s, before = %s::jsonb, after = %s::jsonb "
                         "WHERE id = %s").format(t=self.table)
        conn = self.connection
        conn.ensure_connection()
        sizes_text = sizes.as_string(conn.connection)
        select_text, update_text = select.as_string(conn.connection), update.as_string(conn.connection)
        done, last = 0, "00000000-0000-0000-0000-000000000000"
        while True:
            with transaction.atomic(using=conn.alias), conn.cursor() as cursor:
                cursor.execute(sizes_text, [*params, last, self.batch])
                ids: list[Any] = []
                held = 0
                for change_id, size in cursor.fetchall():
                    if ids and held + (size or 0) > MAX_BATCH_BYTES:
                        break
                    ids.append(change_id)
                    held += size or 0
                if not ids:
                    break
                cursor.execute(select_text, [ids])
                rows = cursor.fetchall()
                if not rows:  # deleted meanwhile: go on after them
                    last = str(ids[-1])
                    continue
                for change_id, schema, table, primary_key, before, after in rows:
                    columns = [p for p in patterns if p.matches_table(schema, table)]
                    masker = _RowMasker(key, schema, table, columns, primary_key)
                    new_before = masker.mask(_load(before))
                    new_after = masker.mask(_load(after))
                    cursor.execute(update_text, [masker.primary_key, exactjson.dumps(new_before),
                                                 exactjson.dumps(new_after), change_id])
                    last = str(change_id)
                done += len(rows)
            self._bar("masking values", done, total)
        self._bar_end(total)
        return done

    # -- progress --------------------------------------------------------------------------------

    def _bar(self, what: str, done: int, total: int) -> None:
        if not self.progress:
            return
        total = max(total, done, 1)
        filled = int(30 * done / total)
        sys.stderr.write(f"\r{what}: [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} ({100 * done // total}%)")
        sys.stderr.flush()

    def _bar_end(self, total: int) -> None:
        if self.progress and total:
            sys.stderr.write("\n")


def _load(value: Any) -> Any:
    """Stored values, numbers exact (so the columns left unmasked keep every digit)."""
    return exactjson.loads(value) if isinstance(value, (str, bytes)) else value


class _RowMasker:
    """Masks the masked columns of one change, and its ``primary_key`` where a masked column is (part of) it.

    The primary key is stored as the column's text (one column) or a JSON array (several): the part
    equal to a masked column's value becomes that value's marker, as the worker writes it.
    """

    def __init__(self, key: bytes, schema: str, table: str, patterns: list[tr.Pattern], primary_key: str | None):
        self.key, self.schema, self.table, self.patterns = key, schema, table, patterns
        self.primary_key = primary_key
        self.composite = False
        self.parts: list[Any] = [] if primary_key is None else [primary_key]
        if primary_key is not None and primary_key.startswith("["):
            try:
                parts = exactjson.loads(primary_key)
            except ValueError:
                parts = None
            if isinstance(parts, list):
                self.parts, self.composite = parts, True
        self._keys: dict[str, bytes] = {}
        self._legacy: dict[tuple[str, str], str] = {}  # (column, earlier marker) -> its marker now

    def mask(self, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return {column: (self._mask(column, value) if any(p.matches_column(column) for p in self.patterns)
                         else value)
                for column, value in values.items()}

    def _mask(self, column: str, value: Any) -> Any:
        if value is None or tr.is_marker(value):
            return value
        key = self._keys.get(column)
        if key is None:
            key = self._keys[column] = tr.column_key(self.key, self.schema, self.table, column)
        if isinstance(value, str) and tr.LEGACY_MARKER.match(value):
            # An earlier version's marker: the primary key may hold it (the worker masked it), or the raw
            # value whose legacy marker it is (an earlier bemi_redact left it): then the value's own marker.
            resolved = self._legacy.get((column, value))
            if resolved is not None:  # seen in before, now in after
                return resolved
            resolved = tr.rekey_legacy(key, value)
            for i, part in enumerate(self.parts):
                text = part if isinstance(part, str) else exactjson.dumps(part)
                if text == value:
                    self._set_part(i, resolved)
                elif tr.legacy_marker(self.key, text.encode("utf-8", "surrogatepass")) == value:
                    resolved = tr.mask_json_value(key, part)
                    self._set_part(i, resolved)
                    break
            self._legacy[(column, value)] = resolved
            return resolved
        marker = tr.mask_json_value(key, value)
        for i, part in enumerate(self.parts):
            if part == value or (not self.composite and part == _text(value)[:PRIMARY_KEY_MAX]):
                self._set_part(i, marker)
        return marker

    def _set_part(self, i: int, marker: str) -> None:
        self.parts[i] = marker
        if self.composite:
            text = "[" + ",".join(exactjson.dumps(p, ensure_ascii=False) for p in self.parts) + "]"
        else:
            text = marker
        self.primary_key = text[:PRIMARY_KEY_MAX]


def _text(value: Any) -> str:
    """A value as the worker stores a one-column primary key: a string's own text, other values' JSON."""
    return value if isinstance(value, str) else exactjson.dumps(value)
