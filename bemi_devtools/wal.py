"""Read what really reached the write-ahead log, through a test_decoding slot.

``WalReader(dsn)`` creates a temporary logical slot, and ``read()`` returns
what was decoded since then, one entry per record, in WAL order. Only
committed transactions appear, which is exactly what the worker would see.
Tests use it through the ``wal`` fixture (tests/conftest.py), bench/compare.py
to count what each alternative wrote. psycopg only (bench/compare.py loads
this file by path into other virtual environments).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

import psycopg

_MESSAGE = re.compile(r"message: transactional: (\d) prefix: (.*?), sz: (\d+) content:(.*)\Z", re.S)
_TABLE = re.compile(r"table (\S+?)\.(\S+?): (INSERT|UPDATE|DELETE|TRUNCATE):?(.*)\Z", re.S)
_counter = itertools.count()


@dataclass
class Record:
    lsn: str
    xid: int
    kind: str  # BEGIN, COMMIT, MESSAGE, INSERT, UPDATE, DELETE, TRUNCATE
    table: str = ""
    prefix: str = ""
    transactional: bool = False
    content: str = ""
    data: str = ""

    @property
    def json(self) -> Any:
        return json.loads(self.content)


class WalReader:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.slot = f"bemi_test_{next(_counter)}_{id(self) % 100000}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [self.slot])

    def read(self) -> list[Record]:
        """Everything decoded since the last read (consumes it)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_get_changes("
                "%s, NULL, NULL, 'include-xids', '0', 'skip-empty-xacts', '1')",
                [self.slot],
            ).fetchall()
        return [self._parse(lsn, xid, data) for lsn, xid, data in rows]

    def messages(self, prefix: str = "_bemi") -> list[Record]:
        return [r for r in self.read() if r.kind == "MESSAGE" and r.prefix == prefix]

    def close(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                [self.slot],
            )

    @staticmethod
    def _parse(lsn: str, xid: int, data: str) -> Record:
        if data.startswith("BEGIN"):
            return Record(lsn, xid, "BEGIN", data=data)
        if data.startswith("COMMIT"):
            return Record(lsn, xid, "COMMIT", data=data)
        m = _MESSAGE.match(data)
        if m:
            return Record(lsn, xid, "MESSAGE", prefix=m[2], transactional=m[1] == "1", content=m[4], data=data)
        m = _TABLE.match(data)
        if m:
            return Record(lsn, xid, m[3], table=f"{m[1]}.{m[2]}", data=data)
        return Record(lsn, xid, "OTHER", data=data)

