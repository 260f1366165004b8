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
