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

__all__ = ["SESSION_SETTINGS", "CLIENT_KEEPALIVES", "connect", "decoding_memory", "one_row"]

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


def connect(dsn: str, what: str, also: sql.Composable | None = None, **kwargs: str) -> psycopg.Connection:
    """An autocommit connection with search_path pinned and the worker's session settings
    (and the statement ``also``, in the same round trip)."""
    try:
        params: dict = {**CLIENT_KEEPALIVES, **kwargs}
        conn = psycopg.connect(dsn, autocommit=True, application_name="bemi-worker", **params)
    except psycopg.OperationalError as exc:
        raise WorkerError(f"cannot connect to the {what} database: {exc}".strip()) from exc
    try:
        statements = [sql.SQL("SET search_path = pg_catalog, pg_temp")] + [  # the path first
            sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
            for name, value in SESSION_SETTINGS.items()] + ([also] if also is not None else [])
        if "replication" in kwargs and conn.info.server_version < 150000:
            for statement in statements:  # a walsender before 15 takes one statement per query
                conn.execute(sql.Composed([statement]))
        else:  # one round trip (a simple query of several statements, run in order)
            conn.execute(sql.SQL("; ").join(statements))
    except BaseException:
        conn.close()
        raise
    return conn


def decoding_memory(kilobytes: int) -> sql.Composed:
    """Set this session's ``logical_decoding_work_mem`` to ``kilobytes``.

    For the replication connection (bemi.worker.unstream): a transaction whose decoded changes
    outgrow it is streamed to the worker before its commit. Small, so that the worker's own write
    of a large transaction into ``changes`` (decoded by this walsender too when ``changes`` is in
    the source database) is decoded and dropped while it is written, not all at once at its commit
    in front of the next change (about 0.3-1 s per 300,000 changes when it was)."""
    return sql.SQL("SELECT pg_catalog.set_config('logical_decoding_work_mem', {}, false)").format(
        sql.Literal(f"{int(kilobytes)}kB"))


R = TypeVar("R")


def one_row(cur: psycopg.Cursor[R]) -> R:
    """The row of a query that always returns one (psycopg types ``fetchone()`` as optional)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("a query that always returns a row returned none")
    return row
