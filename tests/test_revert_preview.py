"""preview(): what revert() would write and every problem it would stop at, without writing; masked values."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from bemi.models import BemiChange
from bemi.revert import RevertError, preview
from tests.queryapp.models import Todo
from tests.queryapp.fixtures import record_a_request

REQUEST = {"request_id": "r-1", "user_id": 7}
MASK_A = "bemi-masked:0123456789abcdef01234567"
MASK_B = "bemi-masked:ffffffffffffffffffffffff"


@pytest.fixture
def request_changes(recorder):
    return record_a_request(recorder, REQUEST)


def test_preview_lists_what_revert_writes_and_writes_nothing(request_changes):
    with CaptureQueriesContext(connection) as queries:
        steps = preview(BemiChange.objects.context({"request_id": "r-1"}))
    assert not [q for q in queries if q["sql"].split()[0] in ("INSERT", "UPDATE", "DELETE")]
    assert [(s.action, s.change.primary_key, s.problems) for s in steps] == [
        ("INSERT", "2", ()), ("UPDATE", "1", ()), ("DELETE", "3", ())]
    assert steps[0].values == {"id": 2, "task": "Eat", "is_completed": False} and steps[0].current is None
    assert steps[1].values == {"task": "Sleep", "is_completed": False}
    assert steps[1].current == {"id": 1, "task": "Slept", "is_completed": True}
    assert steps[2].values == {}


def test_preview_lists_every_conflict(request_changes):
    with request_changes.track(Todo, 1, {"request_id": "r-2"}):
        Todo.objects.filter(id=1).update(task="Nap")
    Todo.objects.create(id=2, task="Someone else")
    Todo.objects.filter(id=3).update(task="Unrecorded")
    steps = preview(BemiChange.objects.context({"request_id": "r-1"}))
    problems = {s.change.primary_key: s.problems for s in steps}
    assert problems["2"] == ("a row with that primary key exists again",)
    assert "changed the row after it" in problems["1"][0] and "r-2" in problems["1"][0]
    assert problems["1"][1].startswith("conflict: the row's current values differ")  # "Nap": the later change
    assert problems["3"] == ("conflict: the row's current values differ from what the change left (force overrides)",)
    assert Todo.objects.get(id=3).task == "Unrecorded"


def test_a_masked_value_is_never_written_back(recorder):
    Todo.objects.create(id=1, task=MASK_B)
    recorder.add("todo", 1, "UPDATE", before={"id": 1, "task": MASK_A, "is_completed": False},
                 after={"id": 1, "task": MASK_B, "is_completed": False}, context=REQUEST)
    recorder.add("todo", 5, "DELETE", before={"id": 5, "task": MASK_A, "is_completed": False}, context=REQUEST)
    steps = preview(BemiChange.objects.all())
    assert all("task before it is masked" in " ".join(s.problems) for s in steps)
    for one in BemiChange.objects.all():
        with pytest.raises(RevertError, match="value of task before it is masked.*digest, not the value"):
            BemiChange.objects.filter(id=one.id).revert(force=True)
    assert list(Todo.objects.values_list("id", "task")) == [(1, MASK_B)]


def test_a_masked_primary_key_is_never_matched(recorder):
    Todo.objects.create(id=1, task="a")
    recorder.add("todo", MASK_A, "UPDATE", before={"id": MASK_A, "task": "x", "is_completed": False},
                 after={"id": MASK_A, "task": "a", "is_completed": False})
    assert "its primary key is masked: the row cannot be found" in preview(BemiChange.objects.all())[0].problems
    with pytest.raises(RevertError, match="its primary key is masked"):
        BemiChange.objects.all().revert(force=True)
    assert list(Todo.objects.values_list("id", "task")) == [(1, "a")]
