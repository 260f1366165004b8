"""The tracking settings (bemi.tracking) and their per-row effect in the stitcher (no database)."""

from __future__ import annotations

import json
import re

import pytest

from bemi import tracking as tr
from bemi.worker.stitch import Stitcher
from bemi.worker.values import JsonValues
from tests.workerapp.captured import messages

KEY = tr.derive_key("test-secret")


def stitch(name, tracking, key=KEY):
    stitcher = Stitcher(JsonValues(), lambda rel: ["id"], tracking=tracking, masking_key=key)
    rows = []
    for lsn, data in messages(name):
        stitcher.feed(lsn, data, rows)
    return rows, stitcher


def test_defaults_have_the_builtins():
    t = tr.Tracking.build()
    assert [p.text for p in t.schemas] == ["public"]
    assert [p.text for p in t.ignored_tables] == ["django_session"]
    assert [p.text for p in t.masked_columns] == list(tr.BUILTIN_MASKED_COLUMNS)
    assert "auth_user.password" in tr.BUILTIN_MASKED_COLUMNS and "authtoken_token.key" in tr.BUILTIN_MASKED_COLUMNS
    assert not t.tracks("public", "django_session") and t.tracks("public", "todo")
    assert not t.tracks("sales", "todo") and not t.skip_unchanged_updates


def test_user_lists_add_to_the_builtins_and_the_opt_out_removes_one():
    t = tr.Tracking.build(ignored_tables=["audit_*"], masked_columns=["*.ssn"])
    assert not t.tracks("public", "audit_log") and not t.tracks("public", "django_session")
    assert t.columns("public", "auth_user", ["id", "password"]) == (frozenset({1}), frozenset())
    t = tr.Tracking.build(unsafe_track_builtins=["django_session"])
    assert t.tracks("public", "django_session")
    assert t.columns("public", "auth_user", ["id", "password"])[0] == {1}


@pytest.mark.parametrize("setting, value, message", [
    ("schemas", "public", "BEMI_SCHEMAS: must be a list"),
    ("ignored_tables", "todo", "BEMI_IGNORED_TABLES: must be a list"),
    ("ignored_tables", ["a.b.c"], "BEMI_IGNORED_TABLES: 'a.b.c' is not a pattern"),
    ("ignored_tables", ["todo["], "BEMI_IGNORED_TABLES: 'todo[' is not a pattern: unclosed"),
    ("ignored_tables", [""], "BEMI_IGNORED_TABLES: '' is not a pattern"),
    ("ignored_columns", ["todo"], "BEMI_IGNORED_COLUMNS: 'todo' is not a pattern"),
    ("masked_columns", [3], "BEMI_MASKED_COLUMNS: 3 is not a pattern"),
    ("masked_columns", ["a.b.c.d"], "BEMI_MASKED_COLUMNS: 'a.b.c.d' is not a pattern"),
    ("schemas", ["a.b"], "BEMI_SCHEMAS: 'a.b' is not a schema"),
    ("unsafe_track_builtins", ["todo"], "BEMI_UNSAFE_TRACK_BUILTINS: 'todo' is not a built-in"),
    ("skip_unchanged_updates", "yes", "BEMI_SKIP_UNCHANGED_UPDATES: must be True or False"),
])
def test_bad_settings_name_the_setting(setting, value, message):
    with pytest.raises(tr.TrackingError) as info:
        tr.Tracking.build(**{setting: value})
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("pattern, yes, no", [
    ("todo", [("public", "todo")], [("public", "todos"), ("sales", "todo")]),
    ("sales.*", [("sales", "x"), ("sales", "a.b")], [("public", "x"), ("salesx", "x")]),
    ("*.log_?", [("a", "log_1"), ("public", "log_x")], [("a", "log_12")]),
    ("t[0-9]", [("public", "t1")], [("public", "tx")]),
    ("t[!0-9]", [("public", "tx")], [("public", "t1")]),
    ("a+b(c)", [("public", "a+b(c)")], [("public", "aab(c)")]),
])
def test_patterns_match_like_fnmatch(pattern, yes, no):
    p = tr.Pattern.parse(pattern, "X", columns=False)
    for schema, table in yes:
        assert p.matches_table(schema, table), (schema, table)
    for schema, table in no:
        assert not p.matches_table(schema, table), (schema, table)
    re.compile(p.table)  # and the SQL regex is valid Python too (the database test checks PostgreSQL)


def test_masked_column_is_a_keyed_digest_equal_for_equal_values():
    (row,), _ = stitch("insert_with_context", tr.Tracking.build(masked_columns=["todo.task"]))
    after = json.loads(row.after)
    assert after["task"].startswith(tr.MASK_PREFIX) and "Sleep" not in row.after
    column_key = tr.column_key(KEY, "public", "todo", "task")
    assert after["task"] == json.loads(tr.mask_text(column_key, b"Sleep")) == tr.mask_json_value(column_key, "Sleep")
    assert tr.MARKER.match(after["task"])  # 32 hex digits
    other = tr.column_key(tr.derive_key("other"), "public", "todo", "task")
    assert after["task"] != tr.mask_json_value(other, "Sleep")  # keyed
    assert after["id"] == 1 and row.primary_key == "1"


def test_masked_primary_key_is_masked_too():
    (row,), _ = stitch("insert_with_context", tr.Tracking.build(masked_columns=["todo.id"]))
    assert row.primary_key.startswith(tr.MASK_PREFIX) and json.loads(row.after)["id"] == row.primary_key


def test_equal_values_in_two_columns_give_unrelated_markers():
    """Issue 18: one key for every column told anyone who reads `changes` that a token equals a secret."""
    tracking = tr.Tracking.build(masked_columns=["todo.task", "todo.note", "other.task"])
    (row,), _ = stitch("insert_with_context", tracking)
    assert json.loads(row.after)["task"] != tr.mask_json_value(tr.column_key(KEY, "public", "todo", "note"), "Sleep")
    assert json.loads(row.after)["task"] != tr.mask_json_value(tr.column_key(KEY, "public", "other", "task"), "Sleep")
    assert len({tr.column_key(KEY, *names) for names in [("a", "b", "c"), ("a", "b\0c", ""), ("a\0b", "c", "")]}) == 3


def test_a_marker_of_an_earlier_version_is_rekeyed_per_column_once():
    legacy = tr.legacy_marker(KEY, b"Sleep")
    assert tr.LEGACY_MARKER.match(legacy) and not tr.is_marker(legacy)
    task, note = tr.column_key(KEY, "public", "todo", "task"), tr.column_key(KEY, "public", "todo", "note")
    rekeyed = tr.mask_json_value(task, legacy)
    assert tr.is_marker(rekeyed) and rekeyed == tr.mask_json_value(task, legacy)  # equal stays equal
    assert rekeyed != tr.mask_json_value(note, legacy)  # across columns: unrelated
    assert tr.mask_json_value(task, rekeyed) == rekeyed  # never masked twice


def test_update_of_ignored_columns_only_is_not_recorded():
    rows, _ = stitch("update_toast", tr.Tracking.build())
    assert [r.operation for r in rows].count("UPDATE") == 1
    rows, stitcher = stitch("update_toast", tr.Tracking.build(ignored_columns=["todo.is_completed"]))
    assert [r.operation for r in rows].count("UPDATE") == 0 and stitcher.skipped_updates == 1
    rows, _ = stitch("update_toast", tr.Tracking.build(ignored_columns=["todo.note"]))
    (update,) = [r for r in rows if r.operation == "UPDATE"]
    assert json.loads(update.after)["note"] == json.loads(update.before)["note"]  # recorded in full


def test_ignored_tables_produce_no_rows():
    rows, _ = stitch("insert_with_context", tr.Tracking.build(ignored_tables=["to*"]))
    assert rows == []


def test_sql_rules_are_the_translated_patterns():
    t = tr.Tracking.build(schemas=["public", "sales_*"], ignored_tables=["sales_*.tmp_?"])
    assert t.sql_rules() == {
        "schemas": ["^(?:public)$", "^(?:sales_.*)$"],
        "ignored_tables": [["^(?:sales_.*)$", "^(?:tmp_.)$"], ["^(?:public)$", "^(?:django_session)$"]],
    }


@pytest.mark.parametrize("value", ["plain", 'quo"te', "back\\slash", "tab\there", "ü €", 42, 1.5, True, [1, "x"]])
def test_the_worker_and_bemi_redact_give_the_same_marker(value):
    from bemi.worker.values import dump_string

    text = dump_string(value) if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    assert json.loads(tr.mask_text(KEY, tr.canonical(text))) == tr.mask_json_value(KEY, value)
