"""The revert's own writes carry a context naming the change they undo (read back from the WAL)."""

import pytest

from bemi.models import BemiChange
from tests.queryapp.models import Todo


@pytest.mark.django_db(transaction=True)
def test_revert_writes_are_labelled_with_the_change_they_undo(tx_recorder, wal):
    import bemi

    with tx_recorder.track(Todo, 1, {"request_id": "r-1"}):
        Todo.objects.create(id=1, task="Sleep")
    with tx_recorder.track(Todo, 1, {"request_id": "r-1"}):
        Todo.objects.filter(id=1).update(task="Nap")
    update, create = BemiChange.objects.context({"request_id": "r-1"}).desc()
    wal.read()  # forget the setup

    with bemi.context(user_id=42):
        done = BemiChange.objects.context({"request_id": "r-1"}).revert()
    assert [a.action for a in done] == ["UPDATE", "DELETE"]

    contexts = [m.json for m in wal.messages("_bemi")]
    labels = [(c.get("bemi_revert"), c.get("user_id"), c.get("SQL", "").split()[0]) for c in contexts]
    assert labels == [(str(update.id), 42, "UPDATE"), (str(create.id), 42, "DELETE")]
