"""What a status says: ``Status`` and its parts, as plain data.

Kept apart from the code that reads them so the screen (``text.py``), the
``--json`` document (``Status.as_dict()``: the fields in this order) and the
health rules (``health.py``) all see one shape.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_ERROR = 0, 1, 2


@dataclass
class Worker:
    pid: int
    via: str  # "replication connection" or "slot held by a session"
    application_name: str | None = None
    client_addr: str | None = None
    backend_start: str | None = None
    state: str | None = None


@dataclass
class Slot:
    name: str
    exists: bool = False
    plugin: str | None = None
    database: str | None = None
    active: bool = False
    active_pid: int | None = None
    wal_status: str | None = None
    restart_lsn: str | None = None
    confirmed_flush_lsn: str | None = None
    retained_wal_bytes: int | None = None
    safe_wal_size: int | None = None


@dataclass
class Publication:
    name: str
    exists: bool = False
    all_tables: bool = False
    tables: int = 0


@dataclass
class Tables:
    tracked: int = 0
    missing_from_publication: list[str] = field(default_factory=list)
    without_trigger: list[str] = field(default_factory=list)
    without_replica_identity_full: list[str] = field(default_factory=list)
    rule: str = ""  # where the "tracked" rule came from


@dataclass
class Checkpoint:
    commit_lsn: str | None = None
    end_lsn: str | None = None
    committed_at: str | None = None
    age_seconds: float | None = None
    updated_at: str | None = None


@dataclass
class Status:
    healthy: bool
    problems: list[str]
    warnings: list[str]
    source_database: str
    destination_database: str
    server_version: int
    max_slot_wal_keep_size: str
    slot: Slot
    worker: Worker | None
    publication: Publication
    tables: Tables
    checkpoint: Checkpoint | None
    lag_bytes: int | None
    lag_seconds: float | None
    lag_seconds_source: str
    dead_letters: int
    max_lag_seconds: float
    max_retained_bytes: int
    checked_at: str
    #: Slots and publications an earlier Bemi worker left (bemi.leftovers), with the statement that drops each.
    leftovers: list[dict[str, Any]] = field(default_factory=list)
    #: The newest link of the chain of this source database (hex; bemi/chain.py): keep it outside the
    #: database, ``bemi_verify --head`` checks it later. None: no chain (yet), or not readable.
    chain_head: str | None = None
    #: With ``--nats``: the stream, the ingesters' consumer and its lag (bemi/status/nats.py), as a dict.
    nats: dict[str, Any] | None = None

    @property
    def worker_running(self) -> bool:
        return self.worker is not None

    @property
    def exit_code(self) -> int:
        return EXIT_HEALTHY if self.healthy else EXIT_UNHEALTHY

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["worker_running"] = self.worker_running
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str)
