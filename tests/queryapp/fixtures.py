"""Fixtures of the query tests (imported by the test modules that use them)."""

import pytest
from django.db import connection

from tests.queryapp.factory import Recorder, create_changes_table


@pytest.fixture
def recorder(db):
    """A `changes` table (rolled back with the test) and a recorder writing into it."""
    create_changes_table()
    return Recorder()


@pytest.fixture
def tx_recorder(transactional_db):
    """The same for tests that commit: `changes` is emptied before and after."""
    create_changes_table()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE changes")
    yield Recorder()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE changes")


@pytest.fixture
def http_settings(settings):
    """Settings for requests; drops BemiMiddleware while this branch predates it."""
    import importlib.util

    if importlib.util.find_spec("bemi.middleware") is None:
        settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if m != "bemi.BemiMiddleware"]
    return settings
