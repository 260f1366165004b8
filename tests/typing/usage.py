"""What a project type-checked with django-stubs sees of bemi's query API (checked by mypy, never run).

``mypy`` (``tox -e typecheck``, and tests/test_typing.py) fails when a type below changes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from typing_extensions import assert_type

from bemi.models import BemiChange
from bemi.querysets import BemiChangeQuerySet
from tests.queryapp.models import Todo

when = dt.datetime(2023, 12, 11, tzinfo=dt.timezone.utc)
todo = Todo(id=26, task="Sleep")

assert_type(BemiChange.objects.all(), BemiChangeQuerySet)
assert_type(BemiChange.objects.record(Todo, 26), BemiChangeQuerySet)
assert_type(BemiChange.objects.after({"task": "Eat"}).created().desc(), BemiChangeQuerySet)
assert_type(BemiChange.objects.filter(table="todo").before({"task": "Eat"}), BemiChangeQuerySet)
assert_type(BemiChange.objects.context({"user_id": 1}).first(), BemiChange | None)
assert_type(BemiChange.objects.record(todo, 26).get().diff(), dict[str, list[Any]])
assert_type(BemiChange.objects.as_of(Todo, 26, when), Todo | None)
assert_type(BemiChange.objects.as_of(todo, 26, when), Todo | None)
assert_type(BemiChange.objects.as_of("todo", 26, when), dict[str, Any] | None)
assert_type(todo.bemi_as_of(when), Todo | None)
assert_type(todo.bemi_changes(), BemiChangeQuerySet)
for change in todo.bemi_changes().updated():
    assert_type(change, BemiChange)
    assert_type(change.committed_at, dt.datetime)
    assert_type(change.operation, str)
