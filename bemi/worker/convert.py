"""Convert an unpartitioned ``changes`` (an earlier version's, or the published worker's) to partitions.

Online, with the worker running, resumable (``manage.py bemi_partition``; docs/retention.md):

1. **prepare** (one transaction): a partitioned ``bemi._bemi_changes_new`` with the
   published columns and indexes, partitions for every period holding changes plus
   the current and next ones, and a row trigger on ``changes`` that copies every
   change stored from then on into it (``ON CONFLICT DO NOTHING`` on the primary
   key, so a row copied twice is stored once). Creating the trigger waits for the
   worker's open transaction: every change committed before it is in the table,
   every one after it goes through the trigger.
2. **copy** the rows that existed before, in ranges of pages (``ctid``), one
   transaction each; the position is saved with each range, so an interrupted run
   resumes where it stopped.
3. **swap** (one short transaction, ``ACCESS EXCLUSIVE`` on ``changes`` for
   milliseconds): drop the trigger, rename ``changes`` to ``changes_unpartitioned``
   and the new table to ``changes``. The worker's next write goes to the new table.

No change is lost (before the trigger: copied; after: through the trigger, in the
worker's own transaction) or doubled (the primary key ``(id, committed_at)``).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Callable

import psycopg
from psycopg import sql

from bemi import relocate
from bemi import sql as bemi_sql
from bemi.trust import untrusted_tables
from bemi.worker.partitions import (
    DEFAULT_PARTITION, SCHEMA, TABLE, Partitions, _one, period_end, period_start, table_ident,
)

__all__ = ["convert", "ConversionError", "OLD_TABLE", "NEW_TABLE"]

log = logging.getLogger("bemi.worker")

NEW_TABLE = "_bemi_changes_new"
OLD_TABLE = "changes_unpartitioned"
STATE = "_bemi_changes_conversion"
FUNCTION = "_bemi_changes_conversion_copy"
TRIGGER = "_bemi_changes_conversion"
UTC = timezone.utc

# (name, type, default) of the columns, as in bemi/sql/changes.sql (a test compares the two tables).
COLUMNS = [
    ("id", "uuid", "pg_catalog.gen_random_uuid()"), ("database", "varchar(255)", None), ("schema", "varchar(255)", None),
    ("table", "varchar(255)", None), ("primary_key", "varchar(255)", None), ("operation", "text", None),
    ("before", "jsonb", "'{}'::jsonb"), ("after", "jsonb", "'{}'::jsonb"), ("context", "jsonb", "'{}'::jsonb"),
    ("committed_at", "timestamptz", None), ("queued_at", "timestamptz", "pg_catalog.now()"),
    ("created_at", "timestamptz", "pg_catalog.now()"), ("transaction_id", "bigint", None), ("position", "bigint", None),
    ("commit_position", "bigint", None), ("change_index", "integer", None), ("chain_link", "bytea", None),
]
NULLABLE = {"primary_key", "chain_link"}
# (suffix, method, column expression) of the indexes of changes.sql; names are TABLE + suffix.
INDEXES = [
    ("_committed_at_index", "btree", '"committed_at"'), ("_table_index", "btree", '"table"'),
    ("_primary_key_index", "btree", '"primary_key"'), ("_operation_index", "btree", '"operation"'),
    ("_before_index", "gin", '"before" jsonb_path_ops'), ("_after_index", "gin", '"after" jsonb_path_ops'),
    ("_context_index", "gin", '"context" jsonb_path_ops'),
]
IDENTITY = ("_identity_index", '"database", "commit_position", "change_index", "committed_at"')


class ConversionError(Exception):
    pass


def _exists(conn: psycopg.Connection, name: str) -> bool:
    return _one(conn.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", [f"{SCHEMA}.{name}"]))[0]


def _old_columns(conn: psycopg.Connection) -> dict[str, bool]:
    """Columns of the unpartitioned changes: name -> NOT NULL."""
    return dict(conn.execute(
        "SELECT attname::text, attnotnull FROM pg_catalog.pg_attribute WHERE attrelid = %s::regclass "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", [f"{SCHEMA}.{TABLE}"]).fetchall())


def _create_new_table(conn: psycopg.Connection, old: dict[str, bool]) -> None:
    parts = []
    for name, type_, default in COLUMNS:
        # NOT NULL only where the old table guarantees it (the published worker's table gets
        # commit_position/change_index added as nullable columns: its old rows have none).
        not_null = name not in NULLABLE and old.get(name, False)
        piece = sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(type_))
        if not_null:
            piece = sql.SQL("{} NOT NULL").format(piece)
        if default:
            piece = sql.SQL("{} DEFAULT {}").format(piece, sql.SQL(default))
        parts.append(piece)
    parts.append(sql.SQL('CONSTRAINT {} PRIMARY KEY ("id", "committed_at")').format(
        sql.Identifier(NEW_TABLE + "_pkey")))
    new = table_ident(NEW_TABLE)
    conn.execute(sql.SQL('CREATE TABLE {} ({}) PARTITION BY RANGE ("committed_at")').format(
        new, sql.SQL(", ").join(parts)))
    for suffix, method, column in INDEXES:
        conn.execute(sql.SQL("CREATE INDEX {} ON {} USING {} ({})").format(
            sql.Identifier(NEW_TABLE + suffix), new, sql.SQL(method), sql.SQL(column)))
    conn.execute(sql.SQL("CREATE UNIQUE INDEX {} ON {} ({})").format(
        sql.Identifier(NEW_TABLE + IDENTITY[0]), new, sql.SQL(IDENTITY[1])))
    staging = table_ident("_bemi_" + DEFAULT_PARTITION)
    conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(staging, new))
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(staging, sql.Identifier(DEFAULT_PARTITION)))


def _periods(conn: psycopg.Connection, interval: str) -> set[datetime]:
    """Period starts holding changes in the old table (one index probe per period)."""
    starts: set[datetime] = set()
    query = sql.SQL("SELECT min(committed_at) FROM {} WHERE committed_at >= %s").format(table_ident(TABLE))
    floor = datetime.min.replace(tzinfo=UTC)
    while True:
        (found,) = _one(conn.execute(query, [floor]))
        if found is None:
            return starts
        start = period_start(found, interval)
        starts.add(start)
        end = period_end(start, interval)
        if end is None:
            return starts
        floor = end


def _create_trigger(conn: psycopg.Connection, columns: list[str]) -> None:
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    values = sql.SQL(", ").join(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in columns)
    body = sql.SQL(
        "BEGIN INSERT INTO {new} ({cols}) VALUES ({values}) ON CONFLICT (\"id\", \"committed_at\") DO NOTHING; "
        "RETURN NULL; END;").format(new=table_ident(NEW_TABLE), cols=cols, values=values)
    conn.execute(sql.SQL(
        "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS {}"
    ).format(table_ident(FUNCTION), sql.Literal(body.as_string(conn))))
    conn.execute(sql.SQL("CREATE TRIGGER {} AFTER INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
        sql.Identifier(TRIGGER), table_ident(TABLE), table_ident(FUNCTION)))


def _common_columns(conn: psycopg.Connection) -> list[str]:
    old = _old_columns(conn)
    return [name for name, _t, _d in COLUMNS if name in old]


def convert(
    conn: psycopg.Connection,
    interval: str,
    *,
    batch_pages: int = 1000,
    progress: Callable[[int, int, int], None] | None = None,
    say: Callable[[str], None] = lambda text: log.info("%s", text),
    drop_old: bool = False,
    lock_timeout_ms: int = 2000,
    retries: int = 60,
    stop_after_pages: int | None = None,
) -> str:
    """Convert ``bemi.changes``; returns ``'converted'``, ``'already partitioned'`` or ``'interrupted'``.

    ``conn`` must be in autocommit mode. ``stop_after_pages`` (tests) interrupts the copy.
    """
    if not conn.autocommit:
        raise ValueError("convert() needs an autocommit connection")
    for name in relocate.move_own(conn):
        say(f"moved {name} of an earlier version from schema public into schema {SCHEMA}")
    untrusted = untrusted_tables(conn, [TABLE, STATE, NEW_TABLE, OLD_TABLE])
    if untrusted:
        # A view or a table with a trigger planted under one of these names would run its owner's
        # code as whoever converts (bemi/trust.py); the conversion resumes from STATE.
        raise ConversionError("refusing to convert: " + ", ".join(t.why for t in untrusted)
                              + " was made by a role that is neither a superuser nor the worker's; check it")
    partitions = Partitions(conn, interval)
    if not _exists(conn, TABLE):
        raise ConversionError("there is no table bemi.changes to convert (the worker creates it partitioned)")
    if partitions.is_partitioned():
        return "already partitioned"
    # No session lock: any role may hold an advisory lock (one held by a LOGIN role made every run
    # refuse). Each step instead runs in a transaction that locks what only the worker's role (the
    # owner) may lock, and looks again at what another run may have done meanwhile: concurrent runs
    # take turns and finish the same conversion.
    if _prepare(conn, interval, say) == "already partitioned":
        return "already partitioned"
    if not _copy(conn, batch_pages, progress, stop_after_pages):
        return "interrupted"
    if not _swap(conn, lock_timeout_ms, retries, say):
        return "already partitioned"
    with conn.transaction():
        conn.execute(bemi_sql.read("changes.sql"))  # _bemi_pruned (and nothing else: all exists)
    Partitions(conn, interval).maintain()  # rows the trigger put in changes_default, if a period began meanwhile
    if drop_old:
        with conn.transaction():
            conn.execute(sql.SQL("DROP TABLE {}").format(table_ident(OLD_TABLE)))
        say(f"dropped {SCHEMA}.{OLD_TABLE}")
    else:
        say(f"the old table is kept as {SCHEMA}.{OLD_TABLE}: drop it when satisfied "
            f"(DROP TABLE {SCHEMA}.{OLD_TABLE};)")
    return "converted"


def _prepare(conn: psycopg.Connection, interval: str, say: Callable[[str], None]) -> str:
    """'prepared', 'resuming' (prepared before, by this or another run) or 'already partitioned'."""
    with conn.transaction():
        # The mode CREATE TRIGGER takes anyway, taken first: one run prepares at a time, and only
        # roles that may write changes can take it (the application's role may only read it).
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(table_ident(TABLE)))
        if Partitions(conn, interval).is_partitioned():
            return "already partitioned"  # swapped by another run meanwhile
        if _exists(conn, STATE):
            say("resuming the conversion")
            return "resuming"
        if _exists(conn, OLD_TABLE):
            raise ConversionError(f"{SCHEMA}.{OLD_TABLE} exists (an earlier conversion?): rename or drop it first")
        old = _old_columns(conn)
        if not (old.get("id") and old.get("committed_at")):
            raise ConversionError("changes.id and changes.committed_at must be NOT NULL to be converted")
        if _exists(conn, NEW_TABLE):
            conn.execute(sql.SQL("DROP TABLE {}").format(table_ident(NEW_TABLE)))
        _create_new_table(conn, old)
        starts = _periods(conn, interval)
        now = period_start(datetime.now(UTC), interval)
        starts |= {now, period_end(now, interval) or now}
        new_parts = Partitions(conn, interval, table=NEW_TABLE)
        for start in sorted(starts):
            end = period_end(start, interval)
            if end is not None:
                new_parts._create(start, end)
        columns = _common_columns(conn)
        _create_trigger(conn, columns)  # waits for the worker's open transaction, if any
        conn.execute(sql.SQL("CREATE TABLE {} (next_page bigint NOT NULL, total_pages bigint, copied bigint NOT NULL)")
                     .format(table_ident(STATE)))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (0, NULL, 0)").format(table_ident(STATE)))
    say(f"prepared {SCHEMA}.{NEW_TABLE} with {len(starts)} partitions; changes stored from now on are copied "
        "into it by a trigger")
    return "prepared"


def _copy(conn: psycopg.Connection, batch_pages: int, progress, stop_after_pages: int | None) -> bool:
    """Copy the older rows in ranges of pages; False when stopped early (``stop_after_pages``).

    Each range is one transaction that first locks the state's row (only its owner, the worker's
    role, may): a concurrent run copies the next range, never the same one, and resumes from it."""
    state = table_ident(STATE)
    columns = sql.SQL(", ").join(map(sql.Identifier, _common_columns(conn)))
    query = sql.SQL(
        "INSERT INTO {new} ({cols}) SELECT {cols} FROM {old} WHERE ctid >= %s::tid AND ctid < %s::tid "
        "ON CONFLICT (\"id\", \"committed_at\") DO NOTHING").format(
        new=table_ident(NEW_TABLE), old=table_ident(TABLE), cols=columns)
    done_now = 0
    while True:
        try:
            with conn.transaction():
                next_page, total, copied = _one(conn.execute(sql.SQL(
                    "SELECT next_page, total_pages, copied FROM {} FOR UPDATE").format(state)))
                if total is None:  # measured after the trigger exists: every older row lies in these pages
                    total = _one(conn.execute(
                        "SELECT pg_catalog.pg_relation_size(%s::regclass) / "
                        "pg_catalog.current_setting('block_size')::int", [f"{SCHEMA}.{TABLE}"]))[0]
                    conn.execute(sql.SQL("UPDATE {} SET total_pages = %s").format(state), [total])
                if next_page >= total:
                    return True
                upper = min(next_page + batch_pages, total)
                count = conn.execute(query, [f"({next_page},0)", f"({upper},0)"]).rowcount
                conn.execute(sql.SQL("UPDATE {} SET next_page = %s, copied = copied + %s").format(state),
                             [upper, count])
        except psycopg.errors.UndefinedTable:
            return True  # another run finished the copy and swapped meanwhile (_swap sees it)
        done_now += upper - next_page
        if progress:
            progress(upper, total, copied + count)
        if stop_after_pages is not None and done_now >= stop_after_pages and upper < total:
            return False


def _swap(conn: psycopg.Connection, lock_timeout_ms: int, retries: int, say: Callable[[str], None]) -> bool:
    """True once swapped; False when another run swapped first."""
    for attempt in range(retries):
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{lock_timeout_ms}ms")))
                conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table_ident(TABLE)))
                if not _exists(conn, STATE):
                    return False  # another run swapped meanwhile
                conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(TRIGGER), table_ident(TABLE)))
                conn.execute(sql.SQL("DROP FUNCTION {}()").format(table_ident(FUNCTION)))
                conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(table_ident(TABLE),
                                                                           sql.Identifier(OLD_TABLE)))
                for (index,) in conn.execute(
                        "SELECT c.relname::text FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c "
                        "ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass",
                        [f"{SCHEMA}.{OLD_TABLE}"]).fetchall():
                    if index.startswith(TABLE + "_"):  # free the canonical names
                        conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                            table_ident(index), sql.Identifier((OLD_TABLE + index[len(TABLE):])[:63])))
                conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(table_ident(NEW_TABLE),
                                                                           sql.Identifier(TABLE)))
                for suffix in ["_pkey", IDENTITY[0]] + [s for s, _m, _c in INDEXES]:
                    conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        table_ident(NEW_TABLE + suffix), sql.Identifier(TABLE + suffix)))
                conn.execute(sql.SQL("DROP TABLE {}").format(table_ident(STATE)))
            say(f"swapped: {SCHEMA}.{TABLE} is partitioned")
            return True
        except psycopg.errors.LockNotAvailable:
            time.sleep(min(0.2 * (attempt + 1), 2.0))
    raise ConversionError(f"could not lock changes for the swap after {retries} tries (a long transaction "
                          "holds it); run the command again: it resumes")
