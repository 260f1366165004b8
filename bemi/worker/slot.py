"""The replication slot as the worker sees it: its state, who holds it, and whether it may be read (pure).

The slot is also what keeps two workers apart: only one process at a time can hold it, and only a
role with REPLICATION (or a superuser) can hold it at all (bemi/worker/runner.py, ``_wait_for_slot``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from bemi.worker.errors import WorkerError

__all__ = ["SlotState", "SlotHolder", "check_slot"]


@dataclass
class SlotState:
    plugin: str
    database: str
    wal_status: str | None
    confirmed_flush: int


@dataclass(frozen=True)
class SlotHolder:
    """The process holding the slot now (a walsender, or a session decoding it)."""

    pid: int
    application_name: str
    backend_start: datetime | None

    def describe(self) -> str:
        since = f", since {self.backend_start:%Y-%m-%d %H:%M:%S}" if self.backend_start else ""
        name = f", application_name {self.application_name!r}" if self.application_name else ""
        return f"backend pid {self.pid}{name}{since}"


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
