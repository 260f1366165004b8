"""The worker as a real process: kill -9 at any moment, signals, a second worker, safety checks."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import psycopg
import pytest

from bemi.worker.errors import WorkerError
from bemi.worker.slot import SlotState, check_slot
from tests.db import db_dsn
from tests.workerapp.harness import ROOT, WorkerEnv

COMPARE = ('SELECT commit_position, change_index, "schema", "table", operation, primary_key, before::text, '
           'after::text, context::text, position, transaction_id, committed_at FROM bemi.changes '
           'ORDER BY commit_position, change_index')


def wait_for(predicate, timeout=30.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 30.0) -> bool:
    """Read the process's stderr until a line contains ``text``."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if selector.select(timeout=0.1):
                line = proc.stderr.readline()
                if not line:
                    return False
                if text in line:
                    return True
        return False
    finally:
        selector.unregister(proc.stderr)


def mixed_workload(dsn: str, seconds: float, seed: int = 7) -> int:
    """Committed and rolled-back writes of every kind; returns the number of changes committed."""
    rng = random.Random(seed)
    expected = 0
    deadline = time.monotonic() + seconds
    with psycopg.connect(dsn, autocommit=True) as conn:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            kind = rng.choice(["single", "multi", "update", "delete", "two_contexts", "rollback", "copy",
                               "truncate", "single", "multi"])
            ctx = f"SELECT pg_logical_emit_message(true, '_bemi', '{{\"n\": {n}, \"kind\": \"{kind}\"}}');"
            try:
                with conn.transaction():
                    conn.execute(ctx)
                    if kind == "single":
                        conn.execute(f"INSERT INTO km_a (v, n) VALUES ('single {n}', {n})")
                        expected += 1
                    elif kind == "multi":
                        cur = conn.execute(f"INSERT INTO km_a (v, n) SELECT 'multi', g "
                                           f"FROM generate_series(1, {rng.randint(2, 100)}) g")
                        expected += cur.rowcount
                    elif kind == "update":
                        cur = conn.execute(f"UPDATE km_a SET n = n + 1 WHERE id IN "
                                           f"(SELECT id FROM km_a WHERE id % 13 = {n % 13} LIMIT 25)")
                        expected += cur.rowcount
                    elif kind == "delete":
                        cur = conn.execute(f"DELETE FROM km_a WHERE id IN "
                                           f"(SELECT id FROM km_a WHERE id % 11 = {n % 11} LIMIT 10)")
                        expected += cur.rowcount
                    elif kind == "two_contexts":
                        conn.execute(f"INSERT INTO km_b VALUES ({n}, '{{\"first\": true}}')")
                        conn.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"second\": true}')")
                        conn.execute(f"UPDATE km_b SET payload = '{{\"first\": false}}' WHERE id = {n}")
                        expected += 2
                    elif kind == "rollback":
                        conn.execute("INSERT INTO km_a (v, n) VALUES ('rolled back', 0)")
                        raise _Rollback
                    elif kind == "copy":
                        with conn.cursor().copy("COPY km_a (v, n) FROM STDIN") as copy:
                            for i in range(rng.randint(200, 1500)):
                                copy.write_row((f"copy {n}", i))
                                expected += 1
                    elif kind == "truncate":
                        conn.execute("TRUNCATE km_c")
                        conn.execute("INSERT INTO km_c VALUES (1)")
                        expected += 2
            except _Rollback:
                pass
            time.sleep(rng.random() * 0.01)
    return expected


class _Rollback(Exception):
    pass


@contextlib.contextmanager
def tables_and_truth(env, name: str) -> Iterator[tuple[WorkerEnv, str]]:
    """mixed_workload's tables, tracked from env's slot on, and a second worker on a slot and database of
    its own (``<name>_<pid>``), both at the same position: the uninterrupted reference. Yields that
    worker and its database's DSN; removes them, and the tables, afterwards."""
    truth_db = f"{name}_{os.getpid()}"
    env.execute(f"DROP DATABASE IF EXISTS {truth_db}")
    env.execute(f"CREATE DATABASE {truth_db}")
    truth = WorkerEnv(env.dsn)
    truth.publication = env.publication
    truth_dsn = db_dsn(truth_db)
    try:
        env.execute("CREATE TABLE km_a (id serial PRIMARY KEY, v text, n int)")
        env.execute("CREATE TABLE km_b (id int PRIMARY KEY, payload jsonb)")
        env.execute("CREATE TABLE km_c (id int)")
        env.execute("ALTER TABLE km_a REPLICA IDENTITY FULL; ALTER TABLE km_b REPLICA IDENTITY FULL; "
                    "ALTER TABLE km_c REPLICA IDENTITY FULL")
        env.run_once()
        truth.run_once(destination_dsn=truth_dsn)
        yield truth, truth_dsn
    finally:
        env.execute("SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots WHERE slot_name = %s",
                    [truth.slot, truth.slot])
        truth.conn.close()
        env.execute(f"DROP DATABASE IF EXISTS {truth_db}")
        env.execute("DROP TABLE IF EXISTS km_a, km_b, km_c")


def test_repeated_kill_9_loses_and_duplicates_nothing(worker_env):
    env = worker_env
    with tables_and_truth(env, "bemi_truth") as (truth, truth_dsn):
        result = {}
        workload = threading.Thread(target=lambda: result.update(expected=mixed_workload(env.dsn, 5.0)))
        workload.start()
        rng = random.Random(11)
        kills = progressed = 0
        while workload.is_alive() or kills < 10:
            count_before = env.execute("SELECT count(*) FROM bemi.changes")[0][0]
            proc = env.spawn("--batch-rows", "700", "--poll-interval", "0.02")
            assert wait_for_line(proc, "reading slot")  # set up: from now on it reads and writes
            time.sleep(rng.uniform(0.02, 0.5))
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
            kills += 1
            progressed += env.execute("SELECT count(*) FROM bemi.changes")[0][0] > count_before
        workload.join()

        done = env.cli("--once")
        assert done.returncode == 0, done.stderr
        truth.run_once(destination_dsn=truth_dsn)
        killed_rows = env.execute(COMPARE)
        with psycopg.connect(truth_dsn) as conn:
            truth_rows = conn.execute(COMPARE).fetchall()
        assert len(killed_rows) == result["expected"] > 1000
        assert killed_rows == truth_rows
        # Several kills hit a worker that was storing changes, not an idle one. (Not kills // 2:
        # kills after the 5 s workload ends find nothing to do, and on a loaded machine those are many.)
        assert progressed >= 3, (progressed, kills)


def test_sigterm_finishes_the_batch_commits_and_exits_0(worker_env):
    env = worker_env
    env.execute("CREATE TABLE sig_w (id int PRIMARY KEY)")
    env.run_once()
    proc = env.spawn("--poll-interval", "0.02")
    env.execute("INSERT INTO sig_w SELECT generate_series(1, 100)")
    assert wait_for(lambda: env.execute("SELECT count(*) FROM bemi.changes")[0][0] == 100)
    env.execute("INSERT INTO sig_w SELECT generate_series(101, 20100)")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "received SIGTERM" in stderr
    assert env.cli("--once").returncode == 0
    assert env.execute("SELECT count(*), count(DISTINCT primary_key) FROM bemi.changes")[0] == (20100, 20100)


def test_the_log_counts_the_time_spent_writing_not_the_idle_time_before(worker_env):
    env = worker_env
    env.execute("CREATE TABLE idle_w (id int PRIMARY KEY)")
    env.run_once()
    proc = env.spawn("--poll-interval", "0.02")
    assert wait_for(lambda: (env.slot_state() or {}).get("active"))
    idle = 3.0
    time.sleep(idle)  # a quiet application
    env.execute("INSERT INTO idle_w VALUES (1)")
    assert wait_for(lambda: env.execute("SELECT count(*) FROM changes")[0][0] == 1)
    time.sleep(1.2)  # the line comes at most a second later
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    (line,) = [line for line in stderr.splitlines() if " wrote " in line]
    match = re.search(r"wrote 1 change in ([0-9.]+) s \(([0-9]+) changes/s\)", line)
    assert match, line  # one change, not "1 changes"
    # the seconds are those of writing it: not the idle time before (which gave "in 9.748 s (0 changes/s)")
    assert float(match[1]) < idle and int(match[2]) > 0, line


def test_second_worker_on_the_same_slot_exits_with_a_clear_message(worker_env):
    env = worker_env
    env.run_once()
    first = env.spawn()
    assert wait_for(lambda: env.execute(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'bemi-worker' AND pid <> pg_backend_pid()"))
    time.sleep(0.5)  # let it take the lock
    second = env.cli("--once")
    assert second.returncode == 3
    assert f"another bemi worker is already reading slot {env.slot!r}" in second.stderr
    assert first.poll() is None  # the first one is unaffected


def test_missing_slot_after_a_checkpoint_is_a_loud_error(worker_env):
    env = worker_env
    env.execute("CREATE TABLE lost_w (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO lost_w VALUES (1)")
    env.run_once()
    env.execute("SELECT pg_drop_replication_slot(%s)", [env.slot])
    result = env.cli("--once")
    assert result.returncode == 2
    assert f"replication slot {env.slot!r} is missing" in result.stderr
    assert "_bemi_worker_checkpoints" in result.stderr
    assert env.slot_state() is None  # never recreated silently


def test_invalidated_or_foreign_slot_is_refused():
    with pytest.raises(WorkerError, match="wal_status = 'lost'"):
        check_slot(SlotState("pgoutput", "db", "lost", 0), "bemi", "db")
    with pytest.raises(WorkerError, match="plugin 'test_decoding'"):
        check_slot(SlotState("test_decoding", "db", "reserved", 0), "bemi", "db")
    check_slot(SlotState("pgoutput", "db", "reserved", 0), "bemi", "db")


def test_idle_heartbeat_advances_confirmed_flush_lsn(worker_env):
    env = worker_env
    env.run_once()
    proc = env.spawn("--heartbeat-interval", "0.3", "--poll-interval", "0.05")
    # WAL written elsewhere in the cluster (another database): nothing for our slot to decode
    with psycopg.connect(db_dsn("postgres"), autocommit=True) as other:
        other.execute("CREATE TABLE IF NOT EXISTS bemi_hb_noise (v int)")
        other.execute("INSERT INTO bemi_hb_noise SELECT generate_series(1, 1000)")
        target = other.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        other.execute("DROP TABLE bemi_hb_noise")
    assert wait_for(lambda: env.execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
        [target, env.slot])[0][0], timeout=20)
    assert proc.poll() is None
    assert env.changes() == []


def test_missing_replication_privilege_names_the_grant(worker_env):
    env = worker_env
    env.execute("DROP ROLE IF EXISTS bemi_norepl; CREATE ROLE bemi_norepl LOGIN")
    try:
        dsn = env.dsn.replace("user=postgres", "user=bemi_norepl")
        result = subprocess.run([sys.executable, "-m", "bemi.cli", "--dsn", dsn, "--once", "--slot", env.slot],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert result.returncode == 2
        assert "needs the REPLICATION attribute" in result.stderr
        assert 'ALTER ROLE "bemi_norepl" REPLICATION;' in result.stderr
    finally:
        env.execute("DROP ROLE bemi_norepl")


def test_publication_owned_by_another_role_names_the_grant(worker_env):
    env = worker_env
    # a publication bemi manages (made by an earlier worker run as postgres): its tables are kept in line
    env.execute(f'CREATE PUBLICATION "{env.publication}"')
    env.execute(f"COMMENT ON PUBLICATION \"{env.publication}\" IS 'bemi: tracked tables'")
    env.execute("DROP ROLE IF EXISTS bemi_repl; CREATE ROLE bemi_repl LOGIN REPLICATION")
    try:
        dsn = env.dsn.replace("user=postgres", "user=bemi_repl")
        result = subprocess.run([sys.executable, "-m", "bemi.cli", "--dsn", dsn, "--once", "--slot", env.slot,
                                 "--publication", env.publication],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert result.returncode == 2
        assert f'ALTER PUBLICATION "{env.publication}" OWNER TO "bemi_repl";' in result.stderr
    finally:
        env.execute("DROP ROLE bemi_repl")


def test_new_tables_are_tracked_without_a_restart(worker_env):
    env = worker_env
    env.run_once()
    proc = env.spawn("--poll-interval", "0.05")
    assert wait_for(lambda: env.execute(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'bemi-worker' AND pid <> pg_backend_pid()"))
    env.execute("CREATE TABLE late_w (id int PRIMARY KEY)")
    assert wait_for(lambda: env.execute(
        "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND tablename = 'late_w'", [env.publication]))
    env.execute("INSERT INTO late_w VALUES (1)")
    assert wait_for(lambda: env.changes())
    assert env.changes()[0]["table"] == "late_w"
    assert proc.poll() is None


def test_help_documents_the_options():
    result = subprocess.run([sys.executable, "-m", "bemi.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for word in ("--once", "--slot", "--publication", "--dsn", "--destination-dsn", "DB_HOST", "DB_PASSWORD",
                 "DESTINATION_DB_", "REPLICATION", "exit status"):
        assert word in result.stdout


def test_configured_by_environment_like_the_published_image(worker_env):
    env = worker_env
    dest_db = f"bemi_dest_{os.getpid()}"
    env.execute(f"DROP DATABASE IF EXISTS {dest_db}")
    env.execute(f"CREATE DATABASE {dest_db}")
    try:
        env.execute("CREATE TABLE env_w (id int PRIMARY KEY)")
        params = dict(p.split("=", 1) for p in env.dsn.split())
        environ = {**os.environ, "DB_HOST": params["host"], "DB_PORT": params["port"], "DB_NAME": params["dbname"],
                   "DB_USER": params["user"], "DB_PASSWORD": "unused", "DESTINATION_DB_HOST": params["host"],
                   "DESTINATION_DB_PORT": params["port"], "DESTINATION_DB_NAME": dest_db,
                   "DESTINATION_DB_USER": params["user"]}
        args = [sys.executable, "-m", "bemi.cli", "--once", "--slot", env.slot, "--publication", env.publication]
        first = subprocess.run(args, env=environ, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert first.returncode == 0, first.stderr
        env.execute("INSERT INTO env_w VALUES (1)")
        second = subprocess.run(args, env=environ, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert second.returncode == 0, second.stderr
        assert "wrote 1 change in" in second.stderr
        with psycopg.connect(db_dsn(dest_db)) as dest:
            assert dest.execute('SELECT "table", operation, after::text FROM bemi.changes').fetchall() == [
                ("env_w", "CREATE", '{"id": 1}')]
        assert env.execute("SELECT to_regclass('bemi.changes')")[0][0] is None or env.changes() == []
    finally:
        env.execute(f"DROP DATABASE IF EXISTS {dest_db} WITH (FORCE)")


def test_manage_py_writes_to_the_bemi_alias_when_databases_has_one(worker_env):
    env = worker_env
    dest_db = f"bemi_alias_{os.getpid()}"
    env.execute(f"DROP DATABASE IF EXISTS {dest_db}")
    env.execute(f"CREATE DATABASE {dest_db}")
    try:
        env.execute("CREATE TABLE alias_w (id int PRIMARY KEY)")
        source_db = env.execute("SELECT current_database()")[0][0]
        args = [sys.executable, "-m", "django", "bemi_worker", "--once", "--slot", env.slot,
                "--publication", env.publication]
        environ = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BEMI_TEST_DB_NAME": source_db,
                   "BEMI_TEST_ROUTER": dest_db}
        first = subprocess.run(args, env=environ, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert first.returncode == 0, first.stderr
        env.execute("INSERT INTO alias_w VALUES (7)")
        second = subprocess.run(args, env=environ, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert second.returncode == 0, second.stderr
        assert f"writing changes to database {dest_db}" in second.stderr
        with psycopg.connect(db_dsn(dest_db)) as dest:
            assert dest.execute('SELECT "database", "table", primary_key FROM bemi.changes').fetchall() == [
                (source_db, "alias_w", "7")]
    finally:
        env.execute(f"DROP DATABASE IF EXISTS {dest_db} WITH (FORCE)")
