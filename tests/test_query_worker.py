"""End to end: ORM writes -> WAL -> the worker -> BemiChange queries, time travel and revert."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest
from django.core.management import call_command

import bemi
from bemi.models import BemiChange
from bemi.revert import RevertConflict
from tests.queryapp.models import Item, Project, Todo


def drain(env) -> None:
    """Run the worker once through the management command, on this test's slot."""
    call_command("bemi_worker", "--once", "--slot", env.slot, "--publication", env.publication, verbosity=0)


@pytest.fixture
def tracked(worker_env):
    drain(worker_env)  # creates the publication, the slot and `changes`
    return worker_env


def ops(queryset):
    return [(c.primary_key, c.operation) for c in queryset]


def test_product_page_scenario_through_the_worker(tracked):
    with bemi.context(user_id=187234, endpoint="/todo", method="POST"):
        for pk, task in [(26, "Sleep"), (27, "Eat"), (28, "Repeat")]:
            Todo.objects.create(id=pk, task=task)
    with bemi.context(user_id=187234, endpoint="/todo/complete", method="PUT"):
        Todo.objects.filter(id=26).update(is_completed=True)
    with bemi.context(user_id=187234, endpoint="/todo/27", method="DELETE"):
        Todo.objects.filter(id=27).delete()
    drain(tracked)

    todo = Todo.objects.get(id=26)
    assert ops(todo.bemi_changes()) == [("26", "CREATE"), ("26", "UPDATE")]
    update = todo.bemi_changes().updated().get()
    assert update.diff() == {"is_completed": [False, True]}
    assert update.before == {"id": 26, "task": "Sleep", "is_completed": False}  # REPLICA IDENTITY FULL
    assert update.context["endpoint"] == "/todo/complete" and update.context["SQL"].startswith('UPDATE "todo"')
    assert ops(BemiChange.objects.field_changed("todo", 26, "is_completed")) == [("26", "CREATE"), ("26", "UPDATE")]
    assert ops(todo.bemi_changes("task")) == [("26", "CREATE")]
    assert ops(BemiChange.objects.context({"method": "DELETE"})) == [("27", "DELETE")]
    assert ops(BemiChange.objects.before({"task": "Eat"}).deleted()) == [("27", "DELETE")]
    assert ops(BemiChange.objects.after({"task": "Eat"}).context_not({"method": "DELETE"})) == [("27", "CREATE")]
    assert ops(BemiChange.objects.created().desc()) == [("28", "CREATE"), ("27", "CREATE"), ("26", "CREATE")]
    assert BemiChange.objects.after_not({"is_completed": False}).count() == 2

    # Time travel at the recorded commit times.
    created = todo.bemi_changes().created().get()
    assert todo.bemi_as_of(created.committed_at - dt.timedelta(microseconds=1)) is None
    assert todo.bemi_as_of(created.committed_at).is_completed is False
    assert todo.bemi_as_of(update.committed_at).is_completed is True
    deleted = BemiChange.objects.deleted().get()
    assert BemiChange.objects.as_of("todo", 27, deleted.committed_at - dt.timedelta(microseconds=1)) == {
        "id": 27, "task": "Eat", "is_completed": False}
    assert BemiChange.objects.as_of(Todo, 27, deleted.committed_at) is None
    assert [(v.change.operation, v.record and v.record.task) for v in Todo.bemi_history(27)] == [
        ("CREATE", "Eat"), ("DELETE", None)]


def test_revert_through_the_worker(tracked):
    Todo.objects.create(id=1, task="Sleep")
    Todo.objects.create(id=2, task="Eat")
    with bemi.context(request_id="r-1"):
        Todo.objects.create(id=3, task="Repeat")
        Todo.objects.filter(id=1).update(task="Slept", is_completed=True)
        Todo.objects.filter(id=2).delete()
    drain(tracked)

    request = BemiChange.objects.context({"request_id": "r-1"})
    undone = list(request.desc().values_list("id", flat=True))
    done = request.revert()
    assert [a.action for a in done] == ["INSERT", "UPDATE", "DELETE"]
    assert list(Todo.objects.order_by("id").values_list("id", "task", "is_completed")) == [
        (1, "Sleep", False), (2, "Eat", False)]
    drain(tracked)

    # The revert's own changes are recorded, each naming the change it undoes.
    reverts = BemiChange.objects.filter(context__has_key="bemi_revert")
    assert [(c.operation, c.context["bemi_revert"]) for c in reverts] == [
        ("CREATE", str(undone[0])), ("UPDATE", str(undone[1])), ("DELETE", str(undone[2]))]
    # Reverting the request again conflicts with those newer changes, and names one.
    with pytest.raises(RevertConflict) as error:
        BemiChange.objects.context({"request_id": "r-1"}).revert()
    assert str(error.value.conflicting.id) in str(error.value)
    assert error.value.conflicting.context["bemi_revert"] in {str(i) for i in undone}
    # Reverting the revert redoes the request.
    BemiChange.objects.filter(context__has_key="bemi_revert").revert()
    assert list(Todo.objects.order_by("id").values_list("id", "task", "is_completed")) == [
        (1, "Slept", True), (3, "Repeat", False)]


def test_field_values_survive_the_worker(tracked):
    project = Project.objects.create(name="Home")
    ref = uuid.uuid4()
    values = dict(
        label="Lamp", project=project, price=Decimal("19.99"),
        due_at=dt.datetime(2024, 5, 1, 8, 30, 0, 123456, tzinfo=dt.timezone.utc),
        due_on=dt.date(2024, 5, 1), ref=ref, tags=["a", {"b": 1}], blob=b"\x00\xffhi", ratio=0.1,
    )
    item = Item.objects.create(**values)
    with bemi.context(step="edit"):
        Item.objects.filter(pk=item.pk).update(label="Other", price=Decimal("1000.10"), due_at=None, ref=None,
                                               tags=[], blob=b"", ratio=2)
    drain(tracked)

    first = item.bemi_changes().created().get()
    old = item.bemi_as_of(first.committed_at)
    for name, value in values.items():
        got = getattr(old, name)
        assert (bytes(got) if name == "blob" else got) == value, name
    assert item.bemi_changes("label").updated().get().diff()["item_label"] == ["Lamp", "Other"]

    BemiChange.objects.context({"step": "edit"}).revert()
    back = Item.objects.get(pk=item.pk)
    for name, value in values.items():
        got = getattr(back, name)
        assert (bytes(got) if name == "blob" else got) == value, name
