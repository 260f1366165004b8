"""Transactions streamed before their commit (protocol version 2): bemi/worker/unstream.py.

The first tests read the messages as bytes (the protocol's formats, no server);
the others make a real walsender stream transactions to the worker, with the
walsender's logical_decoding_work_mem at its 64 kB minimum.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import psycopg
import pytest

from bemi.worker import pgoutput as po
from bemi.worker.runner import Worker
from bemi.worker.unstream import BUFFER_BYTES, StreamError, Unstreamer
from tests.test_worker_process import wait_for

# -- the messages, as a walsender sends them ---------------------------------------------------------


def start(xid: int, first: bool = True) -> bytes:
    return b"S" + struct.pack(">IB", xid, first)


STOP = b"E"


def insert(subxid: int, relid: int, value: bytes) -> bytes:
    return b"I" + struct.pack(">IIcH", subxid, relid, b"N", 1) + b"t" + struct.pack(">i", len(value)) + value


def stream_commit(xid: int, commit_lsn: int, end_lsn: int, when: int = 5) -> bytes:
    return b"c" + struct.pack(">IBQQq", xid, 0, commit_lsn, end_lsn, when)


def stream_abort(xid: int, subxid: int) -> bytes:
    return b"A" + struct.pack(">II", xid, subxid)


def feed(unstreamer: Unstreamer, *messages: bytes) -> list:
    out = []
    for lsn, data in enumerate(messages, start=100):
        out += [(at, po.decode(message)) for at, message in unstreamer.take(lsn, data)]
    return out


def inserted(out: list) -> list[bytes]:
    return [m.new[0] for _, m in out if isinstance(m, po.Insert)]


def test_a_streamed_transaction_comes_out_whole_at_its_commit_as_protocol_1_messages():
    u = Unstreamer()
    out = feed(u, start(7), insert(7, 16384, b"a"), insert(7, 16384, b"b"), STOP,
               start(9), insert(9, 16384, b"other"), STOP,
               start(7, first=False), insert(7, 16384, b"c"), STOP)
    assert out == []  # nothing before the commit
    out = feed(u, stream_commit(7, commit_lsn=500, end_lsn=508))
    begin, *changes, commit = [m for _, m in out]
    assert begin == po.Begin(500, po.pg_timestamp(5), 7)
    assert [c.new for c in changes] == [[b"a"], [b"b"], [b"c"]]
    assert commit == po.Commit(0, 500, 508, po.pg_timestamp(5))
    assert [lsn for lsn, _ in out[1:-1]] == [101, 102, 108]  # each change keeps its position
    assert list(u.spools) == [9]  # the other transaction is still open


def test_a_rolled_back_subtransaction_is_cut_out_with_those_started_after_it():
    u = Unstreamer()
    out = feed(u, start(7), insert(7, 1, b"top 1"), insert(8, 1, b"sub 8"), insert(9, 1, b"sub 9 in 8"),
               STOP, stream_abort(7, 8),  # ROLLBACK TO the savepoint of 8 (9 was released into it)
               start(7, first=False), insert(7, 1, b"top 2"), insert(10, 1, b"sub 10"), STOP,
               stream_abort(7, 11),  # a subtransaction without changes: nothing to cut
               stream_commit(7, 900, 908))
    assert inserted(out) == [b"top 1", b"top 2", b"sub 10"]


def test_a_rolled_back_transaction_leaves_nothing_and_its_file_is_gone():
    u = Unstreamer()
    feed(u, start(7), insert(7, 1, b"x" * 10_000), STOP)
    spool = u.spools[7]
    assert feed(u, stream_abort(7, 7)) == []
    assert u.spools == {} and spool.file.closed and u.aborted == 1


def test_stream_blocks_that_do_not_fit_together_are_refused():
    with pytest.raises(StreamError, match="whose first was not received"):
        feed(Unstreamer(), start(7, first=False))
    with pytest.raises(StreamError, match="inside the stream block"):
        feed(Unstreamer(), start(7), b"B" + bytes(20))
    with pytest.raises(StreamError, match="outside a stream block"):
        feed(Unstreamer(), STOP)
    with pytest.raises(po.DecodeError, match="truncated message 'I' in a stream block"):
        feed(Unstreamer(), start(7), b"I\x00\x00")


def test_a_streamed_transaction_is_kept_in_a_file_not_in_memory():
    u = Unstreamer()
    feed(u, start(7), *[insert(7, 1, b"v" * 1000) for _ in range(2000)], STOP)  # 2 MB of changes
    spool = u.spools[7]
    assert spool.size > 2_000_000
    assert os.fstat(spool.file.fileno()).st_size >= spool.size - BUFFER_BYTES  # all but a buffer on disk
    assert len(inserted(feed(u, stream_commit(7, 1000, 1008)))) == 2000


# -- a real walsender ------------------------------------------------------------------------------------


def small_memory_run(env, **overrides) -> None:
    """One ``--once`` run whose walsender decodes in 64 kB: a transaction of more is streamed."""
    config = dataclasses.replace(env.config(**overrides), decoding_memory_mb=0,
                                 source_dsn=env.dsn + " options='-c logical_decoding_work_mem=64kB'")
    assert Worker(config).run() == 0


def streamed_transactions(env) -> int:
    env.execute("SELECT pg_stat_clear_snapshot()")
    rows = env.execute("SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = %s", [env.slot])
    return rows[0][0] if rows else 0


def test_a_streamed_transaction_is_stored_whole_without_its_rolled_back_savepoints(worker_env):
    env = worker_env
    env.execute("CREATE TABLE unstream_w (id int PRIMARY KEY, v text)")
    small_memory_run(env)
    with psycopg.connect(env.dsn, autocommit=True) as other:
        with env.conn.transaction():
            env.execute(env.context(job="import") + "INSERT INTO unstream_w SELECT g, repeat('a', 300) "
                        "FROM generate_series(1, 1000) g")
            other.execute("INSERT INTO unstream_w VALUES (-1, 'committed while the big one runs')")
            env.execute("SAVEPOINT kept")
            env.execute(env.context(job="kept") + "UPDATE unstream_w SET v = 'kept' WHERE id BETWEEN 1 AND 10")
            env.execute("RELEASE SAVEPOINT kept")
            env.execute("SAVEPOINT dropped")
            env.execute(env.context(job="dropped") + "INSERT INTO unstream_w SELECT g, repeat('d', 300) "
                        "FROM generate_series(1001, 2000) g")
            env.execute("SAVEPOINT nested")
            env.execute("DELETE FROM unstream_w WHERE id BETWEEN 1 AND 5")
            env.execute("ROLLBACK TO SAVEPOINT dropped")
            env.execute(env.context(job="after") + "INSERT INTO unstream_w SELECT g, repeat('b', 300) "
                        "FROM generate_series(2001, 2500) g")
            other.execute("INSERT INTO unstream_w VALUES (-2, 'also')")
    small_memory_run(env)
    assert wait_for(lambda: streamed_transactions(env) > 0)
    rows = env.changes("\"table\" = 'unstream_w'")
    assert [(r["primary_key"], r["operation"]) for r in rows[:2]] == [("-1", "CREATE"), ("-2", "CREATE")]
    big = rows[2:]
    assert len({r["commit_position"] for r in big}) == 1 and [r["change_index"] for r in big] == list(range(1510))
    expected = ([(str(i), "CREATE", {"job": "import"}) for i in range(1, 1001)]
                + [(str(i), "UPDATE", {"job": "kept"}) for i in range(1, 11)]
                + [(str(i), "CREATE", {"job": "after"}) for i in range(2001, 2501)])
    assert [(r["primary_key"], r["operation"], {k: v for k, v in r["context"].items() if k != "SQL"})
            for r in big] == expected
    assert [r["after"]["v"] for r in big[1000:1010]] == ["kept"] * 10
    assert env.execute("SELECT count(*) FROM unstream_w")[0][0] == 1502  # the source agrees


def test_a_streamed_transaction_that_rolls_back_stores_nothing(worker_env):
    env = worker_env
    env.execute("CREATE TABLE unstream_r (id int PRIMARY KEY, v text)")
    small_memory_run(env)
    with pytest.raises(psycopg.errors.DivisionByZero):
        with env.conn.transaction():
            env.execute("INSERT INTO unstream_r SELECT g, repeat('a', 300) FROM generate_series(1, 2000) g")
            env.execute("SELECT 1 / 0")
    env.execute("INSERT INTO unstream_r VALUES (1, 'after')")
    small_memory_run(env)
    assert [r["after"]["v"] for r in env.changes("\"table\" = 'unstream_r'")] == ["after"]


def test_a_worker_stopped_while_a_transaction_streams_gets_it_whole_at_its_commit(worker_env):
    """The worker confirms positions past the start of a transaction it holds only in a file (later
    transactions are stored); stopped, it loses the file; the server streams it again from its first
    change after the restart, because it skips a transaction only by the position of its commit."""
    env = worker_env
    env.execute("CREATE TABLE unstream_k (id int PRIMARY KEY, v text)")
    small_memory_run(env)
    with psycopg.connect(env.dsn) as big:
        before = env.execute("SELECT pg_current_wal_insert_lsn()")[0][0]
        big.execute("INSERT INTO unstream_k SELECT g, repeat('a', 300) FROM generate_series(1, 1000) g")
        env.execute("INSERT INTO unstream_k VALUES (-1, 'later, committed first')")
        small_memory_run(env)  # stores -1, confirms past the big one's start, drops its file
        assert [r["primary_key"] for r in env.changes("\"table\" = 'unstream_k'")] == ["-1"]
        assert env.slot_state()["confirmed_flush_lsn"] > before  # past the big one's first change
        big.execute("INSERT INTO unstream_k SELECT g, repeat('b', 300) FROM generate_series(1001, 2000) g")
        big.commit()
    small_memory_run(env)
    assert wait_for(lambda: streamed_transactions(env) > 0)
    rows = env.changes("\"table\" = 'unstream_k'")
    assert len(rows) == 2001 and sorted(int(r["primary_key"]) for r in rows[1:]) == list(range(1, 2001))
