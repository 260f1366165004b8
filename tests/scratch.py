"""``scratch``: a database of the test's own, for tests that set one up from nothing (upgrades, takeover)."""

from __future__ import annotations

import uuid

import psycopg
import pytest


@pytest.fixture
def scratch(pg_server):
    """A fresh database's name; dropped afterwards with any replication slot on it."""
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield name
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                     [name])
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
