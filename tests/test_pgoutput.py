"""pgoutput decoding, on bytes captured from a real PostgreSQL 15 (no database needed)."""

import struct
from datetime import datetime, timezone

import pytest

from bemi.worker import pgoutput as po
from tests.workerapp.captured import all_messages, messages


def decoded(name):
    return [po.decode(data) for _lsn, data in messages(name)]


def test_every_captured_message_decodes():
    kinds = {type(po.decode(data)).__name__ for _lsn, data in all_messages()}
    assert kinds >= {"Begin", "Commit", "Relation", "TypeMsg", "Insert", "Update", "Delete", "Truncate", "Message"}


def test_begin_insert_commit_with_context_message():
    begin, message, type_msg, relation, insert, commit = decoded("insert_with_context")
    assert isinstance(begin, po.Begin) and isinstance(commit, po.Commit)
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert begin.commit_time == commit.commit_time
    assert abs(begin.commit_time - datetime.now(timezone.utc)).days < 3650
    assert begin.xid > 0
    assert message == po.Message(True, message.lsn, "_bemi", b'{"user_id": 187234, "SQL": "INSERT INTO ..."}')
    assert (type_msg.namespace, type_msg.name) == ("public", "mood")
    assert (relation.namespace, relation.name, relation.replica_identity) == ("public", "todo", "f")
    assert [(c.name, c.type_oid, c.flags) for c in relation.columns] == [
        ("id", 23, 1), ("task", 25, 1), ("is_completed", 16, 1), ("mood", type_msg.oid, 1), ("note", 25, 1),
    ]
    assert insert.relid == relation.relid
    assert insert.new == [b"1", b"Sleep", b"f", b"ok", None]


def test_update_with_unchanged_toast_value_and_full_old_row():
    update = next(m for m in decoded("update_toast") if isinstance(m, po.Update))
    assert not update.old_is_key
    assert update.old[:3] == [b"1", b"Sleep", b"f"]
    assert len(update.old[4]) == 400 * 32  # REPLICA IDENTITY FULL logs the old TOASTed value inline
    assert update.new[:3] == [b"1", b"Sleep", b"t"]
    assert update.new[4] is po.UNCHANGED


def test_delete_full_and_key_only():
    delete = next(m for m in decoded("delete") if isinstance(m, po.Delete))
    assert not delete.old_is_key and delete.old[:2] == [b"2", b"Eat"]
    key_delete = next(m for m in decoded("key_only_delete") if isinstance(m, po.Delete))
    assert key_delete.old_is_key and key_delete.old == [b"1", None]


def test_truncate_cascade_lists_every_table():
    msgs = decoded("truncate_cascade")
    relations = {m.relid: m.name for m in msgs if isinstance(m, po.Relation)}
    truncate = next(m for m in msgs if isinstance(m, po.Truncate))
    assert truncate.options & 1  # CASCADE
    assert sorted(relations[r] for r in truncate.relids) == ["child", "parent"]


def test_non_transactional_message_stands_alone():
    (message,) = decoded("non_transactional_message")
    assert not message.transactional and message.prefix == "_bemi"


def test_lsn_text_round_trip():
    assert po.lsn_to_int("16/B374D848") == 0x16B374D848
    assert po.int_to_lsn(0x16B374D848) == "16/B374D848"


@pytest.mark.parametrize("data", [b"", b"Z", b"B\x00\x01", b"I\x00\x00\x40\x06N\x00\x01t\x00\x00\x00\x09ab"])
def test_garbage_is_a_decode_error(data):
    with pytest.raises(po.DecodeError):
        po.decode(data)


def test_insert_short_path_matches_the_full_decoder():
    for _lsn, data in messages("insert_with_context"):
        if data[:1] == b"I":
            full = po.decode(data)
            assert po.decode_insert(data) == (full.relid, full.new)
            with pytest.raises(po.DecodeError):
                po.decode_insert(data[:-3])


def test_each_begin_and_commit_gets_its_own_commit_time():
    """The last commit time converted is reused (a Begin and its Commit carry the same one), never another's."""
    def begin(ts: int) -> bytes:
        return b"B" + struct.pack(">QqI", 0x100, ts, 7)

    def commit(ts: int) -> bytes:
        return b"C\x00" + struct.pack(">QQq", 0x100, 0x200, ts)

    times = [0, 1, 1, 86_400_000_000, -1, 1]
    decoded = [po.decode(make(ts)) for ts in times for make in (begin, commit)]
    assert [m.commit_time for m in decoded] == [po.pg_timestamp(ts) for ts in times for _ in (1, 2)]
    assert decoded[2].commit_time == datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("prefix", [b"", b"_bemi", "é".encode() * 10, b"p" * po.MAX_PREFIX_BYTES])
def test_message_header_reads_the_prefix_and_where_the_content_is(prefix):
    content = b'{"a": 1}'
    data = b"M\x01" + struct.pack(">Q", 0x42) + prefix + b"\0" + struct.pack(">i", len(content)) + content
    transactional, lsn, got, start, length = po.message_header(memoryview(data))
    assert (transactional, lsn, got) == (True, 0x42, prefix.decode())
    assert data[start:start + length] == content
    longer = b"M\x00" + struct.pack(">Q", 1) + b"p" * (po.MAX_PREFIX_BYTES + 1) + b"\0" + struct.pack(">i", 0)
    assert po.message_header(longer) == (False, 1, None, 0, 0)
    with pytest.raises(po.DecodeError):
        po.message_header(b"M\x01" + struct.pack(">Q", 1) + b"no terminating nul")
