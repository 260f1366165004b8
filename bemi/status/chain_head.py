"""The chain head the status publishes (``chain_head``): keep it outside the database, and
``bemi_verify --head`` later proves nothing before it was rewritten (bemi/chain.py, docs/security.md)."""

from __future__ import annotations

import psycopg
from psycopg import sql

from bemi import tables
from bemi.status.session import one


def read_chain_head(conn: psycopg.Connection, database: str) -> str | None:
    """The head of this database's chain: its checkpoint's (committed with the rows), else the newest
    stored link or cut (a role that may not read the checkpoints)."""
    for query in (sql.SQL("SELECT chain_head AS link FROM {} WHERE database = %s::text AND chain_head IS NOT NULL "
                          "ORDER BY commit_lsn DESC LIMIT 1").format(tables.CHECKPOINTS),
                  sql.SQL("SELECT chain_link AS link FROM {} WHERE database = %s::text AND chain_link IS NOT NULL "
                          "AND commit_position IS NOT NULL ORDER BY commit_position DESC, change_index DESC "
                          "LIMIT 1").format(tables.CHANGES)):
        try:
            with conn.transaction():
                row = one(conn, query, [database])
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable,
                psycopg.errors.UndefinedColumn):
            continue
        if row is not None:
            return bytes(row["link"]).hex()
    return None
