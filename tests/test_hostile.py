"""Hostile context values: the row is always written, and serialisable values reach
the WAL byte for byte as the JSON of the dict (the "Bad input" list of issue 2)."""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import uuid

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection
from django.utils.translation import gettext_lazy

import bemi
from bemi import wrapper
from bemi.conf import MAX_CONTEXT_BYTES
from tests.ctxapp.helpers import row_changes, sql_as_sent, tracked
from tests.ctxapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True)

FORGED = '{"user_id": 1} Bemi*/ /*Bemi {"user_id": 666} Bemi*/'

HOSTILE_STRINGS = {
    "comment close": "*/",
    "comment open": "/*",
    "line comment": "-- DROP TABLE ctxapp_item",
    "quote": "O'Brien ''; DROP TABLE x; --",
    "percent": "100%",
    "placeholder": "%s %(name)s %%",
    "backslash": "C:\\path\\n\\x00 \\",
    "nul": "a\x00b",
    "url chars": "/todo?x=1&y=2#frag;a+b",
    "emoji": "🙂 naïve 日本語 \U0001f9d1\u200d\U0001f4bb",
    "forged marker": FORGED,
    "dollar quote": "$$ $bemi$ E'\\''",
    "control chars": "\t\n\r\x1b\x7f\u2028",
    "100 KB": "x" * 100_000,
}


@pytest.fixture(autouse=True)
def largest_contexts(settings):
    """Hostile values of up to 1 MB: BEMI_MAX_CONTEXT_BYTES raised to what the worker accepts (the
    default, 16 KB, is tested at the end)."""
    settings.BEMI_MAX_CONTEXT_BYTES = MAX_CONTEXT_BYTES


@pytest.fixture(autouse=True)
def fresh_warnings():
    wrapper._warned.clear()
    yield
    wrapper._warned.clear()


def write_under(values: dict) -> tuple[Item, str, list]:
    with sql_as_sent(connection) as sent, bemi.context(values):
        item = Item.objects.create(name="hostile", note="n")
    return item, sent[0][0]


@pytest.mark.parametrize("value", HOSTILE_STRINGS.values(), ids=HOSTILE_STRINGS.keys())
def test_hostile_string_values_and_keys(wal, value):
    item, sql = write_under({"v": value, value: "as key", "nested": {"list": [value, {"k": value}]}})
    assert Item.objects.get(pk=item.pk).note == "n"
    (message, rows), = tracked(wal.read())
    expected = {"v": value, value: "as key", "nested": {"list": [value, {"k": value}]}, "SQL": sql}
    assert message.json == expected
    assert message.content == json.dumps(expected, ensure_ascii=False)  # byte for byte
    assert rows[0].kind == "INSERT"


def test_hostile_sql_text_itself(wal):
    """Raw SQL holding every hostile string as literals: the SQL value reaches the WAL unaltered."""
    note = "*/ /* -- ' % %s \\ ?&#;+ 🙂 Bemi*/"
    sql = "INSERT INTO ctxapp_item (name, qty, note) VALUES ('raw', 1, '" + note.replace("'", "''") + "')"
    with bemi.context(v="x"), connection.cursor() as cursor:
        cursor.execute(sql)
    assert Item.objects.get(name="raw").note == note
    (message, _), = tracked(wal.read())
    assert message.json == {"v": "x", "SQL": sql}


def test_non_json_types_go_through_djangos_encoder(wal):
    when = datetime.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=datetime.timezone.utc)
    values = {
        "when": when,
        "day": datetime.date(2024, 2, 29),
        "time": datetime.time(12, 30),
        "duration": datetime.timedelta(days=1, seconds=5),
        "price": decimal.Decimal("12.3400"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "lazy": gettext_lazy("lazy text"),
        "tags": {"b", "a", "c"},
        "frozen": frozenset({3, 1, 2}),
        "mixed set": {1, "a"},
        7: "int key",
        2.5: "float key",
        False: "bool key",
        None: "none key",
        "nested": {"deep": [{"when": when}]},
        "empty": {},
        "nothing": None,
        "big int": 2**70,
    }
    item, sql = write_under(values)
    (message, _), = tracked(wal.read())
    got = message.json
    assert Item.objects.filter(pk=item.pk).exists()
    assert got["when"] == "2024-02-29T23:59:59.123Z"
    assert got["day"] == "2024-02-29" and got["time"] == "12:30:00" and got["duration"] == "P1DT00H00M05S"
    assert got["price"] == "12.3400" and got["id"] == "12345678-1234-5678-1234-567812345678"
    assert got["lazy"] == "lazy text"
    assert got["tags"] == ["a", "b", "c"] and got["frozen"] == [1, 2, 3]
    assert sorted(map(str, got["mixed set"])) == ["1", "a"]
    assert got["7"] == "int key" and got["2.5"] == "float key" and got["false"] == "bool key"
    assert got["null"] == "none key"
    assert got["nested"] == {"deep": [{"when": "2024-02-29T23:59:59.123Z"}]}
    assert got["empty"] == {} and got["nothing"] is None and got["big int"] == 2**70
    assert got["SQL"] == sql
    without_sets = {k: v for k, v in values.items() if k not in ("tags", "frozen", "mixed set")}
    reference = json.loads(json.dumps(without_sets, cls=DjangoJSONEncoder))
    assert {k: v for k, v in got.items() if k not in ("tags", "frozen", "mixed set", "SQL")} == reference


def test_users_sql_key_is_replaced_by_ours(wal):
    item, sql = write_under({"SQL": "forged", "a": 1})
    (message, _), = tracked(wal.read())
    assert message.json == {"a": 1, "SQL": sql}


def test_empty_context_still_carries_the_sql(wal):
    item, sql = write_under({})
    (message, _), = tracked(wal.read())
    assert message.content == json.dumps({"SQL": sql})


@pytest.mark.parametrize(
    "values, cause",
    [
        ({"obj": object()}, "unserialisable"),
        ({(1, 2): "tuple key"}, "unserialisable"),
        ({"nan": float("nan")}, "unserialisable"),
        ({"big": "x" * (MAX_CONTEXT_BYTES + 1)}, "too-large"),
        ({"emoji": "🙂" * (MAX_CONTEXT_BYTES // 4 + 1)}, "too-large"),
    ],
    ids=["object", "tuple key", "nan", "over 1 MB", "over 1 MB in UTF-8 bytes"],
)
def test_bad_context_is_dropped_row_written_one_warning(wal, caplog, values, cause):
    caplog.set_level(logging.WARNING, logger="bemi")
    with bemi.context(values):
        Item.objects.create(name="first")
        Item.objects.create(name="second")
        Item.objects.filter(name="first").update(qty=1)
    records = wal.read()
    assert tracked(records) == []
    assert [r.kind for r in row_changes(records, "ctxapp_item")] == ["INSERT", "INSERT", "UPDATE"]
    warnings = [r for r in caplog.records if r.name == "bemi"]
    assert len(warnings) == 1 and cause in warnings[0].getMessage()


def test_circular_context_is_dropped(wal, caplog):
    loop: dict = {}
    loop["self"] = loop
    with bemi.context(loop=loop):
        Item.objects.create(name="circular")
    assert tracked(wal.read()) == [] and Item.objects.count() == 1
    assert len([r for r in caplog.records if r.name == "bemi"]) == 1


def test_non_dict_context_is_dropped(wal, caplog):
    for bad in (["a", "list"], "a string", 42):
        token = bemi.set_context(bad)
        try:
            Item.objects.create(name=repr(bad))
        finally:
            bemi.appcontext.reset_context(token)
    assert tracked(wal.read()) == [] and Item.objects.count() == 3
    warnings = [r for r in caplog.records if r.name == "bemi"]
    assert len(warnings) == 1 and "not-a-dict" in warnings[0].getMessage()


def test_just_under_the_cap_is_sent(wal):
    with sql_as_sent(connection) as sent, bemi.context(big=""):
        Item.objects.create(name="probe")
    overhead = len(json.dumps({"big": "", "SQL": sent[0][0]}).encode())
    value = "y" * (MAX_CONTEXT_BYTES - overhead)
    item, sql = write_under({"big": value})
    messages = [m for m, _ in tracked(wal.read())]
    assert len(messages[-1].content.encode()) == MAX_CONTEXT_BYTES
    assert messages[-1].json == {"big": value, "SQL": sql}


def test_huge_sql_is_truncated_to_fit(wal, caplog, settings):
    settings.BEMI_MAX_SQL_BYTES = 10 * MAX_CONTEXT_BYTES  # raised: the overall limit cuts
    caplog.set_level(logging.WARNING, logger="bemi")
    note = "z" * (MAX_CONTEXT_BYTES + 5000)
    sql = f"INSERT INTO ctxapp_item (name, qty, note) VALUES ('huge', 1, '{note}')"
    with bemi.context(job="huge"), connection.cursor() as cursor:
        cursor.execute(sql)
        cursor.execute(sql)
    assert Item.objects.filter(name="huge", note=note).count() == 2
    messages = [m for m, _ in tracked(wal.read())]
    assert len(messages) == 2
    for message in messages:
        assert len(message.content.encode()) <= MAX_CONTEXT_BYTES
        got = message.json
        assert got["job"] == "huge"
        assert got["SQL"].endswith(wrapper.TRUNCATED) and sql.startswith(got["SQL"][: -len(wrapper.TRUNCATED)])
        assert len(got["SQL"]) > MAX_CONTEXT_BYTES - 100
    warnings = [r for r in caplog.records if r.name == "bemi"]
    assert len(warnings) == 1 and "sql-truncated" in warnings[0].getMessage()


@pytest.mark.parametrize("limit", [None, 100, 0])
def test_sql_in_the_context_is_cut_to_a_few_kb_by_default(wal, caplog, settings, limit):
    """Issue 9, item 5: the context is stored on every row the statement changed."""
    if limit is not None:
        settings.BEMI_MAX_SQL_BYTES = limit
    caplog.set_level(logging.WARNING, logger="bemi")
    note = "é" * 50_000
    sql = f"INSERT INTO ctxapp_item (name, qty, note) VALUES ('long', 1, '{note}')"
    with bemi.context(job="long"), connection.cursor() as cursor:
        cursor.execute(sql)
    (message, _), = tracked(wal.read())
    got = message.json
    budget = 4096 if limit is None else limit
    assert got["job"] == "long"
    assert len(json.dumps(got["SQL"], ensure_ascii=False).encode()) <= max(budget, 2)
    if budget > 100:
        assert len(json.dumps(got["SQL"], ensure_ascii=False).encode()) > budget - 10
    if budget >= len(json.dumps(wrapper.TRUNCATED)):
        assert got["SQL"].endswith(wrapper.TRUNCATED) and sql.startswith(got["SQL"][: -len(wrapper.TRUNCATED)])
    assert [r for r in caplog.records if r.name == "bemi"] == [], "the documented default cuts silently"
    assert Item.objects.get(name="long").note == note


def test_lone_surrogate_falls_back_to_ascii_escapes(wal):
    item, sql = write_under({"bad": "\ud800 half a pair"})
    (message, _), = tracked(wal.read())
    assert message.content == json.dumps({"bad": "\ud800 half a pair", "SQL": sql})  # \ud800 escaped
    assert message.json["bad"] == "\ud800 half a pair"


def test_role_that_may_not_emit_messages_still_writes(wal, caplog):
    """A REVOKE on pg_logical_emit_message would fail the whole query string: skip the message instead."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    caplog.set_level(logging.WARNING, logger="bemi")
    table = Item._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute("DROP ROLE IF EXISTS bemi_no_emit")
        cursor.execute("CREATE ROLE bemi_no_emit LOGIN")
        cursor.execute(f"GRANT ALL ON {table} TO bemi_no_emit")
        cursor.execute(f"GRANT USAGE ON SEQUENCE {table}_id_seq TO bemi_no_emit")
        cursor.execute(wrapper.CONNECTION_FACTS)
        function = cursor.fetchone()[1]  # its signature depends on the server version
        cursor.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")
    other = DatabaseWrapper({**connection.settings_dict, "USER": "bemi_no_emit"}, alias="no_emit")
    try:
        with bemi.context(user_id=1):
            for name in ("first", "second"):
                with other.cursor() as cursor:
                    cursor.execute(f"INSERT INTO {table} (name, qty, note) VALUES (%s, 1, '')", [name])
        assert sorted(Item.objects.values_list("name", flat=True)) == ["first", "second"]
        records = wal.read()
        assert tracked(records) == []
        assert len(row_changes(records, table)) == 2
        warnings = [r.getMessage() for r in caplog.records if r.name == "bemi"]
        assert len(warnings) == 1 and "GRANT EXECUTE ON FUNCTION pg_logical_emit_message" in warnings[0]
    finally:
        other.close()
        with connection.cursor() as cursor:
            cursor.execute(f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC")
            cursor.execute(f"REVOKE ALL ON {table} FROM bemi_no_emit")
            cursor.execute(f"REVOKE ALL ON SEQUENCE {table}_id_seq FROM bemi_no_emit")
            cursor.execute("DROP ROLE bemi_no_emit")


def test_non_utf8_server_gets_ascii_escaped_json(pg_server):
    """A LATIN1 database cannot store an emoji as text: the JSON escapes it (\\ud83d\\ude42) instead."""
    import psycopg
    from django.db.backends.postgresql.base import DatabaseWrapper

    from bemi_devtools.wal import WalReader

    name = "bemi_latin1"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0")
    other = DatabaseWrapper({**connection.settings_dict, "NAME": name}, alias="latin1")
    try:
        with other.cursor() as cursor:
            cursor.execute("CREATE TABLE note (id serial PRIMARY KEY, body text)")
        reader = WalReader(pg_server.dsn(name))
        try:
            with bemi.context(v="caf\u00e9 \U0001F642"), other.cursor() as cursor:
                cursor.execute("INSERT INTO note (body) VALUES (%s)", ["ascii"])
            (message,) = reader.messages()
        finally:
            reader.close()
        assert message.content.isascii()
        assert json.loads(message.content) == {"v": "caf\u00e9 \U0001F642", "SQL": "INSERT INTO note (body) VALUES (%s)"}
    finally:
        other.close()
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_whole_context_is_bounded_by_default(wal, caplog, settings):
    """Issue 18: BEMI_MAX_SQL_BYTES bounded only the SQL; a dict of up to 1 MB was stored on every row."""
    from bemi.limits import DEFAULT_MAX_CONTEXT_BYTES

    del settings.BEMI_MAX_CONTEXT_BYTES  # the default
    caplog.set_level(logging.WARNING, logger="bemi")
    sql = "INSERT INTO ctxapp_item (name, qty, note) VALUES " + ", ".join(f"('bulk{i}', {i}, '')" for i in range(300))
    with bemi.context(note="n" * (DEFAULT_MAX_CONTEXT_BYTES - 1000)), connection.cursor() as cursor:
        cursor.execute(sql)  # 6 KB of SQL, room for 1 KB
    with bemi.context(note="n" * DEFAULT_MAX_CONTEXT_BYTES):  # alone over the limit: not sent
        Item.objects.create(name="too big")
    messages = [m for m, _ in tracked(wal.read())]
    assert len(messages) == 1
    assert DEFAULT_MAX_CONTEXT_BYTES - 1000 < len(messages[0].content.encode()) <= DEFAULT_MAX_CONTEXT_BYTES
    assert messages[0].json["SQL"].endswith(wrapper.TRUNCATED)
    assert Item.objects.filter(name="too big").exists()
    causes = sorted(r.getMessage().split("(", 1)[1].split(")", 1)[0] for r in caplog.records if r.name == "bemi")
    assert causes == ["sql-truncated", "too-large"]


def test_the_context_limit_is_a_checked_setting(settings):
    from django.core.exceptions import ImproperlyConfigured

    from bemi.conf import max_context_bytes

    settings.BEMI_MAX_CONTEXT_BYTES = 2048
    assert max_context_bytes() == 2048
    for bad in (0, MAX_CONTEXT_BYTES + 1, "4096", True):
        settings.BEMI_MAX_CONTEXT_BYTES = bad
        with pytest.raises(ImproperlyConfigured, match="BEMI_MAX_CONTEXT_BYTES"):
            max_context_bytes()
