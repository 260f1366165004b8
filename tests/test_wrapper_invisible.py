"""What a project observes is the same with and without bemi (issue 19, items 1-3).

Each test runs the same operations with bemi's hook removed and installed,
and compares what Django shows: the statement runs once (a sequence counts
it), its exception class, the query log (``CaptureQueriesContext``), what
the application's execute wrappers see, and the all-or-nothing outcome of a
batch; then reads the WAL.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
from django.db import DataError, IntegrityError, connection, connections, transaction
from django.db.backends.postgresql.base import Cursor as PostgresCursor
from django.db.backends.postgresql.base import DatabaseWrapper, ServerBindingCursor
from django.test.utils import CaptureQueriesContext

import bemi
from bemi import wrapper
from bemi.wrapper import install_execute_wrapper, uninstall_execute_wrapper
from tests.ctxapp.helpers import row_changes, tracked
from tests.ctxapp.models import Item, Tag

pytestmark = pytest.mark.django_db(transaction=True)

INSERT = "INSERT INTO ctxapp_item (name, qty, note) VALUES (%s, %s, '')"


@contextlib.contextmanager
def without_bemi():
    """Django as if bemi were not installed: the hook removed from this thread's connections."""
    uninstall_execute_wrapper()
    try:
        yield
    finally:
        install_execute_wrapper()


@pytest.fixture
def ssb():
    """An alias ``ssb`` of the test database with OPTIONS server_side_binding (this thread only)."""
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    settings_dict["OPTIONS"] = {**settings_dict.get("OPTIONS", {}), "server_side_binding": True}
    connections["ssb"] = DatabaseWrapper(settings_dict, alias="ssb")
    yield connections["ssb"]
    connections["ssb"].close()
    del connections["ssb"]


@pytest.fixture
def runs():
    """How many times a statement that calls ``nextval('bemi_probe_runs')`` ran (nextval is not rolled back)."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE SEQUENCE bemi_probe_runs")

    def count() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM bemi_probe_runs")
            value = cursor.fetchone()[0]
            cursor.execute("ALTER SEQUENCE bemi_probe_runs RESTART")
        return value

    yield count
    with connection.cursor() as cursor:
        cursor.execute("DROP SEQUENCE bemi_probe_runs")


@pytest.fixture
def tag_id_runs():
    """How many ids ``ctxapp_tag``'s sequence handed out since the last call (a failed INSERT takes one too)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_catalog.pg_get_serial_sequence('ctxapp_tag', 'id')")
        (sequence,) = cursor.fetchone()
    state = {"last": None}

    def taken() -> int:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {sequence}")
            value = cursor.fetchone()[0]
        before, state["last"] = state["last"], value
        return value - (before or 0)

    return taken


# -- 1. the statement runs once and its exception is its own -----------------------


def test_failing_read_after_a_context_ended_in_atomic_raises_its_own_error_once(wal, runs):
    """A transaction carried a context; a later statement without one fails: DataError, run once
    (it ran twice and raised InternalError 'current transaction is aborted')."""
    with transaction.atomic():
        with bemi.context(job="labelled"):
            Item.objects.create(name="labelled")
        with connection.cursor() as cursor, pytest.raises(DataError, match="division by zero"):
            cursor.execute("SELECT pg_catalog.nextval('bemi_probe_runs') / 0")
        transaction.set_rollback(True)
    assert runs() == 1
    assert tracked(wal.read()) == []  # rolled back with its message


def test_failing_insert_after_a_context_ended_in_autocommit_runs_once(wal, tag_id_runs):
    """The duplicate INSERT in autocommit after a labelled write: one IntegrityError, one attempt (it ran twice)."""
    tag_id_runs()
    with bemi.context(job="first"):
        Tag.objects.create(name="dup")
    with pytest.raises(IntegrityError, match="unique"):
        Tag.objects.create(name="dup")  # the next statement: no context, a transaction carried one before
    assert tag_id_runs() == 2  # one id each
    records = wal.read()
    assert [m.json["job"] for m, _ in tracked(records)] == ["first"]
    assert len(row_changes(records, "ctxapp_tag")) == 1


@pytest.mark.parametrize("way", ["one string", "executemany", "server-side binding"])
def test_failing_write_with_a_context_runs_once_with_its_own_error(wal, runs, way, ssb):
    """With a context: the statement (and its message) go together, once; the error is the statement's."""
    sql = "INSERT INTO ctxapp_tag (name, color) VALUES (%s, pg_catalog.nextval('bemi_probe_runs')::text)"
    Tag.objects.create(name="taken")
    runs()
    conn = ssb if way == "server-side binding" else connection
    for outcome in ("without bemi", "with bemi"):
        manager = without_bemi() if outcome == "without bemi" else contextlib.nullcontext()
        with manager, bemi.context(job=way), conn.cursor() as cursor:
            with pytest.raises(IntegrityError, match="unique") as raised:
                if way == "executemany":
                    cursor.executemany(sql, [("fresh",), ("taken",)])
                else:
                    cursor.execute(sql, ["taken"])
        assert type(raised.value.__cause__).__name__ == "UniqueViolation", outcome
        assert runs() == (2 if way == "executemany" else 1), outcome
        assert sorted(Tag.objects.values_list("name", flat=True)) == ["taken"], outcome
    assert tracked(wal.read()) == []  # the message went down with its statement


def test_failure_of_bemis_own_part_sends_the_statement_unchanged_once(wal, runs, monkeypatch, caplog):
    """Deciding what to send fails before anything is sent: the statement runs as without bemi, once."""
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(wrapper, "build_payload", broken)
    wrapper._warned.clear()
    caplog.set_level(logging.WARNING, logger="bemi")
    sql = "INSERT INTO ctxapp_item (name, qty, note) VALUES (%s, pg_catalog.nextval('bemi_probe_runs'), '')"
    with bemi.context(job="broken"), CaptureQueriesContext(connection) as queries, connection.cursor() as cursor:
        cursor.execute(sql, ["still written"])
        assert cursor.rowcount == 1
    wrapper._warned.clear()
    assert runs() == 1
    assert [q["sql"] for q in queries.captured_queries] == [sql.replace("%s", "'still written'")]
    assert "context not attached (internal): RuntimeError: boom" in caplog.text
    records = wal.read()
    assert tracked(records) == [] and len(row_changes(records, "ctxapp_item")) == 1


# -- 2. the query log is the one without bemi ---------------------------------------


def operations() -> None:
    """A bit of everything, with values that do not depend on the run (no ids, no savepoint names)."""
    hostile = "O'Brien \\ ''; %s %% -- */"
    Item.objects.create(name="one", note=hostile)
    Item.objects.bulk_create([Item(name=f"b{i}") for i in range(3)])
    Item.objects.filter(name__startswith="b").update(qty=2)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE ctxapp_item SET note = %(note)s WHERE name = %(name)s", {"note": hostile, "name": "one"})
        cursor.execute("INSERT INTO ctxapp_item (name, qty, note) VALUES ('100%', 1, 'x')")
        cursor.executemany(INSERT, [("m1", 1), ("m2", 2)])  # autocommit
    with transaction.atomic():
        Item.objects.create(name="in atomic")
        with connection.cursor() as cursor:
            cursor.executemany(INSERT, [("m3", 3)])
    Item.objects.filter(name__startswith="m").update(qty=0)
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM ctxapp_item WHERE name LIKE %s", ["m%"])
    list(Item.objects.filter(note=hostile).values_list("name"))
    Tag.objects.create(name="dup")
    with connection.cursor() as cursor, pytest.raises(IntegrityError):
        cursor.execute("INSERT INTO ctxapp_tag (name, color) VALUES (%s, 'it''s')", ["dup"])  # logged as it failed


def test_query_log_is_exactly_as_without_bemi(wal):
    logs = {}
    for outcome in ("without bemi", "with bemi"):
        manager = without_bemi() if outcome == "without bemi" else contextlib.nullcontext()
        with manager, bemi.context(user_id=1, note="it's \\ 100%"), CaptureQueriesContext(connection) as queries:
            operations()
        logs[outcome] = [q["sql"] for q in queries.captured_queries]
        Item.objects.all().delete()
        Tag.objects.all().delete()
    assert logs["with bemi"] == logs["without bemi"]
    assert "2 times: " + INSERT in logs["with bemi"]
    assert logs["with bemi"][-1] == "INSERT INTO ctxapp_tag (name, color) VALUES ('dup', 'it''s')"
    assert not any("pg_logical_emit_message" in sql for sql in logs["with bemi"])
    assert len([m for m, _ in tracked(wal.read(), allow_empty=True) if m.json.get("user_id") == 1]) == 11


def test_query_log_with_server_side_binding_is_as_without_bemi(wal, ssb):
    conn = ssb
    logs = {}
    for outcome in ("without bemi", "with bemi"):
        conn.close()
        if outcome == "without bemi":
            uninstall_execute_wrapper()
        try:
            with bemi.context(via="ssb"), CaptureQueriesContext(conn) as queries:
                Item.objects.using(conn.alias).create(name="s")
                with conn.cursor() as cursor:
                    cursor.executemany(INSERT, [("m1", 1), ("m2", 2)])
                    cursor.execute("SELECT count(*) FROM ctxapp_item")
                    assert cursor.fetchone() == (3,)
            logs[outcome] = [q["sql"] for q in queries.captured_queries]
        finally:
            install_execute_wrapper()
        Item.objects.all().delete()
    assert logs["with bemi"] == logs["without bemi"] and len(logs["with bemi"]) == 3


def test_executemany_in_autocommit_is_all_or_nothing_as_without_bemi(wal):
    """psycopg pipelines the batch as one implicit transaction; bemi's message rides the same pipeline."""
    rows = [("a", 1), ("b", 2), ("a", 3)]
    sql = "INSERT INTO ctxapp_tag (name, color) VALUES (%s, %s::text)"
    outcomes = {}
    for outcome in ("without bemi", "with bemi"):
        manager = without_bemi() if outcome == "without bemi" else contextlib.nullcontext()
        with manager, bemi.context(job="batch"), CaptureQueriesContext(connection) as queries:
            with connection.cursor() as cursor, pytest.raises(IntegrityError) as raised:
                cursor.executemany(sql, rows)
            ok_rows = [("c", 1), ("d", 2)]
            with connection.cursor() as cursor:
                cursor.executemany(sql, ok_rows)
        outcomes[outcome] = (
            type(raised.value.__cause__), sorted(Tag.objects.values_list("name", flat=True)),
            [q["sql"] for q in queries.captured_queries], connection.get_autocommit(),
        )
        Tag.objects.all().delete()
    assert outcomes["with bemi"] == outcomes["without bemi"]
    error, names, log, autocommit = outcomes["with bemi"]
    assert error.__name__ == "UniqueViolation" and names == ["c", "d"] and autocommit
    assert log == [f"3 times: {sql}", f"2 times: {sql}"]
    records = wal.read()
    (message, changes), = tracked(records)  # the failed batch left nothing; the good one is one transaction
    assert message.json == {"job": "batch", "SQL": sql}
    assert [c.kind for c in changes] == ["INSERT", "INSERT"] and len({message.xid, *(c.xid for c in changes)}) == 1


# -- 3. the application's execute wrappers ------------------------------------------


def test_execute_wrappers_see_their_own_statement_and_params(wal):
    """connection.execute_wrappers is as without bemi; a wrapper sees Django's SQL and parameters, many or not."""
    seen = []

    def mine(execute, sql, params, many, context):
        seen.append((sql, params, many))
        return execute(sql, params, many, context)

    connection.ensure_connection()
    assert connection.execute_wrappers == []
    with bemi.context(job="wrapped"), connection.execute_wrapper(mine):
        item = Item.objects.create(name="w", qty=5)
        with connection.cursor() as cursor:
            cursor.executemany(INSERT, [("m1", 1)])
            cursor.execute("UPDATE ctxapp_item SET qty = %(qty)s WHERE id = %(id)s", {"qty": 6, "id": item.pk})
    assert connection.execute_wrappers == []
    assert seen[0][0].startswith('INSERT INTO "ctxapp_item"') and seen[0][1][:2] == ("w", 5) and not seen[0][2]
    assert seen[1:] == [
        (INSERT, [("m1", 1)], True),
        ("UPDATE ctxapp_item SET qty = %(qty)s WHERE id = %(id)s", {"qty": 6, "id": item.pk}, False),
    ]
    assert [m.json["SQL"] for m, _ in tracked(wal.read())] == [sql for sql, _, _ in seen]


class ProjectCursor(PostgresCursor):
    """A project's own OPTIONS['cursor_factory']."""


def test_cursor_factory_stays_as_configured_and_writes_are_tracked(wal, ssb):
    """Django's own tests compare connection.cursor_factory with what OPTIONS said: bemi leaves it alone."""
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    settings_dict["OPTIONS"] = {**settings_dict.get("OPTIONS", {}), "cursor_factory": ProjectCursor}
    connections["mine"] = DatabaseWrapper(settings_dict, alias="mine")
    try:
        for conn, factory in ((connection, PostgresCursor), (ssb, ServerBindingCursor), (connections["mine"], ProjectCursor)):
            conn.ensure_connection()
            assert conn.connection.cursor_factory is factory
            with bemi.context(factory=factory.__name__), conn.cursor() as cursor:
                assert isinstance(cursor.cursor, factory)
                cursor.execute(INSERT, ["f", 1])
    finally:
        connections["mine"].close()
        del connections["mine"]
    assert [m.json["factory"] for m, _ in tracked(wal.read())] == ["Cursor", "ServerBindingCursor", "ProjectCursor"]


def test_inside_the_applications_own_pipeline(wal):
    """A psycopg pipeline the application opened: the message rides it (no Sync of ours), and the
    first write of a connection does not ask its question there (the answer would need a Sync)."""
    connection.close()
    with bemi.context(job="pipe"), connection.cursor() as cursor:
        with cursor.connection.pipeline():
            cursor.execute(INSERT, ["p1", 1])  # the connection's first write: no context
        cursor.execute(INSERT, ["outside", 1])
        with cursor.connection.pipeline():
            cursor.execute(INSERT, ["p2", 2])
            cursor.execute(INSERT, ["p3", 3])
    records = wal.read()
    inserts = row_changes(records, "ctxapp_item")
    assert [r.data.split("name[character varying]:", 1)[1].split()[0] for r in inserts] == [
        "'p1'", "'outside'", "'p2'", "'p3'"]
    pairs = tracked(records)
    assert [rows[0].xid for _, rows in pairs] == [inserts[1].xid, inserts[2].xid, inserts[3].xid]
    assert inserts[2].xid == inserts[3].xid  # one pipeline, one implicit transaction, as without bemi
    assert all(m.json == {"job": "pipe", "SQL": INSERT} for m, _ in pairs)
