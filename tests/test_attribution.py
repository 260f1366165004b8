"""A write without a context is never labelled with an earlier statement's context (issue 9, item 7).

The worker gives each row change the latest ``_bemi`` message before it in its
transaction; these tests read what reached the WAL and apply that rule.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction

import bemi
from tests.ctxapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True)


def labels(records) -> list[tuple[str, object]]:
    """(name of the inserted/updated item, the context the worker would store for it)."""
    latest: dict[int, object] = {}
    result = []
    for record in records:
        if record.kind == "MESSAGE" and record.prefix == "_bemi":
            latest[record.xid] = record.json
        elif record.kind in ("INSERT", "UPDATE") and "ctxapp_item" in record.table:
            name = record.data.rsplit("name[character varying]:'", 1)[1].split("'", 1)[0]
            context = latest.get(record.xid, {})
            result.append((name, {k: v for k, v in context.items() if k != "SQL"}))
    return result


def test_inside_one_transaction_a_write_after_the_context_ended_is_not_labelled_with_it(wal):
    with transaction.atomic():
        with bemi.context(user_id=42):
            Item.objects.create(name="labelled")
        Item.objects.create(name="after")
        Item.objects.filter(name="labelled").update(name="updated after")
        with bemi.context(user_id=7):
            Item.objects.create(name="labelled again")
        Item.objects.create(name="after again")
    assert labels(wal.read()) == [
        ("labelled", {"user_id": 42}),
        ("after", {}),
        ("updated after", {}),
        ("labelled again", {"user_id": 7}),
        ("after again", {}),
    ]


def test_the_empty_context_is_sent_once_and_only_where_needed(wal):
    with bemi.context(user_id=42):
        Item.objects.create(name="autocommit")  # its own transaction
    Item.objects.create(name="next transaction")  # nothing to undo: no message
    with transaction.atomic():
        with bemi.context(user_id=42):
            Item.objects.create(name="a")
        Item.objects.create(name="b")  # {} sent here
        Item.objects.create(name="c")  # and not again
    with transaction.atomic():
        Item.objects.create(name="d")  # a new transaction: no message
    records = wal.read()
    messages = [r.json for r in records if r.kind == "MESSAGE"]
    assert [{k: v for k, v in m.items() if k != "SQL"} for m in messages] == [{"user_id": 42}, {"user_id": 42}, {}]
    assert labels(records) == [
        ("autocommit", {"user_id": 42}), ("next transaction", {}), ("a", {"user_id": 42}),
        ("b", {}), ("c", {}), ("d", {}),
    ]
    assert "_bemi_labelled" not in connection.__dict__


# Issue 18, row 12: statements that write without starting with INSERT/UPDATE/DELETE/MERGE. Each of
# these was labelled with the context that had ended (the first-keyword rule let them through).
HIDDEN_WRITES = [
    ("SELECT pg_temp.bemi_test_insert('via select')", "via select"),
    ("EXPLAIN ANALYZE UPDATE ctxapp_item SET name = 'via explain' WHERE name = 'labelled'", "via explain"),
    ("/* /* */ SELECT */ UPDATE ctxapp_item SET name = 'via nested comment' WHERE name = 'labelled'",
     "via nested comment"),
]


@pytest.mark.parametrize("sql, name", HIDDEN_WRITES, ids=["select-function", "explain-analyze", "nested-comment"])
def test_a_write_hidden_from_the_first_keyword_after_the_context_ended_is_not_labelled_with_it(wal, sql, name):
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE FUNCTION pg_temp.bemi_test_insert(n text) RETURNS void LANGUAGE sql AS "
                "$$ INSERT INTO public.ctxapp_item (name, qty, note) VALUES (n, 0, '') $$")
        with bemi.context(user_id=42):
            Item.objects.create(name="labelled")
        with connection.cursor() as cursor:
            cursor.execute(sql)
    assert labels(wal.read()) == [("labelled", {"user_id": 42}), (name, {})]


def test_after_the_context_ended_the_reset_is_sent_once_also_for_reads(wal):
    with transaction.atomic():
        with bemi.context(user_id=42):
            Item.objects.create(name="a")
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = 0")  # cannot write: nothing sent
        list(Item.objects.all())  # may (a function in a SELECT): {} sent
        list(Item.objects.all())  # and not again
        Item.objects.create(name="b")
    records = wal.read()
    messages = [r.json for r in records if r.kind == "MESSAGE"]
    assert [{k: v for k, v in m.items() if k != "SQL"} for m in messages] == [{"user_id": 42}, {}]
    assert labels(records) == [("a", {"user_id": 42}), ("b", {})]


def test_sql_given_as_psycopg_sql_objects_is_reset_too(wal):
    """The wrapper cannot read a psycopg.sql.Composed: unsure whether it writes, it resets."""
    from psycopg import sql

    with transaction.atomic():
        with bemi.context(user_id=42):
            Item.objects.create(name="labelled")
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("INSERT INTO {} (name, qty, note) VALUES (%s, 0, '')").format(
                sql.Identifier("ctxapp_item")), ["composed"])
    assert labels(wal.read()) == [("labelled", {"user_id": 42}), ("composed", {})]
