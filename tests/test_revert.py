"""Revert: undo recorded changes on the source tables, newest first, in one transaction."""

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from bemi.models import BemiChange
from bemi.revert import RevertConflict, RevertError
from tests.queryapp.models import Item, Project, Todo
from tests.queryapp.fixtures import record_a_request

REQUEST = {"request_id": "r-1", "user_id": 7}


@pytest.fixture
def request_changes(recorder):
    return record_a_request(recorder, REQUEST)


def todos():
    return list(Todo.objects.order_by("id").values_list("id", "task", "is_completed"))


def test_revert_undoes_a_request(request_changes):
    assert todos() == [(1, "Slept", True), (3, "Repeat", False)]
    done = BemiChange.objects.context({"request_id": "r-1"}).revert()
    assert todos() == [(1, "Sleep", False), (2, "Eat", False)]
    assert [(a.action, a.primary_key, a.undone) for a in done] == [
        ("INSERT", "2", "DELETE"),
        ("UPDATE", "1", "UPDATE"),
        ("DELETE", "3", "CREATE"),
    ]
    ids = list(BemiChange.objects.context({"request_id": "r-1"}).desc().values_list("id", flat=True))
    assert [a.change_id for a in done] == ids
    assert str(done[0]) == f"INSERT todo 2 (undoes DELETE {ids[0]})"


def test_revert_of_nothing_does_nothing(request_changes):
    assert BemiChange.objects.context({"request_id": "other"}).revert() == []
    assert todos() == [(1, "Slept", True), (3, "Repeat", False)]


def test_a_later_change_outside_the_set_is_a_conflict(request_changes):
    with request_changes.track(Todo, 1, {"request_id": "r-2"}):
        Todo.objects.filter(id=1).update(task="Nap")
    later = BemiChange.objects.context({"request_id": "r-2"}).get()
    undone = BemiChange.objects.context({"request_id": "r-1"}).get(primary_key="1")
    with pytest.raises(RevertConflict) as error:
        BemiChange.objects.context({"request_id": "r-1"}).revert()
    message = str(error.value)
    assert f"change {later.id}" in message and f"change {undone.id}" in message
    assert "force=True" in message and "'request_id': 'r-2'" in message
    assert error.value.conflicting == later
    assert todos() == [(1, "Nap", True), (3, "Repeat", False)]  # nothing written

    # Reverting both requests undoes the newer one first.
    both = BemiChange.objects.filter(context__request_id__in=["r-1", "r-2"])
    both.revert()
    assert todos() == [(1, "Sleep", False), (2, "Eat", False)]


def test_force_overrides_a_conflict(request_changes):
    with request_changes.track(Todo, 1, {"request_id": "r-2"}):
        Todo.objects.filter(id=1).update(task="Nap")
    BemiChange.objects.context({"request_id": "r-1"}).revert(force=True)
    # The columns the request changed are back; the later rename is overwritten too (it was the same column).
    assert todos() == [(1, "Sleep", False), (2, "Eat", False)]


def test_a_change_the_worker_has_not_recorded_yet_is_a_conflict(request_changes):
    Todo.objects.filter(id=1).update(task="Unrecorded")
    with pytest.raises(RevertConflict, match="current values differ.*force=True"):
        BemiChange.objects.context({"request_id": "r-1"}).revert()
    Todo.objects.filter(id=3).delete()
    with pytest.raises(RevertConflict, match="no longer exists"):
        BemiChange.objects.context({"request_id": "r-1"}).created().revert()
    done = BemiChange.objects.context({"request_id": "r-1"}).revert(force=True)
    assert [a.action for a in done] == ["INSERT", "UPDATE", "NOTHING"]
    assert todos() == [(1, "Sleep", False), (2, "Eat", False)]


def test_restoring_a_deleted_row_whose_id_is_taken_again(request_changes):
    Todo.objects.create(id=2, task="Someone else")
    for force in (False, True):
        with pytest.raises(RevertError, match=r"Cannot restore row 2 of todo .* exists again\. Delete it"):
            BemiChange.objects.context({"request_id": "r-1"}).revert(force=force)
    assert todos() == [(1, "Slept", True), (2, "Someone else", False), (3, "Repeat", False)]


def test_revert_is_all_or_nothing(request_changes):
    """The newest change (the DELETE) is undone first; a failure later rolls it back."""
    Todo.objects.filter(id=3).update(task="Changed")  # makes the oldest change conflict, checked late
    with pytest.raises(RevertConflict):
        BemiChange.objects.context({"request_id": "r-1"}).revert()
    assert todos() == [(1, "Slept", True), (3, "Changed", False)]


def test_update_without_before_values_cannot_be_reverted(recorder):
    Todo.objects.create(id=5, task="x")
    recorder.add("todo", 5, "UPDATE", before={}, after={"id": 5, "task": "x", "is_completed": False})
    with pytest.raises(RevertError, match="REPLICA IDENTITY FULL"):
        BemiChange.objects.updated().revert()


def test_truncate_cannot_be_reverted(recorder):
    recorder.add("todo", None, "TRUNCATE")
    with pytest.raises(RevertError, match="only CREATE, UPDATE and DELETE"):
        BemiChange.objects.all().revert()


def test_revert_gives_back_exact_column_values(recorder):
    project = Project.objects.create(name="Home")
    ref = uuid.uuid4()
    values = dict(
        label="Lamp", project=project, price=Decimal("19.99"), due_at=dt.datetime(2024, 5, 1, 8, 30, 0, 123456, tzinfo=dt.timezone.utc),
        due_on=dt.date(2024, 5, 1), ref=ref, tags=["a", {"b": 1}], blob=b"\x00\xffhi", ratio=0.1,
    )
    item = Item.objects.create(**values)
    with recorder.track(Item, item.pk, {"step": 1}):
        Item.objects.filter(pk=item.pk).update(label="Other", price=1, due_at=None, ref=None, tags=[], blob=b"", ratio=2)
    BemiChange.objects.context({"step": 1}).revert()
    back = Item.objects.get(pk=item.pk)
    for name, value in values.items():
        got = getattr(back, name)
        assert (bytes(got) if name == "blob" else got) == value, name
    with recorder.track(Item, item.pk, {"step": 2}):
        Item.objects.filter(pk=item.pk).delete()
    BemiChange.objects.context({"step": 2}).revert()
    assert Item.objects.get(pk=item.pk).price == Decimal("19.99")


def test_tables_without_a_model_are_reverted_too(recorder):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute('CREATE TABLE "legacy notes" (code text PRIMARY KEY, body text)')
        cursor.execute("""INSERT INTO "legacy notes" VALUES ('a;b', 'new')""")
    recorder.add("legacy notes", "a;b", "UPDATE", before={"code": "a;b", "body": "old"}, after={"code": "a;b", "body": "new"})
    done = BemiChange.objects.filter(table="legacy notes").revert()
    assert [a.action for a in done] == ["UPDATE"]
    with connection.cursor() as cursor:
        cursor.execute('SELECT body FROM "legacy notes"')
        assert cursor.fetchall() == [("old",)]


def test_a_table_missing_on_the_source_database(recorder):
    recorder.add("dropped_table", 1, "CREATE", after={"id": 1})
    with pytest.raises(RevertError, match=r'"public"."dropped_table" does not exist on this database: pass revert\(using='):
        BemiChange.objects.filter(table="dropped_table").revert()


HOSTILE_COLUMN = 'x") = (SELECT 1); DELETE FROM revert_victim; --'


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE", "CREATE"])
def test_a_hostile_column_name_cannot_inject_sql(recorder, operation):
    """Issue 9, item 3: identifiers are quoted by psycopg (a `"` doubled), not pasted."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE revert_victim (id int PRIMARY KEY)")
        cursor.execute("INSERT INTO revert_victim SELECT generate_series(1, 20)")
        # `x` exists too, so that the injected `UPDATE trap SET ("x") = (SELECT 1);` is valid SQL.
        cursor.execute('CREATE TABLE trap (id int PRIMARY KEY, x int, "' + HOSTILE_COLUMN.replace('"', '""') + '" text)')
        if operation != "DELETE":
            cursor.execute("INSERT INTO trap VALUES (1, NULL, 'new')")
    old, new = {"id": 1, "x": None, HOSTILE_COLUMN: "old"}, {"id": 1, "x": None, HOSTILE_COLUMN: "new"}
    recorder.add("trap", 1, operation, before={} if operation == "CREATE" else old,
                 after={} if operation == "DELETE" else new)
    try:
        BemiChange.objects.filter(table="trap").revert()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM revert_victim")
            assert cursor.fetchone()[0] == 20, "the column name's SQL ran"
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM trap")
        assert cursor.fetchall() == ([] if operation == "CREATE" else [(1, None, "old")])


def test_a_percent_sign_in_a_name_is_not_a_placeholder(recorder):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute('CREATE TABLE "100%s" (id int PRIMARY KEY, "%(x)s" text)')
        cursor.execute("""INSERT INTO "100%s" VALUES (1, 'new')""")
    recorder.add("100%s", 1, "UPDATE", before={"id": 1, "%(x)s": "old"}, after={"id": 1, "%(x)s": "new"})
    BemiChange.objects.filter(table="100%s").revert()
    with connection.cursor() as cursor:
        cursor.execute('SELECT * FROM "100%s"')
        assert cursor.fetchall() == [(1, "old")]


def test_the_catalog_is_read_once_per_table(recorder):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for i in range(1, 6):
        Todo.objects.create(id=i, task="t")
        recorder.add("todo", i, "CREATE", after={"id": i, "task": "t", "is_completed": False})
    with CaptureQueriesContext(connection) as queries:
        BemiChange.objects.filter(table="todo").revert()
    catalog = [q["sql"] for q in queries.captured_queries if "pg_catalog.pg_class" in q["sql"]]
    assert len(catalog) == 1
