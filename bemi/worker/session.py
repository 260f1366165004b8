"""How every worker connection starts (source, replication stream, destination), and ``one_row``.

Pins ``search_path = pg_catalog, pg_temp`` before anything else (with ``SET``,
so not even a function is looked up first): no function or operator planted in
another schema can be picked up by the worker's queries, which also qualify
bemi's own tables (``bemi.changes``) and cast their parameters.
"""

from __future__ import annotations

from typing import TypeVar

import psycopg
from psycopg import sql

from bemi.worker.errors import WorkerError

__all__ = ["SESSION_SETTINGS", "CLIENT_KEEPALIVES", "connect", "one_row"]

#: Type output as in a UTC session with default styles (what to_jsonb shows; on the
#: stream the type output functions run in the walsender, so it gets them too).
SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lock_timeout": "5s",
    # A row-level security policy of a table another role owns would run its owner's code as the worker:
    # with row_security off, such a read fails instead (bemi/trust.py, worker/tracked.py).
    "row_security": "off",
    # A worker whose host vanished releases the slot soon (standby takeover).
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}
#: libpq keepalives: a server that vanished is noticed within seconds.
CLIENT_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
                     "keepalives_count": "3", "connect_timeout": "10"}


def connect(dsn: str, what: str, **kwargs: str) -> psycopg.Connection:
    """An autocommit connection with search_path pinned and the worker's session settings."""
    try:
        params: dict = {**CLIENT_KEEPALIVES, **kwargs}
        conn = psycopg.connect(dsn, autocommit=True, application_name="bemi-worker", **params)
    except psycopg.OperationalError as exc:
        raise WorkerError(f"cannot connect to the {what} database: {exc}".strip()) from exc
    try:
        # One round trip (a simple query of several statements, run in order): the path first.
        conn.execute(sql.SQL("; ").join([sql.SQL("SET search_path = pg_catalog, pg_temp")] + [
            sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
            for name, value in SESSION_SETTINGS.items()]))
    except BaseException:
        conn.close()
        raise
    return conn


R = TypeVar("R")


def one_row(cur: psycopg.Cursor[R]) -> R:
    """The row of a query that always returns one (psycopg types ``fetchone()`` as optional)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("a query that always returns a row returned none")
    return row
