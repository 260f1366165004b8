"""Table-level time travel: every row of a table at a moment, from today's rows and the changes since."""

import datetime as dt
import uuid
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import Q
from django.test.utils import CaptureQueriesContext

from bemi.models import BemiChange
from bemi.table_as_of import MaskedValueError
from bemi.timetravel import HistoryPrunedError, TimeTravelError
from tests.queryapp.factory import BASE
from tests.queryapp.models import Item, Project, Todo

UTC = dt.timezone.utc


def at(seconds: float) -> dt.datetime:
    return BASE + dt.timedelta(seconds=seconds)


@pytest.fixture
def todos(recorder):
    """Rows 1-4 written before tracking; then (2 s apart from +0 s): 2 renamed, 3 deleted, 5 created,
    2 renamed again, 1 completed."""
    for pk, task in [(1, "a"), (2, "b"), (3, "c"), (4, "d")]:
        Todo.objects.create(id=pk, task=task)
    with recorder.track(Todo, 2):
        Todo.objects.filter(id=2).update(task="b2")
    with recorder.track(Todo, 3):
        Todo.objects.filter(id=3).delete()
    with recorder.track(Todo, 5):
        Todo.objects.create(id=5, task="e")
    with recorder.track(Todo, 2):
        Todo.objects.filter(id=2).update(task="b3")
    with recorder.track(Todo, 1):
        Todo.objects.filter(id=1).update(is_completed=True)
    return recorder


def rows(records):
    return [(r.pk, r.task, r.is_completed) for r in records]


def test_the_table_at_each_moment(todos):
    assert rows(Todo.bemi_table_as_of(at(-1))) == [(1, "a", False), (2, "b", False), (3, "c", False), (4, "d", False)]
    assert rows(Todo.bemi_table_as_of(at(3))) == [(1, "a", False), (2, "b2", False), (4, "d", False)]
    assert rows(Todo.bemi_table_as_of(at(7))) == [(1, "a", False), (2, "b3", False), (4, "d", False), (5, "e", False)]
    assert rows(Todo.bemi_table_as_of(at(100))) == rows(Todo.objects.order_by("pk"))
    assert rows(BemiChange.objects.table_as_of(Todo, at(3))) == rows(Todo.bemi_table_as_of(at(3)))


def test_instances_are_unsaved_and_nothing_is_written(todos):
    old = Todo.bemi_table_as_of(at(-1))
    assert all(isinstance(r, Todo) and r._state.adding and r._state.db is None for r in old)
    assert all(r.bemi_unknown_fields == frozenset() for r in old)
    assert rows(Todo.objects.order_by("pk")) == [(1, "a", True), (2, "b3", False), (4, "d", False), (5, "e", False)]


def test_a_filter_selects_rows_by_their_values_then(todos):
    assert rows(Todo.bemi_table_as_of(at(-1), task="b")) == [(2, "b", False)]
    assert rows(Todo.bemi_table_as_of(at(-1), Q(task__in=["b3", "c"]))) == [(3, "c", False)]
    assert rows(Todo.bemi_table_as_of(at(-1), {"task__gte": "c"})) == [(3, "c", False), (4, "d", False)]
    assert rows(Todo.bemi_table_as_of(at(9), is_completed=False)) == [(2, "b3", False), (4, "d", False), (5, "e", False)]
    # a queryset of the model: its filter and its order
    assert rows(Todo.bemi_table_as_of(at(3), Todo.objects.filter(id__lte=3).order_by("-task"))) == [
        (2, "b2", False), (1, "a", False)]
    assert Todo.bemi_table_as_of(at(-1), pk=5) == []


def test_one_query_on_changes_and_one_on_the_table(todos):
    with CaptureQueriesContext(connection) as queries:
        Todo.bemi_table_as_of(at(3), task__startswith="b")
    on_changes = [q["sql"] for q in queries if 'FROM "bemi"."changes"' in q["sql"]]
    assert len(on_changes) == 1 and "DISTINCT ON" in on_changes[0] and '"committed_at" >' in on_changes[0]
    rebuilt = [q["sql"] for q in queries if q["sql"].startswith('WITH "todo" AS')]
    assert len(rebuilt) == 1 and '"todo"."task"::text LIKE' in rebuilt[0]


def test_a_filter_on_the_primary_key_keeps_the_index(todos):
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE todo")
        cursor.execute("SET enable_seqscan = off")
    with CaptureQueriesContext(connection) as queries:
        assert rows(Todo.bemi_table_as_of(at(-1), pk=4)) == [(4, "d", False)]
    sql = [q["sql"] for q in queries if q["sql"].startswith("WITH")][0]
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql)
        plan = "\n".join(r[0] for r in cursor.fetchall())
    assert "todo_pkey" in plan


def test_field_values_come_back_as_python_values(recorder):
    project = Project.objects.create(name="Home")
    ref = uuid.uuid4()
    moment = dt.datetime(2024, 5, 1, 8, 30, 0, 123456, tzinfo=UTC)
    Item.objects.create(id=1, label="Lamp", project=project, price=Decimal("123456.78"), due_at=moment,
                        due_on=dt.date(2024, 5, 1), ref=ref, tags=["a", {"b": 1.5}], blob=b"\x00\xffhi", ratio=0.1)
    Item.objects.create(id=2, label="Chair", price=Decimal("0.10"))
    with recorder.track(Item, 1):
        Item.objects.filter(id=1).update(label="Big lamp", price=Decimal("1.00"), tags=[])
    with recorder.track(Item, 2):
        Item.objects.filter(id=2).delete()
    old = {item.pk: item for item in Item.bemi_table_as_of(at(-1))}
    assert old[1].label == "Lamp" and old[1].project_id == project.pk
    assert isinstance(old[1].price, Decimal) and str(old[1].price) == "123456.78"
    assert old[1].due_at == moment and old[1].due_on == dt.date(2024, 5, 1) and old[1].ref == ref
    assert old[1].tags == ["a", {"b": 1.5}] and bytes(old[1].blob) == b"\x00\xffhi" and old[1].ratio == 0.1
    assert str(old[2].price) == "0.10" and old[2].label == "Chair"
    assert [i.pk for i in Item.bemi_table_as_of(at(-1), label="Lamp", price=Decimal("123456.78"))] == [1]
    # related tables are today's; select_related works on the rebuilt rows
    with_project = Item.bemi_table_as_of(at(-1), Item.objects.select_related("project").filter(project__name="Home"))
    assert [(i.pk, i.label) for i in with_project] == [(1, "Lamp")]
    with CaptureQueriesContext(connection) as queries:
        assert with_project[0].project.name == "Home"
    assert len(queries) == 0


def test_a_table_name_gives_dicts(todos):
    assert BemiChange.objects.table_as_of("todo", at(3)) == [
        {"id": 1, "task": "a", "is_completed": False},
        {"id": 2, "task": "b2", "is_completed": False},
        {"id": 4, "task": "d", "is_completed": False},
    ]
    with pytest.raises(TypeError, match="needs the model"):
        BemiChange.objects.table_as_of("todo", at(3), task="a")


def test_a_masked_value_is_never_invented(recorder):
    Todo.objects.create(id=1, task="today")
    Todo.objects.create(id=2, task="kept")
    recorder.add("todo", 1, "UPDATE", before={"id": 1, "task": "bemi-masked:0123456789abcdef01234567", "is_completed": False},
                 after={"id": 1, "task": "bemi-masked:ffffffffffffffffffffffff", "is_completed": False})
    with pytest.raises(MaskedValueError, match=r"1 row\(s\) need a masked value.*1 \(task\).*masked='none'") as caught:
        Todo.bemi_table_as_of(at(-1))
    assert caught.value.fields == {"1": ["task"]}
    old = Todo.bemi_table_as_of(at(-1), masked="none")
    assert rows(old) == [(1, None, False), (2, "kept", False)]
    assert old[0].bemi_unknown_fields == {"task"} and old[1].bemi_unknown_fields == frozenset()
    assert rows(Todo.bemi_table_as_of(at(-1), pk=2)) == [(2, "kept", False)]  # rows that need none: no error


def test_a_masked_value_of_another_type_and_a_missing_column(recorder):
    Todo.objects.create(id=1, task="today", is_completed=True)
    recorder.add("todo", 1, "DELETE", before={"id": 1, "is_completed": "bemi-masked:0123456789abcdef01234567"})
    Todo.objects.filter(id=1).delete()
    with pytest.raises(MaskedValueError):
        Todo.bemi_table_as_of(at(-1))
    old = Todo.bemi_table_as_of(at(-1), masked="none")
    assert rows(old) == [(1, None, None)]  # task: not recorded (an ignored column); is_completed: masked
    assert old[0].bemi_unknown_fields == {"task", "is_completed"}


def test_a_masked_primary_key_is_an_error(recorder):
    """A masked key column (authtoken_token.key) is masked in changes.primary_key too: nothing to match rows by."""
    Todo.objects.create(id=1, task="a")
    recorder.add("todo", "bemi-masked:0123456789abcdef0123456789abcdef", "UPDATE",
                 before={"id": "bemi-masked:0123456789abcdef0123456789abcdef", "task": "x", "is_completed": False},
                 after={"id": "bemi-masked:0123456789abcdef0123456789abcdef", "task": "a", "is_completed": False})
    with pytest.raises(MaskedValueError, match="its primary key is masked"):
        Todo.bemi_table_as_of(at(-1), masked="none")


def test_pruned_history_is_an_error(todos):
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO bemi._bemi_pruned (pruned_before) VALUES (%s)", [at(5)])
    with pytest.raises(HistoryPrunedError, match="Cannot tell the table public.todo as of .* was pruned") as caught:
        Todo.bemi_table_as_of(at(3))
    assert caught.value.pruned_before == at(5)
    assert rows(Todo.bemi_table_as_of(at(7))) == [(1, "a", False), (2, "b3", False), (4, "d", False), (5, "e", False)]


def test_what_the_history_cannot_tell(recorder):
    Todo.objects.create(id=1, task="a")
    recorder.add("todo", 1, "UPDATE", before={}, after={"id": 1, "task": "a", "is_completed": False})
    with pytest.raises(TimeTravelError, match="REPLICA IDENTITY FULL"):
        Todo.bemi_table_as_of(at(-1))
    recorder.add("todo", None, "TRUNCATE")
    with pytest.raises(TimeTravelError, match="TRUNCATE"):
        Todo.bemi_table_as_of(at(-1))


def test_bad_arguments(todos):
    with pytest.raises(ValueError, match="masked must be one of"):
        Todo.bemi_table_as_of(at(0), masked="guess")
    with pytest.raises(TypeError, match="filter must be a Q"):
        Todo.bemi_table_as_of(at(0), "task=a")
    with pytest.raises(TypeError, match="filters Item, not Todo"):
        Todo.bemi_table_as_of(at(0), Item.objects.all())
    with pytest.raises(ValueError, match="naive datetime"):
        Todo.bemi_table_as_of(dt.datetime(2023, 12, 11))


HOSTILE_TABLE = 'odd "{x}" %s'
HOSTILE_COLUMN = 'x") = (SELECT 1); DELETE FROM todo; --'


def test_hostile_names_are_quoted(recorder):
    with connection.cursor() as cursor:
        cursor.execute('CREATE TABLE "odd ""{x}"" %s" (id int PRIMARY KEY, "x"") = (SELECT 1); DELETE FROM todo; --" text)')
        cursor.execute('INSERT INTO "odd ""{x}"" %%s" VALUES (1, %s), (2, %s)', ["now", "two"])
    Todo.objects.create(id=1, task="safe")
    recorder.add(HOSTILE_TABLE, 1, "UPDATE", before={"id": 1, HOSTILE_COLUMN: "then"}, after={"id": 1, HOSTILE_COLUMN: "now"})
    recorder.add(HOSTILE_TABLE, 3, "DELETE", before={"id": 3, HOSTILE_COLUMN: "gone"})
    assert BemiChange.objects.table_as_of(HOSTILE_TABLE, at(-1)) == [
        {"id": 1, HOSTILE_COLUMN: "then"}, {"id": 2, HOSTILE_COLUMN: "two"}, {"id": 3, HOSTILE_COLUMN: "gone"}]
    assert Todo.objects.count() == 1
