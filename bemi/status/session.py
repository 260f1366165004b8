"""The status's own connections, and the two ways it reads a row.

A probe that is run often, possibly as a superuser: every session pins
``search_path`` (nothing another role put in a schema is resolved by name) and
bounds each statement, so a stuck catalog cannot hang the monitoring.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

SESSION = {
    "search_path": "pg_catalog, pg_temp",
    "statement_timeout": "30s",
    "TimeZone": "UTC",
}


def connect(dsn: str) -> psycopg.Connection:
    """A read-mostly connection for the status: autocommit, search_path pinned, statement timeout."""
    conn = psycopg.connect(dsn, autocommit=True, application_name="bemi-status")
    for name, value in SESSION.items():
        conn.execute("SELECT pg_catalog.set_config(%s::text, %s::text, false)", [name, value])
    return conn


def one(conn: psycopg.Connection, query: Any, params: Any = None) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchone()


def all_rows(conn: psycopg.Connection, query: Any, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()
