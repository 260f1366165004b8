"""Facts read from the destination (where ``bemi.changes`` is written): the worker's checkpoint
and its dead letters.

Only tables of ours are read: one another role made first is skipped, since a view or a rule there
would run its owner's code as us (bemi/trust.py).
"""

from __future__ import annotations

import psycopg

from bemi.status.report import Checkpoint
from bemi.status.session import all_rows, one
from bemi.tables import SCHEMA as BEMI_SCHEMA
from bemi.trust import untrusted_tables
from bemi.worker import pgoutput as po


def table_exists(conn: psycopg.Connection, name: str) -> bool:
    """Is ``bemi.<name>`` there, and one of ours to read? (A table another role made first is
    not read: a view or a rule there would run its owner's code as us; bemi/trust.py.)"""
    # From the catalog, not to_regclass(): that needs USAGE on the schema, and a role without it is told
    # what to grant when it reads the table.
    row = one(conn, "SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s::name AND c.relname = %s::name) AS e", [BEMI_SCHEMA, name])
    return bool(row and row["e"]) and not untrusted_tables(conn, [name])


def read_checkpoint(conn: psycopg.Connection, slot: str, database: str) -> Checkpoint | None:
    """The worker's checkpoint row for this slot (read tolerantly: its key may grow)."""
    if not table_exists(conn, "_bemi_worker_checkpoints"):
        return None
    rows = all_rows(conn, "SELECT to_jsonb(c) AS c, commit_lsn::text AS commit_lsn, end_lsn::text AS end_lsn, "
                          "(now() - c.committed_at) AS age FROM bemi._bemi_worker_checkpoints c "
                          "WHERE c.slot = %s::text", [slot])
    if not rows:
        return None
    mine = [r for r in rows if r["c"].get("database") in (None, database)] or rows
    r = max(mine, key=lambda r: po.lsn_to_int(r["end_lsn"] or "0/0"))
    c = r["c"]
    age = r["age"].total_seconds() if r["age"] is not None else None
    return Checkpoint(commit_lsn=r["commit_lsn"], end_lsn=r["end_lsn"], committed_at=c.get("committed_at"),
                      age_seconds=round(age, 3) if age is not None else None, updated_at=c.get("updated_at"))


def count_dead_letters(conn: psycopg.Connection, slot: str) -> int:
    """Changes the destination rejected, of this slot when the table says (an older one does not)."""
    if not table_exists(conn, "_bemi_worker_failures"):
        return 0
    has_slot = one(conn, "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = "
                         "'bemi._bemi_worker_failures'::regclass AND attname = 'slot' AND NOT attisdropped) AS e")
    if has_slot and has_slot["e"]:
        row = one(conn, "SELECT count(*)::int8 AS n FROM bemi._bemi_worker_failures WHERE slot = %s::text",
                  [slot])
    else:
        row = one(conn, "SELECT count(*)::int8 AS n FROM bemi._bemi_worker_failures")
    return int(row["n"]) if row else 0
