"""Fixtures of the query tests (registered in tests/conftest.py with pytest_plugins)."""

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
    """The same for tests that commit: leaves `changes` as it found it (absent, or emptied)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('bemi.changes') IS NOT NULL")
        existed = cursor.fetchone()[0]
    create_changes_table()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE bemi.changes")
    yield Recorder()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE bemi.changes" if existed else "DROP TABLE bemi.changes")


def record_a_request(recorder, context):
    """Before the request: todos 1 and 2. The request creates 3, completes 1 and deletes 2."""
    from tests.queryapp.models import Todo

    Todo.objects.create(id=1, task="Sleep")
    Todo.objects.create(id=2, task="Eat")
    with recorder.track(Todo, 3, context):
        Todo.objects.create(id=3, task="Repeat")
    with recorder.track(Todo, 1, context):
        Todo.objects.filter(id=1).update(is_completed=True, task="Slept")
    with recorder.track(Todo, 2, context):
        Todo.objects.filter(id=2).delete()
    return recorder
