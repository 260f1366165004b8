"""Stitching: captured pgoutput messages -> change rows with their context (no database needed)."""

import json
import struct

import pytest

from bemi.worker import pgoutput as po
from bemi.worker.stitch import MAX_CONTEXT_BYTES, Stitcher, parse_context
from bemi.worker.values import JsonValues
from tests.workerapp.captured import messages

PKS = {"todo": ["id"], "keyonly": ["id"], "parent": ["id"], "child": ["id"]}


def stitch(*names, skip_through=0, stitcher=None):
    stitcher = stitcher or Stitcher(JsonValues(), lambda rel: PKS.get(rel.name), skip_through)
    rows, commits = [], []
    for name in names:
        for lsn, data in messages(name):
            commit = stitcher.feed(lsn, data, rows)
            if commit:
                commits.append(commit)
    return rows, commits, stitcher


def test_insert_gets_the_context_of_its_transaction():
    (row,), (commit,), _ = stitch("insert_with_context")
    assert (row.schema, row.table, row.operation, row.primary_key) == ("public", "todo", "CREATE", "1")
    assert row.before == "{}"
    assert json.loads(row.after) == {"id": 1, "task": "Sleep", "is_completed": False, "mood": "ok", "note": None}
    assert json.loads(row.context) == {"user_id": 187234, "SQL": "INSERT INTO ..."}
    assert row.commit_position == commit.commit_lsn and row.committed_at == commit.commit_time
    assert row.change_index == 0 and row.position > 0


def test_each_change_gets_the_latest_context_before_it():
    rows, _, _ = stitch("two_contexts")
    assert [(json.loads(r.after)["task"], json.loads(r.context)) for r in rows] == [
        ("Eat", {"step": 1}), ("Repeat", {"step": 2}),  # heartbeat and foreign prefixes ignored
    ]
    assert [r.change_index for r in rows] == [0, 1]


def test_context_does_not_leak_into_the_next_transaction():
    rows, _, _ = stitch("insert_with_context", "update_toast")
    assert json.loads(rows[-1].context) == {}


def test_update_takes_unchanged_toast_value_from_the_old_row():
    rows, _, _ = stitch("update_toast")
    (row,) = [r for r in rows if r.operation == "UPDATE"]
    before, after = json.loads(row.before), json.loads(row.after)
    assert before["is_completed"] is False and after["is_completed"] is True
    assert after["note"] == before["note"] and len(after["note"]) == 400 * 32


def test_delete_full_row_and_key_only_row():
    (row,), _, _ = stitch("delete")
    assert row.operation == "DELETE" and row.after == "{}" and row.primary_key == "2"
    assert json.loads(row.before)["task"] == "Eat"
    (row,), _, _ = stitch("key_only_delete")
    assert json.loads(row.before) == {"id": 1} and row.primary_key == "1"


def test_truncate_gives_one_change_per_table():
    rows, _, _ = stitch("truncate_cascade")
    assert sorted((r.table, r.operation, r.primary_key, r.before, r.after) for r in rows) == [
        ("child", "TRUNCATE", None, "{}", "{}"), ("parent", "TRUNCATE", None, "{}", "{}"),
    ]


def test_non_transactional_context_is_ignored():
    rows, commits, _ = stitch("non_transactional_message")
    assert rows == [] and commits == []


def test_transactions_at_or_before_the_checkpoint_are_skipped():
    _, (first,), _ = stitch("insert_with_context")
    rows, commits, stitcher = stitch("insert_with_context", "two_contexts", skip_through=first.commit_lsn)
    assert len(commits) == 2  # still reported, so the slot can advance past them
    assert [json.loads(r.after)["task"] for r in rows] == ["Eat", "Repeat"]


def test_primary_key_comes_from_the_catalog_not_a_column_named_id():
    rows, _, _ = stitch("insert_with_context", stitcher=Stitcher(JsonValues(), lambda rel: ["task"]))
    assert rows[0].primary_key == "Sleep"
    rows, _, _ = stitch("insert_with_context", stitcher=Stitcher(JsonValues(), lambda rel: ["id", "task"]))
    assert rows[0].primary_key == '[1,"Sleep"]'  # composite keys: a JSON array in key order


def test_own_tables_are_skipped_by_oid_not_by_name():
    rows, _, stitcher = stitch("insert_with_context")
    (relid,) = {r.relation.relid for r in stitcher.relations.values()}
    own = Stitcher(JsonValues(), lambda rel: PKS.get(rel.name), own_tables=frozenset({relid}))
    assert stitch("insert_with_context", stitcher=own)[0] == []
    assert len(rows) == 1  # the same table under another oid is tracked, whatever its name


# -- untrusted context payloads --------------------------------------------------------------

@pytest.mark.parametrize("payload, problem", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "not an object"),
    (b'"text"', "not an object"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"a": NaN}', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, None),  # > 1 MB or too deep: either way {}
    (b'{"a": "' + b"x" * MAX_CONTEXT_BYTES + b'"}', "larger than 1 MB"),
])
def test_bad_context_becomes_empty_object(payload, problem):
    text, found = parse_context(payload)
    assert text == "{}" and found
    if problem:
        assert problem in found


def test_context_keeps_numbers_exact_and_replaces_nul():
    text, problem = parse_context(b'{"big": 123456789012345678901234567890.000001, "n": 9223372036854775807, '
                                  b'"s": "a\\u0000b", "nested": {"l": [1.50, true, null]}}')
    assert problem is None
    assert text == ('{"big":123456789012345678901234567890.000001,"n":9223372036854775807,'
                    '"s":"a\ufffdb","nested":{"l":[1.50,true,null]}}')


def test_bad_context_is_counted_and_the_change_still_written():
    stitcher = Stitcher(JsonValues(), lambda rel: ["id"])
    rows = []
    for lsn, data in messages("two_contexts"):
        if data[:1] == b"M" and b"_bemi\x00" in data:
            prefix_end = data.index(b"\x00", 10) + 1
            data = data[:prefix_end] + struct.pack(">i", 3) + b"{{{"
        stitcher.feed(lsn, data, rows)
    assert [r.context for r in rows] == ["{}", "{}"]
    assert stitcher.bad_contexts == 2


def test_change_before_its_relation_is_an_error():
    stitcher = Stitcher(JsonValues())
    lsn, begin = messages("delete")[0]
    stitcher.feed(lsn, begin, [])
    delete = next(d for _, d in messages("delete") if d[:1] == b"D")
    with pytest.raises(po.DecodeError):
        stitcher.feed(lsn, delete, [])
