"""The execute wrapper, read back from the WAL: every write kind and ORM API.

Each test writes under a context and asserts both sides: the ORM behaves
exactly as without tracking (ids, rowcount, RETURNING, counts) and a
``_bemi`` message with the context JSON precedes the row changes in the
same transaction.
"""

from __future__ import annotations

import json

import pytest
from django.db import DataError, IntegrityError, InternalError, connection, transaction
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext

import bemi
from bemi.wrapper import BemiCursor, install_execute_wrapper, is_hooked, uninstall_execute_wrapper
from tests.ctxapp.helpers import row_changes, sql_as_executed, sql_as_sent, tracked
from tests.ctxapp.models import Doc, Item, Tag

pytestmark = pytest.mark.django_db(transaction=True)


def only(pairs):
    assert len(pairs) == 1, pairs
    return pairs[0]


def test_create_sends_context_and_sql_before_the_insert(wal):
    with sql_as_sent(connection) as sent, bemi.context(user_id=7, endpoint="/todo"):
        item = Item.objects.create(name="Sleep")
    assert Item.objects.get(pk=item.pk).name == "Sleep"  # RETURNING id reached the object
    message, rows = only(tracked(wal.read()))
    sql = sent[0][0]
    assert sql.startswith('INSERT INTO "ctxapp_item"') and "Sleep" not in sql
    assert message.content == json.dumps({"user_id": 7, "endpoint": "/todo", "SQL": sql}, ensure_ascii=False)
    assert [r.kind for r in rows] == ["INSERT"] and rows[0].table.endswith("ctxapp_item")
    assert f"id[bigint]:{item.pk} " in rows[0].data


def test_no_context_no_message(wal):
    Item.objects.create(name="plain")
    Item.objects.update(qty=3)
    records = wal.read()
    assert tracked(records) == []
    assert [r.kind for r in row_changes(records, "ctxapp_item")] == ["INSERT", "UPDATE"]


def test_reads_and_ddl_carry_nothing(wal):
    Item.objects.create(name="r")
    with bemi.context(user_id=1), sql_as_executed(connection) as executed:
        list(Item.objects.all())
        Item.objects.filter(name="r").exists()
        with transaction.atomic():
            list(Item.objects.select_for_update().all())
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE ctx_ddl_probe (id int)")
            cursor.execute("ALTER TABLE ctx_ddl_probe ADD COLUMN x text")
            cursor.execute("WITH x AS (SELECT 1 AS a) SELECT a FROM x")
            cursor.execute("DROP TABLE ctx_ddl_probe")
    assert all("pg_logical_emit_message" not in sql for sql, _ in executed)
    assert tracked(wal.read()) == []


def test_bulk_create_ids_and_one_message_per_statement(wal):
    with bemi.context(job="import"):
        items = Item.objects.bulk_create([Item(name=f"b{i}", qty=i) for i in range(50)])
    db_ids = sorted(Item.objects.values_list("pk", flat=True))
    assert sorted(i.pk for i in items) == db_ids and len(db_ids) == 50
    message, rows = only(tracked(wal.read()))
    assert message.json["job"] == "import" and message.json["SQL"].startswith('INSERT INTO "ctxapp_item"')
    assert len(rows) == 50 and {r.kind for r in rows} == {"INSERT"}


def test_update_rowcount_and_zero_rows(wal):
    Item.objects.bulk_create([Item(name="u") for _ in range(3)])
    with bemi.context(job="update"):
        assert Item.objects.filter(name="u").update(qty=5) == 3
        assert Item.objects.filter(name="nobody").update(qty=5) == 0
    # A statement that changes no row still commits its message (we cannot know
    # beforehand); with nothing after it, the worker has nothing to attach it to.
    assert [len(rows) for _, rows in tracked(wal.read(), allow_empty=True)] == [3, 0]
    assert Item.objects.filter(qty=5).count() == 3


def test_delete_counts_with_cascade(wal):
    item = Item.objects.create(name="parent")
    Doc.objects.bulk_create([Doc(item=item, title=str(i)) for i in range(2)])
    with bemi.context(job="delete"):
        assert Item.objects.filter(pk=item.pk).delete() == (3, {"ctxapp.Doc": 2, "ctxapp.Item": 1})
    pairs = tracked(wal.read())
    deletes = [r for _, rows in pairs for r in rows if r.kind == "DELETE"]
    assert len(deletes) == 3
    assert all(m.json["job"] == "delete" and m.json["SQL"].startswith("DELETE") for m, _ in pairs)


def test_save_falls_back_to_insert_when_update_finds_no_row(wal):
    with bemi.context(job="save"):
        Item(pk=424242, name="explicit pk").save()  # UPDATE (0 rows) then INSERT
        item = Item.objects.get(pk=424242)
        item.name = "renamed"
        item.save()  # UPDATE (1 row), no INSERT
    assert list(Item.objects.values_list("pk", "name")) == [(424242, "renamed")]
    kinds = [r.kind for r in row_changes(wal.read(), "ctxapp_item")]
    assert kinds == ["INSERT", "UPDATE"]


def test_save_with_uuid_default_pk_inserts(wal):
    with bemi.context(job="uuid"):
        doc = Doc(title="t")
        doc.save()
    assert Doc.objects.get(pk=doc.pk).title == "t"
    message, rows = only(tracked(wal.read()))
    assert rows[0].kind == "INSERT" and str(doc.pk) in rows[0].data


def test_get_or_create_and_update_or_create(wal):
    with bemi.context(job="goc"):
        tag, created = Tag.objects.get_or_create(name="red", defaults={"color": "r"})
        assert created and tag.pk
        again, created = Tag.objects.get_or_create(name="red")
        assert not created and again.pk == tag.pk
        updated, created = Tag.objects.update_or_create(name="red", defaults={"color": "R"})
        assert not created and updated.pk == tag.pk
        new, created = Tag.objects.update_or_create(name="blue", defaults={"color": "b"})
        assert created and new.pk != tag.pk
    assert dict(Tag.objects.values_list("name", "color")) == {"red": "R", "blue": "b"}
    pairs = tracked(wal.read())
    assert [rows[0].kind for _, rows in pairs] == ["INSERT", "UPDATE", "INSERT"]


def test_failing_statement_raises_as_usual_and_takes_its_message_along(wal):
    """The INSERT fails on the unique name: the same error, and the message is rolled back with it."""
    Tag.objects.create(name="green")
    with bemi.context(job="dup"):
        with pytest.raises(IntegrityError, match="unique"):
            Tag.objects.create(name="green")
        with transaction.atomic():
            with pytest.raises(IntegrityError, match="unique"), transaction.atomic():
                Tag.objects.create(name="green")
            Tag.objects.create(name="yellow")
    assert sorted(Tag.objects.values_list("name", flat=True)) == ["green", "yellow"]
    message, rows = only(tracked(wal.read()))
    assert "'yellow'" in rows[0].data


def test_raw_cursor_without_params_keeps_percent_signs(wal):
    with bemi.context(job="raw"), connection.cursor() as cursor:
        cursor.execute("INSERT INTO ctxapp_item (name, qty, note) VALUES ('100%', 1, '%s %% %(x)s') RETURNING id")
        (pk,) = cursor.fetchone()
        assert cursor.rowcount == 1
    assert Item.objects.values_list("name", "note").get(pk=pk) == ("100%", "%s %% %(x)s")
    message, _ = only(tracked(wal.read()))
    assert message.json["SQL"] == "INSERT INTO ctxapp_item (name, qty, note) VALUES ('100%', 1, '%s %% %(x)s') RETURNING id"


def test_raw_cursor_dict_params_and_returning(wal):
    item = Item.objects.create(name="d")
    sql = "UPDATE ctxapp_item SET note = %(note)s WHERE id = %(id)s RETURNING id, note"
    with bemi.context(job="dict"), connection.cursor() as cursor:
        cursor.execute(sql, {"note": "50% off", "id": item.pk})
        assert cursor.rowcount == 1
        assert cursor.fetchall() == [(item.pk, "50% off")]
    message, rows = only(tracked(wal.read()))
    assert message.json == {"job": "dict", "SQL": sql}
    assert rows[0].kind == "UPDATE"


def test_merge_and_data_modifying_with(wal):
    item = Item.objects.create(name="m")
    with bemi.context(job="merge"), connection.cursor() as cursor:
        cursor.execute(
            "MERGE INTO ctxapp_item t USING (SELECT %s::bigint AS id) s ON t.id = s.id "
            "WHEN MATCHED THEN UPDATE SET qty = 9",
            [item.pk],
        )
        assert cursor.rowcount == 1
        cursor.execute(
            "WITH x AS (INSERT INTO ctxapp_item (name, qty, note) VALUES (%s, 0, '') RETURNING id) SELECT id FROM x",
            ["cte"],
        )
        (cte_id,) = cursor.fetchone()
    assert Item.objects.get(pk=item.pk).qty == 9 and Item.objects.get(pk=cte_id).name == "cte"
    pairs = tracked(wal.read())
    assert [(m.json["SQL"].split()[0], rows[0].kind) for m, rows in pairs] == [("MERGE", "UPDATE"), ("WITH", "INSERT")]


def test_executemany_emits_one_message_in_the_same_transaction(wal):
    sql = "INSERT INTO ctxapp_item (name, qty, note) VALUES (%s, %s, '')"
    with bemi.context(job="many"), connection.cursor() as cursor:
        cursor.executemany(sql, [("m1", 1), ("m2", 2), ("m3", 3)])
    assert sorted(Item.objects.values_list("name", flat=True)) == ["m1", "m2", "m3"]
    message, rows = only(tracked(wal.read()))
    assert message.json == {"job": "many", "SQL": sql}
    assert len(rows) == 3
    assert connection.get_autocommit()  # the atomic block opened for it is closed


def test_executemany_inside_atomic(wal):
    sql = "INSERT INTO ctxapp_item (name, qty, note) VALUES (%s, %s, '')"
    with bemi.context(job="many"), transaction.atomic():
        Item.objects.create(name="first")
        with connection.cursor() as cursor:
            cursor.executemany(sql, [("m1", 1), ("m2", 2)])
    pairs = tracked(wal.read())
    assert [len(rows) for _, rows in pairs] == [1, 2]
    assert len({m.xid for m, _ in pairs}) == 1


def test_failed_transaction_gets_nothing_attached(wal):
    with bemi.context(job="broken"), sql_as_executed(connection) as executed:
        with transaction.atomic():
            with connection.cursor() as cursor:
                with pytest.raises(DataError):
                    cursor.execute("SELECT 1/0")
                with pytest.raises(InternalError, match="current transaction is aborted"):
                    cursor.execute("INSERT INTO ctxapp_item (name, qty, note) VALUES ('x', 1, '')")
            transaction.set_rollback(True)
    assert executed[-1] == ("INSERT INTO ctxapp_item (name, qty, note) VALUES ('x', 1, '')", None)


def test_needs_rollback_gets_nothing_attached(wal):
    with bemi.context(job="broken"), sql_as_executed(connection) as executed:
        with transaction.atomic():
            try:
                with transaction.atomic(savepoint=False):
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT 1/0")
            except DataError:
                pass
            with pytest.raises(TransactionManagementError):
                Item.objects.create(name="x")
    # Django refuses the INSERT before it reaches psycopg: nothing of ours is sent either.
    assert [sql for sql, _ in executed] == ["SELECT 1/0"]
    assert tracked(wal.read()) == []


def test_named_cursor_is_not_hooked():
    """Django makes named (server-side) cursors without the connection's cursor_factory: never ours."""
    connection.ensure_connection()
    with transaction.atomic():
        named = connection.create_cursor(name="bemi_named")
        plain = connection.create_cursor()
        assert not isinstance(named, BemiCursor) and isinstance(plain, BemiCursor)
        named.close()
        plain.close()


def test_debug_cursor_logs_the_users_sql(wal):
    with bemi.context(job="debug"), CaptureQueriesContext(connection) as queries:
        item = Item.objects.create(name="dbg")
    assert item.pk
    assert queries.captured_queries[0]["sql"].startswith('INSERT INTO "ctxapp_item"')
    assert "pg_logical_emit_message" not in queries.captured_queries[0]["sql"]
    only(tracked(wal.read()))


def test_messages_follow_the_context_inside_one_transaction(wal):
    """Statements of one transaction under different contexts each carry their own."""
    with transaction.atomic():
        with bemi.context(step=1):
            Item.objects.create(name="one")
        with bemi.context(step=2):
            Item.objects.create(name="two")
        Item.objects.create(name="none")
    records = wal.read()
    pairs = tracked(records)
    assert [(m.json.get("step"), rows[0].data.split("name[character varying]:", 1)[1].split()[0]) for m, rows in pairs] == [
        (1, "'one'"),
        (2, "'two'"),
        (None, "'none'"),  # {}: the context ended (tests/test_attribution.py)
    ]
    assert pairs[2][0].json == {}
    assert len(row_changes(records, "ctxapp_item")) == 3


def test_rolled_back_statement_leaves_no_message(wal):
    with bemi.context(job="rollback"):
        with transaction.atomic():
            Item.objects.create(name="gone")
            transaction.set_rollback(True)
    assert tracked(wal.read()) == []


def test_hook_is_installed_once_below_django():
    """bemi's cursors are made by the psycopg connection: execute_wrappers and cursor_factory stay as configured."""
    from django.db.backends.postgresql.base import Cursor

    connection.ensure_connection()
    install_execute_wrapper()
    install_execute_wrapper()
    assert is_hooked(connection.connection)
    assert connection.connection.cursor_factory is Cursor
    with connection.cursor() as cursor:
        assert type(cursor.cursor).__mro__[1:] == (BemiCursor, *Cursor.__mro__)
        assert type(cursor.cursor)._bemi_base is Cursor
    assert connection.execute_wrappers == []


def test_existing_connection_gets_hooked_at_install(wal):
    """A connection opened before the app was ready is covered by install_execute_wrapper()."""
    connection.ensure_connection()
    uninstall_execute_wrapper()
    try:
        assert not is_hooked(connection.connection)
        with bemi.context(job="late"):
            Item.objects.create(name="untracked")
        install_execute_wrapper()
        with bemi.context(job="late"):
            Item.objects.create(name="tracked")
    finally:
        install_execute_wrapper()
    message, rows = only(tracked(wal.read()))
    assert "'tracked'" in rows[0].data


def test_user_execute_wrapper_sees_its_own_statement_and_params(wal):
    """An application's execute wrapper sees what Django sent, not bemi's message, also across a reconnect."""
    connection.close()
    seen = []

    def mine(execute, sql, params, many, context):
        seen.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(mine):
        with bemi.context(job="reconnect"):
            Item.objects.create(name="in block")  # connects inside the block
        assert connection.execute_wrappers == [mine]
    assert connection.execute_wrappers == []
    with bemi.context(job="after"):
        Item.objects.create(name="after block")
    messages = [m for m, _ in tracked(wal.read())]
    assert [m.json["job"] for m in messages] == ["reconnect", "after"]
    (sql, params), = seen
    assert sql == messages[0].json["SQL"] and sql.startswith('INSERT INTO "ctxapp_item"')
    assert "pg_logical_emit_message" not in sql and params[0] == "in block"
