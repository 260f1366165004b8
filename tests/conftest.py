"""Fixtures shared by every test area."""

from __future__ import annotations

import os

import pytest

from tests.pgcluster import ensure_test_cluster


@pytest.fixture(scope="session")
def pg_server():
    """The private PostgreSQL server of this run (host, port, user, dsn())."""
    return ensure_test_cluster()


@pytest.fixture(scope="session")
def pg_bindir() -> str:
    from tests.pgcluster import find_bindir

    return os.environ.get("BEMI_TEST_PGBINDIR") or find_bindir()


@pytest.fixture
def wal(django_db_setup, django_db_blocker):
    """A test_decoding slot on the test database, created before the test runs."""
    from tests.wal import WalReader, django_dsn

    with django_db_blocker.unblock():
        reader = WalReader(django_dsn())
    yield reader
    with django_db_blocker.unblock():
        reader.close()
