"""Helpers for reading what the execute wrapper put into the WAL."""

from __future__ import annotations

import contextlib
from typing import Iterator

import psycopg

from bemi_devtools.wal import Record


def tracked(records: list[Record], allow_empty: bool = False) -> list[tuple[Record, list[Record]]]:
    """Each ``_bemi`` message with the row changes that follow it in the same transaction.

    Fails if a message is not immediately followed by a row change of its own
    transaction (the worker stitches a message to the changes after it),
    unless ``allow_empty`` (a statement that changed no row).
    """
    result: list[tuple[Record, list[Record]]] = []
    for index, record in enumerate(records):
        if record.kind != "MESSAGE" or record.prefix != "_bemi":
            continue
        assert record.transactional, record
        rows = []
        for following in records[index + 1:]:
            if following.xid != record.xid or following.kind in ("COMMIT", "MESSAGE"):
                break
            if following.kind != "BEGIN":  # test_decoding repeats BEGIN after a message
                rows.append(following)
        assert rows or allow_empty, f"message without a row change after it: {record}"
        result.append((record, rows))
    return result


def row_changes(records: list[Record], table: str = "") -> list[Record]:
    return [r for r in records if r.kind in ("INSERT", "UPDATE", "DELETE") and table in r.table]


@contextlib.contextmanager
def sql_as_sent(connection) -> Iterator[list[tuple[str, object]]]:
    """Record (sql, params) as Django sent them: what an application's execute wrapper sees."""
    seen: list[tuple[str, object]] = []

    def capture(execute, sql, params, many, context):
        seen.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(capture):
        yield seen


@contextlib.contextmanager
def sql_as_executed(connection) -> Iterator[list[tuple[str, object]]]:
    """Record (sql, params) as psycopg receives them on this connection, after bemi's hook.

    A spy on psycopg's ``Cursor.execute``/``executemany`` (every cursor class
    inherits them, bemi's own message cursor too); the database is real.
    """
    seen: list[tuple[str, object]] = []
    connection.ensure_connection()
    raw = connection.connection
    execute, executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany

    def spy_execute(self, query, params=None, **kwargs):
        if self.connection is raw:
            seen.append((query, params))
        return execute(self, query, params, **kwargs)

    def spy_executemany(self, query, params_seq, **kwargs):
        if self.connection is raw:
            seen.append((query, params_seq))
        return executemany(self, query, params_seq, **kwargs)

    psycopg.Cursor.execute, psycopg.Cursor.executemany = spy_execute, spy_executemany
    try:
        yield seen
    finally:
        psycopg.Cursor.execute, psycopg.Cursor.executemany = execute, executemany
