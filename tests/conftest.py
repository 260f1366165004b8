"""Fixtures shared by every test area.

Fixture modules of one area register here once (``pytest_plugins``), so a test
module uses ``recorder`` or ``worker_env`` by naming it, without importing it.
"""

from __future__ import annotations

import os

import pytest

from bemi_devtools.pgcluster import ensure_test_cluster, find_bindir
from bemi_devtools.wal import WalReader
from tests.db import db_dsn

pytest_plugins = [
    "tests.queryapp.fixtures",  # recorder, tx_recorder: `changes` rows written like the worker writes them
    "tests.scratch",  # scratch: a fresh database of the test's own
    "tests.workerapp.harness",  # worker_env: a slot and publication of the test's own, the worker in or out of process
    "tests.natsfixtures",  # nats_server: a private nats-server with JetStream (docs/scale-out.md)
]


@pytest.fixture(scope="session")
def pg_server():
    """The private PostgreSQL server of this run (host, port, user, dsn())."""
    return ensure_test_cluster()


@pytest.fixture(scope="session")
def pg_bindir() -> str:
    return os.environ.get("BEMI_TEST_PGBINDIR") or find_bindir()


@pytest.fixture
def wal(django_db_setup, django_db_blocker):
    """A test_decoding slot on the test database, created before the test runs."""
    with django_db_blocker.unblock():
        reader = WalReader(db_dsn())
    yield reader
    with django_db_blocker.unblock():
        reader.close()
