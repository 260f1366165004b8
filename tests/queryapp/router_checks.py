"""Run by tests/test_query_router.py in a subprocess with tests.queryapp.settings_router."""

import pytest
from django.db import connections, transaction
from django.db.utils import ProgrammingError

from bemi.models import BemiChange
from tests.queryapp.factory import BASE, Recorder, create_changes_table
from tests.queryapp.models import Todo

pytestmark = pytest.mark.django_db(databases=["default", "bemi"])


def count_changes(alias):
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM bemi.changes")
        return cursor.fetchone()[0]


def test_changes_are_read_and_written_on_the_bemi_alias():
    create_changes_table("bemi")
    recorder = Recorder()  # no alias: the router decides
    with recorder.track(Todo, 1, {"request_id": "r"}):
        Todo.objects.create(id=1, task="Sleep")
    with recorder.track(Todo, 1, {"request_id": "r"}):
        Todo.objects.filter(id=1).update(task="Nap")
    assert count_changes("bemi") == 2
    with pytest.raises(ProgrammingError), transaction.atomic(using="default"), connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1 FROM bemi.changes")  # nothing on the source database
    assert BemiChange.objects.db == "bemi" and BemiChange.objects.all().db == "bemi"

    todo = Todo.objects.get(id=1)
    assert [c.operation for c in todo.bemi_changes()] == ["CREATE", "UPDATE"]
    assert [c.operation for c in todo.bemi_changes("task").context({"request_id": "r"}).desc()] == ["UPDATE", "CREATE"]
    assert todo.bemi_as_of(BASE).task == "Sleep"
    assert [v.record.task for v in Todo.bemi_history(1)] == ["Sleep", "Nap"]

    # Revert reads changes from `bemi` and writes the rows on the source database.
    done = BemiChange.objects.context({"request_id": "r"}).revert()
    assert [a.action for a in done] == ["UPDATE", "DELETE"]
    assert not Todo.objects.filter(id=1).exists()


def test_migration_installs_on_the_source_database_only():
    def has_trigger_function(alias):
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_proc WHERE proname = '_bemi_row_trigger_func'")
            return cursor.fetchone()[0] == 1

    assert has_trigger_function("default")
    assert not has_trigger_function("bemi")
