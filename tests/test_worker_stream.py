"""The streaming worker on a real PostgreSQL: the walsender, faults survived, dead letters, standby."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from bemi.worker.runner import Worker
from bemi_devtools.pgcluster import Cluster
from tests.test_worker_process import wait_for, wait_for_line
from tests.workerapp.harness import ROOT


def walsender_of(env) -> list[tuple]:
    """(pid, application_name, state) of the walsenders reading the test's slot."""
    return env.execute(
        "SELECT r.pid, r.application_name, r.state FROM pg_stat_replication r "
        "JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s", [env.slot])


def test_a_walsender_reads_the_slot_and_changes_arrive_without_polling(worker_env):
    env = worker_env
    env.execute("CREATE TABLE stream_w (id int PRIMARY KEY, v text)")
    env.run_once()
    proc = env.spawn("--poll-interval", "5")  # a poll interval does not delay anything any more
    # A walsender reports 'catchup' until it has sent what was in the WAL at its start, then 'streaming'.
    assert wait_for(lambda: [w[2] for w in walsender_of(env)] == ["streaming"], timeout=30)
    (pid, app, state), = walsender_of(env)
    assert app == "bemi-worker" and state == "streaming"
    started = time.monotonic()
    env.execute(env.context(user_id=1) + "INSERT INTO stream_w VALUES (1, 'a')")
    assert wait_for(lambda: env.execute("SELECT count(*) FROM bemi.changes")[0][0] == 1, timeout=10, interval=0.01)
    assert time.monotonic() - started < 2.0  # pushed by the server, not found by a 5 s poll
    # the slot's confirmed position follows the stored commit (status updates)
    commit_position = env.changes()[0]["commit_position"]
    assert wait_for(lambda: env.execute(
        "SELECT (confirmed_flush_lsn - '0/0')::int8 > %s FROM pg_replication_slots WHERE slot_name = %s",
        [commit_position, env.slot])[0][0])
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_poison_row_goes_to_the_dead_letters_and_the_rest_is_stored_once(worker_env):
    env = worker_env
    env.execute("CREATE TABLE poison_w (id int PRIMARY KEY, doc json)")
    env.run_once()
    env.execute("INSERT INTO poison_w VALUES (1, '{\"n\": 1}')")
    with env.conn.transaction():  # one transaction: a good row, the poison row, a good row
        env.execute(env.context(job="import") + "INSERT INTO poison_w VALUES (2, '{\"n\": 2}')")
        env.execute("INSERT INTO poison_w VALUES (3, '{\"n\": 1e1000000}')")
        env.execute("INSERT INTO poison_w VALUES (4, '{\"n\": 4}')")
    env.execute("INSERT INTO poison_w VALUES (5, '{\"n\": 5}')")
    worker = env.run_once()
    assert sorted(int(r["primary_key"]) for r in env.changes()) == [1, 2, 4, 5]
    assert worker.stats.dead_letters == 1
    (dead,) = env.execute(
        'SELECT "table", operation, primary_key, change_index, commit_position, position, sqlstate, error, '
        "convert_from(change, 'UTF8') FROM bemi._bemi_worker_failures WHERE slot = %s", [env.slot])
    table, op, pk, index, commit_position, position, sqlstate, error, change = dead
    assert (table, op, pk, index) == ("poison_w", "CREATE", "3", 1)
    assert sqlstate.startswith("22") and "numeric" in error
    assert '"n": 1e1000000' in change.replace('"n":1e1000000', '"n": 1e1000000')
    assert '"context":{"job":"import"}' in change.replace(" ", "")
    same_tx = env.changes("primary_key = '2'")[0]
    assert same_tx["commit_position"] == commit_position and position > same_tx["position"] - 1
    # later changes are stored, and nothing is stored twice
    env.execute("INSERT INTO poison_w VALUES (6, '{\"n\": 6}')")
    env.run_once()
    assert sorted(int(r["primary_key"]) for r in env.changes()) == [1, 2, 4, 5, 6]
    assert env.execute("SELECT count(*) FROM bemi._bemi_worker_failures WHERE slot = %s", [env.slot])[0][0] == 1
    env.execute("DELETE FROM bemi._bemi_worker_failures WHERE slot = %s", [env.slot])


def test_standby_takes_over_within_seconds_after_sigkill(worker_env):
    env = worker_env
    env.execute("CREATE TABLE standby_w (id int PRIMARY KEY)")
    env.run_once()
    active = env.spawn()
    assert wait_for_line(active, "reading slot")
    standby = env.spawn("--standby")
    assert wait_for_line(standby, "standby: another worker holds slot")
    env.execute("INSERT INTO standby_w VALUES (1)")
    assert wait_for(lambda: env.execute("SELECT count(*) FROM bemi.changes")[0][0] == 1)
    active.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert active.wait() == -signal.SIGKILL
    env.execute("INSERT INTO standby_w VALUES (2)")
    assert wait_for_line(standby, "taking over slot", timeout=20)
    assert wait_for(lambda: env.execute("SELECT count(*) FROM bemi.changes")[0][0] == 2, timeout=20, interval=0.02)
    took = time.monotonic() - killed_at
    assert took < 10, took
    assert [r["primary_key"] for r in env.changes()] == ["1", "2"]
    assert standby.poll() is None


def _rss_kb(pid: int, field: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def test_foreign_messages_are_skipped_without_holding_them(worker_env):
    env = worker_env
    env.execute("CREATE TABLE foreign_w (id int PRIMARY KEY)")
    env.run_once()
    proc = env.spawn()
    assert wait_for_line(proc, "reading slot")
    env.execute("INSERT INTO foreign_w VALUES (0)")
    assert wait_for(lambda: env.execute("SELECT count(*) FROM bemi.changes")[0][0] == 1)
    baseline = _rss_kb(proc.pid)
    size = 40 * 1024 * 1024
    with env.conn.transaction():
        for _ in range(8):
            env.execute("SELECT pg_logical_emit_message(true, 'not-bemi', repeat('x', %s))", [size])
        env.execute("SELECT pg_logical_emit_message(true, '_bemi', repeat('y', %s))", [2 * 1024 * 1024])
        env.execute("INSERT INTO foreign_w VALUES (1)")
    assert wait_for(lambda: env.execute("SELECT count(*) FROM bemi.changes")[0][0] == 2, timeout=120)
    peak = _rss_kb(proc.pid)
    grown_mb = (peak - baseline) / 1024
    # One message at a time, never the eight: libpq's input buffer (grown to a power of two) and the
    # copy it hands out, about 2.5 times one message; the worker itself copies none of it.
    assert grown_mb < 4 * size / 2**20, (baseline, peak)
    assert env.changes("primary_key = '1'")[0]["context"] == {}  # the oversized context was dropped
    assert proc.poll() is None


def test_planted_functions_are_never_called_by_the_worker(worker_env):
    """A role that may CREATE in public plants functions that match the worker's calls better than the
    built-ins (text instead of name, ...); the worker must call the built-ins (issue 9, item 2)."""
    env = worker_env
    env.execute("DROP ROLE IF EXISTS bemi_hostile; CREATE ROLE bemi_hostile LOGIN")
    env.execute("GRANT CREATE ON SCHEMA public TO bemi_hostile")
    env.execute("CREATE TABLE public.hostile_log (fn text, by_user text)")
    env.execute("GRANT INSERT ON public.hostile_log TO bemi_hostile")
    env.execute("CREATE TABLE hostile_w (id int PRIMARY KEY)")
    planted = [
        ("pg_create_logical_replication_slot", "a text, b text", "SETOF record", "a"),
        ("pg_replication_slot_advance", "a text, b pg_lsn", "SETOF record", "a"),
        ("pg_logical_slot_peek_binary_changes", "a text, b pg_lsn, c int, VARIADIC d text[]", "SETOF record", "a"),
        ("pg_try_advisory_lock", "a bigint, b bigint", "boolean", "true"),
        ("set_config", "a text, b text, c boolean", "text", "a"),
        ("to_regclass", "a text", "regclass", "NULL"),
        ("current_setting", "a text", "text", "'logical'"),
        ("pg_logical_emit_message", "a boolean, b text, c text", "pg_lsn", "NULL"),
        ("pg_current_wal_lsn", "", "pg_lsn", "NULL"),
        ("pg_current_wal_flush_lsn", "", "pg_lsn", "NULL"),
    ]
    try:
        with psycopg.connect(env.dsn.replace("user=postgres", "user=bemi_hostile"), autocommit=True) as hostile:
            for name, args, returns, result in planted:
                body = (f"INSERT INTO public.hostile_log VALUES ('{name}', current_user); "
                        + ("RETURN;" if returns.startswith("SETOF") else f"RETURN {result};"))
                hostile.execute(f"CREATE FUNCTION public.{name}({args}) RETURNS {returns} "
                                f"LANGUAGE plpgsql AS $$ BEGIN {body} END $$")
        env.run_once()  # creates the slot, streams, confirms
        env.execute("INSERT INTO hostile_w VALUES (1)")
        env.run_once()
        assert [r["primary_key"] for r in env.changes()] == ["1"]
        assert env.execute("SELECT * FROM public.hostile_log") == []
    finally:
        for name, args, *_ in planted:
            env.execute(f"DROP FUNCTION IF EXISTS public.{name}({args})")
        env.execute("DROP TABLE IF EXISTS public.hostile_log")
        env.execute("REVOKE CREATE ON SCHEMA public FROM bemi_hostile; DROP ROLE bemi_hostile")


def test_checkpoint_keyed_by_database_name_is_upgraded_and_adopted(worker_env):
    env = worker_env
    env.execute("CREATE TABLE upgrade_w (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO upgrade_w VALUES (1)")
    env.run_once()
    # the table as earlier releases made it: keyed by (slot, database name), no source column
    env.execute("ALTER TABLE bemi._bemi_worker_checkpoints DROP COLUMN source")
    env.execute("ALTER TABLE bemi._bemi_worker_checkpoints ADD PRIMARY KEY (slot, database)")
    # and a stopped-before-advance situation: the slot holds transaction 1 again
    env.execute("INSERT INTO upgrade_w VALUES (2)")
    worker = env.run_once()
    assert sorted(r["primary_key"] for r in env.changes()) == ["1", "2"]
    (source,), = env.execute("SELECT source FROM bemi._bemi_worker_checkpoints WHERE slot = %s", [env.slot])
    assert source == worker.source_identity and "/" in source


# -- faults on a private cluster (restarted by the test) ----------------------------------------

def _writer(dsn: str, stop: threading.Event, done: list[int], rate: float = 200.0) -> None:
    """Insert ids 1, 2, 3... one per transaction, through restarts: a write whose outcome was lost
    with the connection is checked before it is retried, so each id is committed exactly once."""
    conn = None
    next_id = 1
    while not stop.is_set():
        try:
            if conn is None:
                conn = psycopg.connect(dsn, autocommit=True, connect_timeout=2)
                if conn.execute("SELECT 1 FROM fault_t WHERE id = %s", [next_id]).fetchone():
                    done.append(next_id)
                    next_id += 1
            conn.execute("INSERT INTO fault_t VALUES (%s)", [next_id])
            done.append(next_id)
            next_id += 1
            time.sleep(1 / rate)
        except psycopg.Error:
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.1)
    if conn is not None:
        conn.close()


def test_killed_connections_and_a_server_restart_lose_and_double_nothing():
    cluster = Cluster(settings={"wal_sender_timeout": "10s"})
    cluster.start()
    proc = None
    try:
        dsn = cluster.dsn()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("CREATE TABLE fault_t (id int PRIMARY KEY)")
        args = [sys.executable, "-m", "bemi.cli", "--dsn", dsn, "--slot", "fault", "--publication", "fault"]
        assert subprocess.run(args + ["--once"], cwd=ROOT, capture_output=True, timeout=60).returncode == 0
        # The log goes to a file: a pipe nobody reads while the test runs would fill up and block the worker.
        log_path = os.path.join(cluster.datadir, "worker.log")
        log_file = open(log_path, "w")
        proc = subprocess.Popen(args, cwd=ROOT, stderr=log_file, stdout=subprocess.DEVNULL, text=True)

        def worker_log() -> str:
            with open(log_path) as fh:
                return fh.read()

        assert wait_for(lambda: "reading slot" in worker_log())
        stop, done = threading.Event(), []
        writer = threading.Thread(target=_writer, args=(dsn, stop, done))
        writer.start()

        def stored() -> int:
            with psycopg.connect(dsn) as c:
                return c.execute("SELECT count(*) FROM bemi.changes").fetchone()[0]

        def kill(query: str) -> None:
            with psycopg.connect(dsn, autocommit=True) as c:
                assert c.execute(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {query}"
                                 ).fetchone()[0] >= 1

        try:
            time.sleep(1.0)
            kill("application_name = 'bemi-worker' AND backend_type = 'walsender'")
            time.sleep(1.5)
            before = stored()
            assert wait_for(lambda: stored() > before, timeout=30)
            kill("application_name = 'bemi-worker' AND backend_type = 'client backend'")  # control + destination
            time.sleep(1.5)
            before = stored()
            assert wait_for(lambda: stored() > before, timeout=30)
            cluster.stop("fast")
            time.sleep(0.5)
            cluster.start()
            time.sleep(1.0)
            before = stored()
            assert wait_for(lambda: stored() > before, timeout=60)
        except AssertionError:
            log = "\n".join(line for line in worker_log().splitlines() if "INFO wrote" not in line)
            raise AssertionError(f"{len(done)} written; worker log without 'wrote' lines:\n{log[-4000:]}")
        finally:
            stop.set()
            writer.join()
        assert wait_for(lambda: stored() >= len(done), timeout=60)
        time.sleep(0.5)
        with psycopg.connect(dsn) as c:
            rows = c.execute("SELECT primary_key::int FROM bemi.changes WHERE \"table\" = 'fault_t'").fetchall()
        ids = sorted(r[0] for r in rows)
        assert ids == list(range(1, len(done) + 1)), "lost or doubled changes"
        assert len(done) > 200
        assert proc.poll() is None  # the same process survived it all
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        log_file.close()
        err = worker_log()
        assert err.count("reconnecting in") >= 3, err
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.destroy()


def test_bulk_update_with_big_contexts_stays_bounded(worker_env):
    """20,000 changed rows, each with a 4 kB context (the wrapper's default cap of the SQL): COPY chunks are bounded
    by bytes, not rows."""
    env = worker_env
    env.execute("CREATE TABLE bulk_w (id int PRIMARY KEY, n int, note text)")
    env.execute("ALTER TABLE bulk_w REPLICA IDENTITY FULL")
    env.execute("INSERT INTO bulk_w SELECT g, 0, md5(g::text) FROM generate_series(1, 20000) g")
    env.run_once()
    proc = env.spawn()
    assert wait_for_line(proc, "reading slot")
    baseline = _rss_kb(proc.pid)
    sql = "UPDATE bulk_w SET n = CASE id " + " ".join(f"WHEN {i} THEN {i}" for i in range(1, 700)) + " END"
    with env.conn.transaction():
        env.execute(env.context(user_id=7, SQL=sql[:4096]))
        env.execute("UPDATE bulk_w SET n = n + 1")
    started = time.monotonic()
    assert wait_for(lambda: env.execute("SELECT count(*) FROM bemi.changes WHERE operation = 'UPDATE'")[0][0] == 20000,
                    timeout=180, interval=0.1)
    elapsed = time.monotonic() - started
    grown_mb = (_rss_kb(proc.pid) - baseline) / 1024
    print(f"20,000-row update with 4 kB contexts: stored in {elapsed:.1f} s, worker RSS +{grown_mb:.0f} MB")
    assert grown_mb < 200, grown_mb
    assert env.execute("SELECT count(DISTINCT context) FROM bemi.changes WHERE operation = 'UPDATE'")[0][0] == 1


def test_a_slot_dropped_while_running_is_an_exit_2_not_a_retry(worker_env):
    env = worker_env
    env.execute("CREATE TABLE dropped_w (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO dropped_w VALUES (1)")
    proc = env.spawn()
    assert wait_for(lambda: env.execute("SELECT count(*) FROM bemi.changes")[0][0] == 1)
    # the walsender must go before the slot can be dropped; the worker then finds it missing
    env.execute("SELECT pg_terminate_backend(active_pid), pg_sleep(0.2) FROM pg_replication_slots "
                "WHERE slot_name = %s", [env.slot])
    assert wait_for(lambda: env.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                                        "WHERE slot_name = %s AND NOT active", [env.slot]) or env.slot_state() is None)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert f"replication slot {env.slot!r} is missing" in stderr
    assert env.slot_state() is None  # never recreated silently


def test_worker_stats_follow_what_was_stored(worker_env):
    env = worker_env
    env.execute("CREATE TABLE stats_w (id int PRIMARY KEY, v int)")
    env.run_once()
    env.execute("INSERT INTO stats_w VALUES (1, 1), (2, 2)")
    env.execute("UPDATE stats_w SET v = 3 WHERE id = 1")
    with env.conn.transaction():
        env.execute("SELECT pg_logical_emit_message(true, '_bemi', 'not json')")
        env.execute("DELETE FROM stats_w WHERE id = 2")
    worker = env.run_once()
    stats = worker.stats
    assert dict(stats.written) == {("stats_w", "CREATE"): 2, ("stats_w", "UPDATE"): 1, ("stats_w", "DELETE"): 1}
    assert stats.dropped_contexts == 1 and stats.dead_letters == 0 and stats.reconnects == 0
    last = env.changes()[-1]
    assert stats.last_commit_lsn > last["commit_position"] and stats.last_commit_time == last["committed_at"]
    assert stats.server_wal_end >= stats.last_commit_lsn
    assert not stats.streaming  # closed after --once


def test_a_character_the_destination_cannot_store_is_a_dead_letter(worker_env):
    env = worker_env
    dest_db = f"bemi_latin1_{os.getpid()}"
    env.execute(f"DROP DATABASE IF EXISTS {dest_db}")
    env.execute(f"CREATE DATABASE {dest_db} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        env.execute("CREATE TABLE latin_w (id int PRIMARY KEY, v text)")
        from tests.db import db_dsn

        dest = db_dsn(dest_db)
        env.run_once(destination_dsn=dest)
        env.execute("INSERT INTO latin_w VALUES (1, 'caf\u00e9'), (2, '20 \u20ac'), (3, 'plain')")
        worker = env.run_once(destination_dsn=dest)
        assert worker.stats.dead_letters == 1
        with psycopg.connect(dest) as conn:
            assert [r[0] for r in conn.execute(
                "SELECT primary_key FROM bemi.changes ORDER BY change_index").fetchall()] == ["1", "3"]
            (pk, sqlstate, change), = conn.execute(
                "SELECT primary_key, sqlstate, change FROM bemi._bemi_worker_failures").fetchall()
        assert pk == "2" and sqlstate == "22P05"
        assert "20 \u20ac" in bytes(change).decode("utf-8")  # kept exactly, as UTF-8
    finally:
        env.execute(f"DROP DATABASE IF EXISTS {dest_db} WITH (FORCE)")


def test_the_walsender_streams_a_transaction_larger_than_the_memory_the_worker_asks_for(worker_env):
    """A transaction larger than logical_decoding_work_mem is streamed to the worker before its commit
    (protocol version 2), never spilled to the server's disk and read back at its commit, one system call
    per change (the worker's own write of it too, when ``changes`` is in the source database: what delayed
    the next changes after 300,000 rows). ``decoding_memory_mb`` sets it for the worker's walsender; 0
    leaves the server's."""
    env = worker_env
    env.execute("CREATE TABLE spill_w (id int PRIMARY KEY, v text)")
    small = env.dsn + " options='-c logical_decoding_work_mem=64kB'"  # as a server configured with 64kB

    def run(decoding_memory_mb: int) -> None:
        assert Worker(dataclasses.replace(env.config(), source_dsn=small,
                                          decoding_memory_mb=decoding_memory_mb)).run() == 0

    def slot_stats() -> tuple[int, int, int]:
        env.execute("SELECT pg_stat_clear_snapshot()")
        rows = env.execute("SELECT spill_txns, stream_txns, total_txns FROM pg_stat_replication_slots "
                           "WHERE slot_name = %s", [env.slot])
        return rows[0] if rows else (0, 0, 0)

    run(0)  # creates the slot
    env.execute("INSERT INTO spill_w SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g")  # ~0.5 MB
    run(0)
    assert wait_for(lambda: slot_stats()[1] > 0)  # streamed with 64kB
    spilled, streamed, seen = slot_stats()
    assert spilled == 0
    assert env.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'spill_w'")[0][0] == 2000
    env.execute("INSERT INTO spill_w SELECT g, repeat('x', 200) FROM generate_series(2001, 4000) g")
    run(64)
    assert wait_for(lambda: slot_stats()[2] > seen)  # the walsender's statistics of this run are in
    assert slot_stats()[:2] == (0, streamed)  # neither spilled nor streamed with 64 MB
    assert env.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'spill_w'")[0][0] == 4000
