"""Where the chain lives in the destination: the ``chain_link`` column, the cut records, the head (I/O).

The links themselves are computed in Python (bemi/chain.py). Here:

* ``ensure()``: the column ``changes.chain_link``, ``_bemi_worker_checkpoints.chain_head``
  (the head, committed with the rows) and the table ``_bemi_chain_cuts``, for tables
  made by earlier versions too (``ALTER TABLE ... ADD COLUMN``);
* ``start_head()``: where a writer continues the chain of its source database;
* ``cut_at()`` and ``record_cut()``: removing history (``bemi_prune``, retention)
  cuts the chain; the cut record says after which change it continues, and from
  which link, so ``bemi_verify`` starts there and says so.

Every statement qualifies its names (the callers' sessions pin ``search_path``).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from bemi import tables
from bemi.chain import GENESIS

__all__ = ["CUTS", "Cut", "ensure", "has_chain", "needs_upgrade", "start_head", "newest_cut", "cut_at", "newest_of", "record_cut"]

log = logging.getLogger("bemi.worker")

#: Name of the cut records' table (bemi/tables.py qualifies it).
CUTS = "_bemi_chain_cuts"


class Cut(NamedTuple):
    """The chain of ``database`` continues after change (commit_position, change_index) from ``link``."""

    database: str
    commit_position: int
    change_index: int
    link: bytes
    reason: str
    changes: int = 0


_CREATE_CUTS = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {} ("
    '"database" text NOT NULL, "commit_position" bigint NOT NULL, "change_index" integer NOT NULL, '
    '"link" bytea NOT NULL, "reason" text NOT NULL, "changes" bigint NOT NULL DEFAULT 0, '
    '"cut_at" timestamptz NOT NULL DEFAULT pg_catalog.now(), "cut_by" text NOT NULL DEFAULT CURRENT_USER)')


def _has_column(conn: Any, table: sql.Identifier, column: str) -> bool:
    row = conn.execute(
        sql.SQL("SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute WHERE attrelid OPERATOR(pg_catalog.=) "
                "pg_catalog.to_regclass(%s::text) AND attname OPERATOR(pg_catalog.=) %s::name AND NOT attisdropped)"),
        [table.as_string(conn), column]).fetchone()
    return bool(row and row[0])


def has_chain(conn: Any) -> bool:
    """Does this destination chain its changes (column and cut records present)?"""
    exists = conn.execute("SELECT pg_catalog.to_regclass(%s::text) IS NOT NULL",
                          [tables.qualified(CUTS).as_string(conn)]).fetchone()
    return bool(exists and exists[0]) and _has_column(conn, tables.CHANGES, "chain_link")


def needs_upgrade(conn: psycopg.Connection) -> bool:
    """Is something of the chain missing (a destination made by an earlier version)?"""
    return not (has_chain(conn) and _has_column(conn, tables.CHECKPOINTS, "chain_head"))


def ensure(conn: psycopg.Connection) -> None:
    """Add what the chain needs, in the caller's transaction (idempotent)."""
    added = not _has_column(conn, tables.CHANGES, "chain_link")
    conn.execute(sql.SQL('ALTER TABLE {} ADD COLUMN IF NOT EXISTS "chain_link" bytea').format(tables.CHANGES))
    conn.execute(sql.SQL('ALTER TABLE {} ADD COLUMN IF NOT EXISTS "chain_head" bytea').format(tables.CHECKPOINTS))
    conn.execute(_CREATE_CUTS.format(tables.qualified(CUTS)))
    if added:
        log.warning("added column chain_link to the existing changes table: changes stored from now on are "
                    "chained (bemi_verify checks them; the ones before are not covered)")


def newest_cut(conn: Any, database: str) -> Cut | None:
    row = conn.execute(sql.SQL(
        "SELECT database, commit_position, change_index, link, reason, changes FROM {} "
        "WHERE database OPERATOR(pg_catalog.=) %s::text "
        "ORDER BY commit_position DESC, change_index DESC, cut_at DESC LIMIT 1").format(tables.qualified(CUTS)),
        [database]).fetchone()
    return Cut(row[0], row[1], row[2], bytes(row[3]), row[4], row[5]) if row else None


def start_head(conn: psycopg.Connection, database: str, checkpoint_head: bytes | None) -> bytes:
    """The link a writer continues from: its checkpoint's head, else the newest stored link or cut of
    its database; with neither, the chain starts here (a ``start`` cut after the changes already stored,
    which earlier versions wrote without links). Commits when it records a start."""
    if checkpoint_head is not None:
        return checkpoint_head
    row = conn.execute(sql.SQL(
        "SELECT commit_position, change_index, chain_link FROM {} WHERE database OPERATOR(pg_catalog.=) %s::text "
        "AND chain_link IS NOT NULL AND commit_position IS NOT NULL "
        "ORDER BY commit_position DESC, change_index DESC LIMIT 1").format(tables.CHANGES), [database]).fetchone()
    cut = newest_cut(conn, database)
    if row is not None and (cut is None or (row[0], row[1]) > (cut.commit_position, cut.change_index)):
        return bytes(row[2])
    if cut is not None:
        return cut.link
    last = conn.execute(sql.SQL(
        "SELECT commit_position, change_index FROM {} WHERE database OPERATOR(pg_catalog.=) %s::text "
        "AND commit_position IS NOT NULL ORDER BY commit_position DESC, change_index DESC LIMIT 1").format(
        tables.CHANGES), [database]).fetchone()
    legacy = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE database OPERATOR(pg_catalog.=) %s::text").format(
        tables.CHANGES), [database]).fetchone()
    start = Cut(database, last[0] if last else -1, last[1] if last else -1, GENESIS, "start",
                int(legacy[0]) if legacy else 0)
    record_cut(conn, start)
    conn.commit()
    log.info("started the chain of database %s%s", database,
             f" after the {start.changes} changes stored without links" if start.changes else "")
    return GENESIS


def cut_at(conn: Any, table: sql.Composable) -> list[Cut]:
    """The cuts that dropping ``table`` (all of it: a partition) needs: per database, its newest change.

    One index probe per database (the identity index, newest first), whatever the partition's size."""
    query = sql.SQL(
        "SELECT database, commit_position, change_index, chain_link FROM {} WHERE commit_position IS NOT NULL "
        "AND ({}) ORDER BY database DESC, commit_position DESC, change_index DESC LIMIT 1")
    cuts: list[Cut] = []
    row = conn.execute(query.format(table, sql.SQL("TRUE"))).fetchone()
    while row is not None:
        if row[3] is not None:
            cuts.append(Cut(row[0], row[1], row[2], bytes(row[3]), ""))
        row = conn.execute(query.format(table, sql.SQL("database OPERATOR(pg_catalog.<) %s::text")),
                           [row[0]]).fetchone()
    return cuts


def newest_of(rows: list[tuple[str, int, int, Any]]) -> list[Cut]:
    """Per database, the newest linked one of these (database, commit_position, change_index, chain_link)."""
    newest: dict[str, tuple[int, int, Any]] = {}
    for database, position, index, link in rows:
        if link is None or position is None:
            continue
        known = newest.get(database)
        if known is None or (position, index) > known[:2]:
            newest[database] = (position, index, link)
    return [Cut(db, p, i, bytes(link), "") for db, (p, i, link) in newest.items()]


def record_cut(conn: Any, cut: Cut) -> None:
    """Insert a cut record (in the caller's transaction: the same one that removes the changes)."""
    conn.execute(sql.SQL(
        "INSERT INTO {} (database, commit_position, change_index, link, reason, changes) "
        "VALUES (%s::text, %s::int8, %s::int4, %s::bytea, %s::text, %s::int8)").format(tables.qualified(CUTS)),
        [cut.database, cut.commit_position, cut.change_index, cut.link, cut.reason, cut.changes])
