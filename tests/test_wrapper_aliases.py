"""Every PostgreSQL alias is wrapped (not only ``default``), other engines never are,
and cursors that cannot run two statements in one string get the message separately."""

from __future__ import annotations

import copy

import pytest
from django.db import connection, connections, transaction
from django.db.backends.postgresql.base import DatabaseWrapper
from django.db.utils import ConnectionHandler

import bemi
from bemi.wrapper import EMIT_ALONE, EMIT_HEAD, BemiCursor, is_hooked
from tests.ctxapp.helpers import row_changes, sql_as_executed, tracked
from tests.ctxapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def alias():
    """Add aliases to the test database, e.g. ``alias("other")`` or with OPTIONS.

    The connections are registered in this thread only, not in settings, which
    Django's test case treats as dynamically created connections (allowed).
    """
    added: list[str] = []

    def make(name: str, **options) -> str:
        settings_dict = copy.deepcopy(connections["default"].settings_dict)
        settings_dict["OPTIONS"] = {**settings_dict.get("OPTIONS", {}), **options}
        connections[name] = DatabaseWrapper(settings_dict, alias=name)
        added.append(name)
        return name

    yield make
    for name in added:
        connections[name].close()
        del connections[name]


def test_second_alias_is_tracked_on_its_own_connection(wal, alias):
    other = alias("other")
    with bemi.context(via="other"):
        item = Item.objects.using(other).create(name="on other")
        Item.objects.create(name="on default")
    assert is_hooked(connections[other].connection)
    assert connections[other].execute_wrappers == []
    assert connections[other].connection is not connection.connection
    pairs = tracked(wal.read())
    assert len(pairs) == 2 and len({m.xid for m, _ in pairs}) == 2
    assert all(m.json["via"] == "other" for m, _ in pairs)
    assert f"id[bigint]:{item.pk} " in pairs[0][1][0].data


def test_server_side_binding_alias_emits_separately_in_the_same_transaction(wal, alias):
    ssb = alias("ssb", server_side_binding=True)
    conn = connections[ssb]
    with bemi.context(via="ssb"), sql_as_executed(conn) as executed:
        item = Item.objects.using(ssb).create(name="server bound")
        items = Item.objects.using(ssb).bulk_create([Item(name=f"s{i}") for i in range(3)])
        assert Item.objects.using(ssb).filter(name__startswith="s").update(qty=4) == 4
        assert Item.objects.using(ssb).filter(pk=item.pk).delete() == (1, {"ctxapp.Item": 1})
        with transaction.atomic(using=ssb):
            Item.objects.using(ssb).create(name="in atomic")
    assert all(i.pk for i in items)
    # Not combined: the message is its own statement, in the pipeline of the user's.
    assert all(sql == EMIT_ALONE or not sql.startswith(EMIT_HEAD) for sql, _ in executed)
    assert sum(sql == EMIT_ALONE for sql, _ in executed) == 6  # delete(): Doc (cascade), then Item
    assert conn.get_autocommit()
    pairs = [(m, rows) for m, rows in tracked(wal.read(), allow_empty=True) if rows]  # (cascade to Doc: 0 rows)
    assert [(rows[0].kind, len(rows)) for _, rows in pairs] == [
        ("INSERT", 1), ("INSERT", 3), ("UPDATE", 4), ("DELETE", 1), ("INSERT", 1)
    ]
    assert all(m.json["via"] == "ssb" for m, _ in pairs)


def test_server_side_binding_raw_cursor_returning(wal, alias):
    ssb = alias("ssb", server_side_binding=True)
    with bemi.context(via="ssb"), connections[ssb].cursor() as cursor:
        cursor.execute("INSERT INTO ctxapp_item (name, qty, note) VALUES (%s, 1, '') RETURNING id", ["r"])
        (pk,) = cursor.fetchone()
        assert cursor.rowcount == 1
    assert Item.objects.get(pk=pk).name == "r"
    (message, rows), = tracked(wal.read())
    assert message.json["SQL"] == "INSERT INTO ctxapp_item (name, qty, note) VALUES (%s, 1, '') RETURNING id"


def test_other_engines_are_left_alone(wal):
    handler = ConnectionHandler({"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}})
    lite = handler["default"]
    try:
        with bemi.context(job="sqlite"), lite.cursor() as cursor:
            cursor.execute("CREATE TABLE t (id integer primary key, v text)")
            cursor.execute("INSERT INTO t (v) VALUES (%s)", ["x"])
            assert cursor.rowcount == 1
            cursor.execute("SELECT v FROM t")
            assert cursor.fetchall() == [("x",)]
        assert lite.execute_wrappers == [] and not isinstance(cursor.cursor, BemiCursor)
    finally:
        lite.close()
    assert tracked(wal.read()) == []


def test_each_thread_connection_is_wrapped(wal):
    import threading

    def work():
        try:
            with bemi.context(thread="worker"):
                Item.objects.create(name="from thread")
            assert is_hooked(connection.connection)
        finally:
            connection.close()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    records = wal.read()
    (message, rows), = tracked(records)
    assert message.json["thread"] == "worker" and "'from thread'" in rows[0].data
    assert len(row_changes(records, "ctxapp_item")) == 1
