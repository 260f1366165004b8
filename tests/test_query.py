"""BemiChange and its chainable helpers, on `changes` rows written like the worker writes them."""

import datetime as dt

import pytest

from bemi.models import BemiChange
from bemi.timetravel import UnknownTableError
from tests.queryapp.models import Item, Todo


@pytest.fixture
def docs_example(recorder):
    """The Bemi documentation's example: three todos created, one completed, one deleted."""
    for pk, task in [(26, "Sleep"), (27, "Eat"), (28, "Repeat")]:
        with recorder.track(Todo, pk, {"user_id": 187234, "endpoint": "/todo", "method": "POST"}):
            Todo.objects.create(id=pk, task=task)
    with recorder.track(Todo, 26, {"user_id": 187234, "endpoint": "/todo/complete", "method": "PUT"}):
        Todo.objects.filter(id=26).update(is_completed=True)
    with recorder.track(Todo, 27, {"user_id": 187234, "endpoint": "/todo/27", "method": "DELETE"}):
        Todo.objects.filter(id=27).delete()
    return recorder


def rows(queryset):
    return [(c.primary_key, c.operation) for c in queryset]


def test_model_maps_the_changes_table(docs_example):
    change = BemiChange.objects.get(primary_key="26", operation="UPDATE")
    assert change.table == "todo"
    assert change.before == {"id": 26, "task": "Sleep", "is_completed": False}
    assert change.after == {"id": 26, "task": "Sleep", "is_completed": True}
    assert change.context == {"user_id": 187234, "endpoint": "/todo/complete", "method": "PUT"}
    assert change.committed_at == dt.datetime(2023, 12, 11, 17, 9, 15, tzinfo=dt.timezone.utc)
    assert str(change) == "UPDATE todo 26 at 2023-12-11 17:09:15+00:00"
    assert BemiChange._meta.managed is False and BemiChange._meta.db_table == 'bemi"."changes'


def test_default_order_is_by_commit_then_order_in_transaction(recorder):
    when = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    recorder.add("todo", 2, "CREATE", after={"id": 2}, committed_at=when, change_index=1)
    recorder.add("todo", 1, "CREATE", after={"id": 1}, committed_at=when, change_index=0)
    recorder.add("todo", 0, "CREATE", after={"id": 0}, committed_at=when - dt.timedelta(seconds=1))
    assert [c.primary_key for c in BemiChange.objects.all()] == ["0", "2", "1"]  # commit position first
    assert [c.primary_key for c in BemiChange.objects.desc()] == ["1", "2", "0"]
    assert [c.primary_key for c in BemiChange.objects.desc().asc()] == ["0", "2", "1"]


def test_diff(docs_example):
    update = BemiChange.objects.updated().get()
    assert update.diff() == {"is_completed": [False, True]}
    create = BemiChange.objects.created().get(primary_key="28")
    assert create.diff() == {"id": [None, 28], "task": [None, "Repeat"], "is_completed": [None, False]}
    delete = BemiChange.objects.deleted().get()
    assert delete.diff() == {"id": [27, None], "task": ["Eat", None], "is_completed": [False, None]}
    assert BemiChange(before={"a": 1}, after={"a": True}).diff() == {"a": [1, True]}
    assert BemiChange(before={"a": 1}, after={"a": 1}).diff() == {}


def test_operation_helpers(docs_example):
    assert rows(BemiChange.objects.created()) == [("26", "CREATE"), ("27", "CREATE"), ("28", "CREATE")]
    assert rows(BemiChange.objects.updated()) == [("26", "UPDATE")]
    assert rows(BemiChange.objects.deleted()) == [("27", "DELETE")]


def test_json_containment_helpers_chain(docs_example):
    q = BemiChange.objects
    assert rows(q.before({"task": "Sleep"})) == [("26", "UPDATE")]
    assert rows(q.after({"is_completed": True})) == [("26", "UPDATE")]
    assert rows(q.after({"task": "Eat"}).before_not({"task": "Eat"})) == [("27", "CREATE")]
    assert rows(q.after_not({"is_completed": False})) == [("26", "UPDATE"), ("27", "DELETE")]
    assert rows(q.context({"method": "POST"}).after({"task": "Repeat"})) == [("28", "CREATE")]
    assert rows(q.context_not({"method": "POST"}).desc()) == [("27", "DELETE"), ("26", "UPDATE")]
    assert rows(q.context({"user_id": 187234}).deleted()) == [("27", "DELETE")]
    assert rows(q.context({"user_id": 1})) == []
    assert rows(q.context({})) == rows(q.all())  # every object contains the empty one


def test_json_helpers_use_containment(docs_example):
    sql = str(BemiChange.objects.context({"user_id": 1}).before({"a": 1}).after_not({"b": 2}).query)
    assert '"bemi"."changes"."context" @> ' in sql and '"bemi"."changes"."before" @> ' in sql
    assert 'NOT ("bemi"."changes"."after" @> ' in sql


@pytest.mark.parametrize("helper", ["before", "before_not", "after", "after_not", "context", "context_not"])
@pytest.mark.parametrize("bad", ["task", ["task"], 1, None])
def test_json_helpers_refuse_anything_but_a_dict(helper, bad):
    with pytest.raises(TypeError, match=rf"{helper}\(\) takes a dict .* e\.g\. {helper}\("):
        getattr(BemiChange.objects, helper)(bad)


def test_record_changes(docs_example):
    todo = Todo.objects.get(id=26)
    assert rows(todo.bemi_changes()) == [("26", "CREATE"), ("26", "UPDATE")]
    assert rows(todo.bemi_changes().desc()) == [("26", "UPDATE"), ("26", "CREATE")]
    assert rows(todo.bemi_changes("is_completed")) == [("26", "CREATE"), ("26", "UPDATE")]
    assert rows(todo.bemi_changes("task")) == [("26", "CREATE")]
    assert rows(todo.bemi_changes().context({"method": "PUT"})) == [("26", "UPDATE")]


def test_field_changed(docs_example):
    q = BemiChange.objects
    assert rows(q.field_changed("todo", 26, "is_completed")) == [("26", "CREATE"), ("26", "UPDATE")]
    assert rows(q.field_changed("todo", "26", "task").updated()) == []
    assert rows(q.field_changed(Todo, 27, "task")) == [("27", "CREATE"), ("27", "DELETE")]
    assert rows(q.field_changed(Todo, 27, "no_such_column")) == []


def test_field_changed_names_its_first_argument_like_record(docs_example):
    q = BemiChange.objects
    expected = [("26", "CREATE"), ("26", "UPDATE")]
    assert rows(q.field_changed(model_or_table=Todo, primary_key=26, field_name="is_completed")) == expected
    assert rows(q.record(model_or_table="todo", primary_key=26)) == expected
    # `table=` is the published package's keyword and keeps working
    assert rows(q.field_changed(table="todo", primary_key=26, field_name="is_completed")) == expected
    with pytest.raises(TypeError, match="both model_or_table and table"):
        q.field_changed(Todo, 26, "is_completed", table="todo")


def test_field_changed_takes_the_field_or_the_column_name(recorder):
    item = Item.objects.create(label="a")
    with recorder.track(Item, item.pk):
        Item.objects.filter(pk=item.pk).update(label="b")
    with recorder.track(Item, item.pk):
        Item.objects.filter(pk=item.pk).update(price=3)
    assert rows(item.bemi_changes("label")) == [(str(item.pk), "UPDATE")]
    assert rows(item.bemi_changes("item_label")) == [(str(item.pk), "UPDATE")]
    assert rows(item.bemi_changes("price")) == [(str(item.pk), "UPDATE")]
    assert item.bemi_changes("price").get().diff() == {"price": [None, 3.0]}


def test_update_without_before_counts_as_changed(recorder):
    recorder.add("todo", 5, "UPDATE", before={}, after={"id": 5, "task": "x"})
    assert rows(BemiChange.objects.field_changed("todo", 5, "task")) == [("5", "UPDATE")]


def test_unknown_table(recorder):
    with pytest.raises(UnknownTableError, match=r"Unknown table 'Todo'.*db_table, e\.g\."):
        BemiChange.objects.field_changed("Todo", 1, "task")
    with pytest.raises(TypeError, match="model class, a model instance or a table name"):
        BemiChange.objects.field_changed(42, 1, "task")
    recorder.add("legacy_table", 1, "CREATE", after={"id": 1})
    assert rows(BemiChange.objects.field_changed("legacy_table", 1, "id")) == [("1", "CREATE")]
    assert rows(BemiChange.objects.field_changed("queryapp_project", 1, "name")) == []  # a model's table


def test_bad_field_and_primary_key(docs_example):
    with pytest.raises(TypeError, match="column name as a string"):
        BemiChange.objects.field_changed(Todo, 26, None)
    with pytest.raises(TypeError, match="primary_key must be a single value"):
        Todo(task="unsaved").bemi_changes()
