"""Time travel: a row as it was, rebuilt from its recorded changes."""

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from bemi.models import BemiChange
from bemi.timetravel import TimeTravelError, UnknownTableError
from tests.queryapp.factory import BASE
from tests.queryapp.models import Item, Project, Todo

UTC = dt.timezone.utc


def at(seconds: float) -> dt.datetime:
    return BASE + dt.timedelta(seconds=seconds)


@pytest.fixture
def todo(recorder):
    """Created at +0s, renamed at +2s, completed at +4s, deleted at +6s, created again at +8s."""
    with recorder.track(Todo, 1):
        Todo.objects.create(id=1, task="Sleep")
    with recorder.track(Todo, 1):
        Todo.objects.filter(id=1).update(task="Sleep well")
    with recorder.track(Todo, 1):
        Todo.objects.filter(id=1).update(is_completed=True)
    with recorder.track(Todo, 1):
        Todo.objects.filter(id=1).delete()
    with recorder.track(Todo, 1):
        Todo.objects.create(id=1, task="Again")
    return Todo.objects.get(id=1)


def state(record):
    return None if record is None else (record.task, record.is_completed)


def test_as_of_gives_each_version(todo):
    assert todo.bemi_as_of(at(-1)) is None
    assert state(todo.bemi_as_of(at(0))) == ("Sleep", False)
    assert state(todo.bemi_as_of(at(1.5))) == ("Sleep", False)
    assert state(todo.bemi_as_of(at(2))) == ("Sleep well", False)
    assert state(todo.bemi_as_of(at(5))) == ("Sleep well", True)
    assert todo.bemi_as_of(at(7)) is None
    assert state(todo.bemi_as_of(at(100))) == ("Again", False)


def test_as_of_returns_an_unsaved_instance(todo):
    old = todo.bemi_as_of(at(3))
    assert isinstance(old, Todo) and old.pk == 1 and old._state.adding
    assert Todo.objects.get(pk=1).task == "Again"  # nothing written


def test_as_of_in_another_time_zone(todo):
    paris = dt.timezone(dt.timedelta(hours=1))
    assert state(todo.bemi_as_of(at(5).astimezone(paris))) == ("Sleep well", True)


def test_as_of_by_table_name_gives_a_dict(todo):
    assert BemiChange.objects.as_of("todo", 1, at(3)) == {"id": 1, "task": "Sleep well", "is_completed": False}
    assert BemiChange.objects.as_of("todo", "1", at(7)) is None
    assert BemiChange.objects.as_of(Todo, 1, at(3)).task == "Sleep well"


def test_history_iterates_over_versions(todo):
    versions = list(Todo.bemi_history(1))
    assert [(v.change.operation, state(v.record)) for v in versions] == [
        ("CREATE", ("Sleep", False)),
        ("UPDATE", ("Sleep well", False)),
        ("UPDATE", ("Sleep well", True)),
        ("DELETE", None),
        ("CREATE", ("Again", False)),
    ]


def test_row_older_than_tracking_uses_the_first_before(recorder):
    Todo.objects.create(id=9, task="Old")  # not recorded
    with recorder.track(Todo, 9):
        Todo.objects.filter(id=9).update(task="New")
    assert state(BemiChange.objects.as_of(Todo, 9, at(-10))) == ("Old", False)
    assert state(BemiChange.objects.as_of(Todo, 9, at(10))) == ("New", False)


def test_row_older_than_tracking_without_before_values_is_an_error(recorder):
    recorder.add("todo", 9, "UPDATE", before={}, after={"id": 9, "task": "New", "is_completed": False})
    with pytest.raises(TimeTravelError, match="REPLICA IDENTITY FULL"):
        BemiChange.objects.as_of(Todo, 9, at(-10))


def test_field_values_come_back_as_python_values(recorder):
    project = Project.objects.create(name="Home")
    ref = uuid.uuid4()
    with recorder.track(Item, 1):
        Item.objects.create(
            id=1, label="Lamp", project=project, price=Decimal("19.99"), due_at=dt.datetime(2024, 5, 1, 8, 30, 0, 123456, tzinfo=UTC),
            due_on=dt.date(2024, 5, 1), ref=ref, tags=["a", {"b": 1}], blob=b"\x00\xffhi", ratio=0.1,
        )
    with recorder.track(Item, 1):
        Item.objects.filter(id=1).update(label="Big lamp", price=Decimal("1000.10"))
    old = Item(id=1).bemi_as_of(at(1))
    assert old.label == "Lamp" and old.project_id == project.pk and old.project == project
    assert old.price == Decimal("19.99") and str(old.price) == "19.99"
    assert old.due_at == dt.datetime(2024, 5, 1, 8, 30, 0, 123456, tzinfo=UTC)
    assert old.due_on == dt.date(2024, 5, 1)
    assert old.ref == ref
    assert old.tags == ["a", {"b": 1}]
    assert bytes(old.blob) == b"\x00\xffhi"
    assert old.ratio == 0.1
    assert BemiChange.objects.as_of(Item, 1, at(3)).price == Decimal("1000.10")


def test_bad_when(todo):
    with pytest.raises(ValueError, match=r"naive datetime.*make_aware"):
        todo.bemi_as_of(dt.datetime(2023, 12, 11, 17, 9, 12))
    with pytest.raises(TypeError, match="timezone-aware datetime"):
        todo.bemi_as_of("2023-12-11")
    with pytest.raises(TypeError, match="timezone-aware datetime"):
        todo.bemi_as_of(dt.date(2023, 12, 11))


def test_unknown_table(recorder):
    with pytest.raises(UnknownTableError, match="Unknown table 'todos'"):
        BemiChange.objects.as_of("todos", 1, at(0))
