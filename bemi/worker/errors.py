"""What stops the worker, and the checks that decide it (no connection of its own).

The source, the sink and the loop all raise ``WorkerError``; it lives here so
that the sink does not import the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import psycopg

__all__ = ["WorkerError", "SlotState", "check_slot", "one_row"]


class WorkerError(RuntimeError):
    """A condition the operator must fix; the worker exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class SlotState:
    plugin: str
    database: str
    wal_status: str | None
    confirmed_flush: int


R = TypeVar("R")


def one_row(cur: psycopg.Cursor[R]) -> R:
    """The row of a query that always returns one (psycopg types ``fetchone()`` as optional)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("a query that always returns a row returned none")
    return row


def check_slot(state: SlotState, slot: str, database: str) -> None:
    """Refuse a slot the worker cannot read safely (wrong kind, or invalidated)."""
    if state.plugin != "pgoutput" or state.database != database:
        raise WorkerError(
            f"replication slot {slot!r} exists but is for plugin {state.plugin!r} on database "
            f"{state.database!r}; the worker needs a pgoutput slot on {database!r}. Use another --slot."
        )
    if state.wal_status == "lost":
        raise WorkerError(
            f"replication slot {slot!r} is invalidated (wal_status = 'lost'): the WAL it needed was "
            "removed, so changes were lost. The worker will not recreate it silently: investigate, drop the "
            "slot and the checkpoint row in _bemi_worker_checkpoints, then start again."
        )
