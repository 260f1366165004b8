"""From Django ORM writes to `changes` rows: the Todo scenario of the Bemi documentation, exactly."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

import bemi
from bemi.management.commands.bemi_worker import dsn_for_alias
from tests.ctxapp.models import Item
from tests.queryapp.models import Todo

DOCS_QUERY = 'SELECT "primary_key", "table", "operation", "before", "after", "context", "committed_at" FROM bemi.changes'


def run_command(env, **options):
    call_command("bemi_worker", once=True, slot=env.slot, publication=env.publication, verbosity=0, **options)


def test_documented_todo_scenario_gives_the_documented_rows(worker_env):
    env = worker_env
    run_command(env)  # first start: publication, slot, changes table
    with bemi.context(user_id=187234, endpoint="/todo", method="POST"):
        sleep = Todo.objects.create(task="Sleep")
        eat = Todo.objects.create(task="Eat")
        repeat = Todo.objects.create(task="Repeat")
    eat_pk = eat.pk
    with bemi.context(user_id=187234, endpoint="/todo/complete", method="PUT"):
        sleep.is_completed = True
        sleep.save()
    with bemi.context(user_id=187234, endpoint=f"/todo/{eat_pk}", method="DELETE"):
        eat.delete()
    run_command(env)

    rows = env.execute(DOCS_QUERY + " ORDER BY commit_position, change_index")
    assert [(pk, table, op, before, after) for pk, table, op, before, after, _ctx, _at in rows] == [
        (str(sleep.pk), "todo", "CREATE", {}, {"id": sleep.pk, "task": "Sleep", "is_completed": False}),
        (str(eat_pk), "todo", "CREATE", {}, {"id": eat_pk, "task": "Eat", "is_completed": False}),
        (str(repeat.pk), "todo", "CREATE", {}, {"id": repeat.pk, "task": "Repeat", "is_completed": False}),
        (str(sleep.pk), "todo", "UPDATE", {"id": sleep.pk, "task": "Sleep", "is_completed": False},
         {"id": sleep.pk, "task": "Sleep", "is_completed": True}),
        (str(eat_pk), "todo", "DELETE", {"id": eat_pk, "task": "Eat", "is_completed": False}, {}),
    ]
    contexts = [ctx for *_, ctx, _at in rows]
    expected = [
        ("/todo", "POST", "INSERT INTO "), ("/todo", "POST", "INSERT INTO "), ("/todo", "POST", "INSERT INTO "),
        ("/todo/complete", "PUT", "UPDATE "), (f"/todo/{eat_pk}", "DELETE", "DELETE FROM "),
    ]
    for ctx, (endpoint, method, sql) in zip(contexts, expected):
        assert set(ctx) == {"user_id", "endpoint", "method", "SQL"}
        assert (ctx["user_id"], ctx["endpoint"], ctx["method"]) == (187234, endpoint, method)
        assert ctx["SQL"].startswith(sql) and '"todo"' in ctx["SQL"]
    committed = [at for *_, at in rows]
    assert committed == sorted(committed) and committed[0].utcoffset().total_seconds() == 0
    # and the query API reads what the worker wrote
    assert [c.operation for c in bemi_changes_of(sleep)] == ["CREATE", "UPDATE"]


def bemi_changes_of(record):
    return list(record.bemi_changes())


def test_request_context_from_the_middleware_reaches_changes(worker_env, client):
    env = worker_env
    run_command(env)
    response = client.post("/ctx/create/?name=through-http")
    assert response.status_code == 200
    run_command(env)
    (row,) = env.changes("\"table\" = %s", [Item._meta.db_table])
    assert row["after"]["name"] == "through-http"
    assert row["context"]["method"] == "POST" and row["context"]["path"] == "/ctx/create/"
    assert row["context"]["SQL"].startswith("INSERT INTO")


def test_bulk_create_in_one_transaction_is_labelled_row_by_row(worker_env):
    env = worker_env
    run_command(env)
    with bemi.context(job="import"):
        Todo.objects.bulk_create([Todo(task=f"t{i}") for i in range(500)])
    with bemi.context(job="cleanup"):
        Todo.objects.filter(task__in=["t1", "t2"]).delete()
    run_command(env)
    rows = env.changes()
    assert len(rows) == 502
    assert {r["context"]["job"] for r in rows[:500]} == {"import"}
    assert [(r["operation"], r["context"]["job"]) for r in rows[500:]] == [("DELETE", "cleanup")] * 2


def test_command_connection_settings():
    dsn = dsn_for_alias("default")
    assert "dbname=test_bemi" in dsn and "port=" in dsn
    with pytest.raises(CommandError, match="no database alias 'nope'"):
        call_command("bemi_worker", once=True, database="nope")


def test_command_reports_a_non_zero_exit_status(worker_env):
    env = worker_env
    run_command(env)
    Todo.objects.create(task="x")
    run_command(env)
    env.execute("SELECT pg_drop_replication_slot(%s)", [env.slot])
    with pytest.raises(CommandError) as excinfo:
        run_command(env)
    assert excinfo.value.returncode == 2
