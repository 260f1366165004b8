"""`bemi-worker status` and `manage.py bemi_status` against a real slot, worker and checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psycopg
import pytest

from bemi.status import parse_bytes
from tests.test_checks import _reload_setting
from tests.workerapp.harness import ROOT, WorkerEnv


def status(env: WorkerEnv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bemi.cli", "status", "--dsn", env.dsn, "--slot", env.slot,
                           "--publication", env.publication, *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def status_json(env: WorkerEnv, *args: str, code: int = 0) -> dict:
    result = status(env, "--json", *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def manage_py_status(env: WorkerEnv, *args: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
               "BEMI_TEST_DB_NAME": env.execute("SELECT current_database()")[0][0]}
    return subprocess.run([sys.executable, "-m", "django", "bemi_status", "--slot", env.slot,
                           "--publication", env.publication, *args],
                          env=environ, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_healthy_after_a_drain(worker_env):
    env = worker_env
    env.execute("CREATE TABLE st_a (id int PRIMARY KEY, v text)")
    env.run_once()
    env.execute(env.context(user=1) + "INSERT INTO st_a SELECT g, 'x' FROM generate_series(1, 50) g")
    env.run_once()
    data = status_json(env)
    assert data["healthy"] is True and data["problems"] == []
    slot = data["slot"]
    assert slot["exists"] and slot["plugin"] == "pgoutput" and slot["wal_status"] == "reserved"
    assert isinstance(slot["retained_wal_bytes"], int) and slot["retained_wal_bytes"] > 0
    assert slot["confirmed_flush_lsn"] == env.slot_state()["confirmed_flush_lsn"]
    assert data["worker"] is None and data["worker_running"] is False
    # Everything is stored: nothing waits, even though the changes rows themselves wrote WAL since.
    assert data["lag_seconds"] == 0.0
    assert isinstance(data["lag_bytes"], int)
    stored = env.execute("SELECT commit_lsn::text, end_lsn::text FROM bemi._bemi_worker_checkpoints WHERE slot = %s",
                         [env.slot])[0]
    assert (data["checkpoint"]["commit_lsn"], data["checkpoint"]["end_lsn"]) == stored
    assert data["checkpoint"]["age_seconds"] >= 0
    assert data["publication"]["exists"] and data["publication"]["tables"] >= 1
    assert "public.st_a" not in data["tables"]["missing_from_publication"]
    assert data["tables"]["rule"] == "_bemi_is_tracked()"
    assert data["dead_letters"] == 0
    assert isinstance(data["warnings"], list)

    screen = status(env)
    assert screen.returncode == 0, screen.stderr
    assert ": HEALTHY" in screen.stdout.splitlines()[0]
    for label in ("slot ", "worker ", "retained WAL ", "publication ", "tables ", "checkpoint ", "lag ",
                  "dead letters "):
        assert f"\n{label}" in screen.stdout


def test_stopped_worker_with_changes_waiting_past_the_threshold_is_unhealthy(worker_env):
    env = worker_env
    env.execute("CREATE TABLE st_b (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO st_b SELECT generate_series(1, 10)")
    committed = time.monotonic()
    time.sleep(1.5)

    data = status_json(env, "--max-lag-seconds", "1", code=1)
    assert data["healthy"] is False
    assert data["lag_seconds"] >= 1.4 and data["lag_seconds_source"] == "the first waiting transaction"
    assert data["lag_seconds"] <= time.monotonic() - committed + 1
    assert data["lag_bytes"] > 0
    assert any("no worker is running" in p and "--max-lag-seconds" in p for p in data["problems"])

    # Under the default threshold (300 s) it is healthy, with a warning.
    data = status_json(env)
    assert data["healthy"] is True
    assert any("no worker is reading the slot" in w for w in data["warnings"])

    # manage.py bemi_status: the same verdict and exit status, the screen on stdout.
    result = manage_py_status(env, "--max-lag-seconds", "1")
    assert result.returncode == 1, result.stderr
    assert ": UNHEALTHY" in result.stdout.splitlines()[0]
    assert "no worker is running and changes have been waiting" in result.stdout
    assert "bemi is unhealthy" in result.stderr

    # The slot is left as it was (peeking consumes nothing): the worker stores the 10 rows, then healthy.
    env.run_once()
    assert len(env.changes()) == 10
    data = status_json(env, "--max-lag-seconds", "1")
    assert data["lag_seconds"] == 0.0
    assert manage_py_status(env, "--max-lag-seconds", "1", "--json").returncode == 0


def test_a_running_worker_is_named(worker_env):
    env = worker_env
    env.run_once()
    proc = env.spawn("--poll-interval", "0.05")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        data = status_json(env, "--max-lag-seconds", "0")
        if data["worker"]:
            break
        time.sleep(0.1)
    assert data["worker_running"] is True
    worker = data["worker"]
    assert worker["application_name"] == "bemi-worker"
    assert worker["via"] == "replication connection"
    assert env.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s", [worker["pid"]]) == [
        ("bemi-worker",)]
    # With a worker running, waiting changes are its business: healthy even with a zero threshold.
    assert data["healthy"] is True
    assert proc.poll() is None


def test_a_worker_starting_while_status_peeks_waits_for_it(worker_env):
    """The status holds the slot while it peeks at a stopped worker's slot: a worker starting then
    waits for it instead of exiting with status 3 (another worker)."""
    env = worker_env
    env.execute("CREATE TABLE st_race (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO st_race VALUES (1)")
    # What the peek does, held for longer: a session named bemi-status holding the slot.
    peeking = psycopg.connect(env.dsn, application_name="bemi-status", replication="database", autocommit=True)
    try:
        peeking.execute(f'START_REPLICATION SLOT "{env.slot}" LOGICAL 0/0 '
                        f"(proto_version '1', publication_names '\"{env.publication}\"')")
        started = time.monotonic()
        proc = env.spawn("--once")
        time.sleep(1.5)
        assert proc.poll() is None  # waiting
    finally:
        peeking.close()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert time.monotonic() - started >= 1.5
    assert len(env.changes()) == 1


def test_missing_slot_and_retained_wal_over_the_limit_are_unhealthy(worker_env):
    env = worker_env
    data = status_json(env, code=1)  # the worker never ran
    assert data["slot"]["exists"] is False and data["slot"]["retained_wal_bytes"] is None
    assert any(f"replication slot {env.slot!r} does not exist" in p for p in data["problems"])

    env.execute("CREATE TABLE st_c (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO st_c SELECT generate_series(1, 100)")
    env.run_once()
    retained = status_json(env)["slot"]["retained_wal_bytes"]
    assert retained > 1000
    data = status_json(env, "--max-retained-bytes", "1kB", code=1)
    assert any("retains" in p and "--max-retained-bytes" in p for p in data["problems"])
    assert status_json(env, "--max-retained-bytes", "0")["healthy"] is True  # 0: no limit


def test_invalidated_slot_is_unhealthy(worker_env):
    env = worker_env
    env.run_once()
    env.execute("CREATE TABLE st_lost (id int PRIMARY KEY)")
    # Invalidate it: a bound of 1 MB, then more WAL than that and a checkpoint.
    _reload_setting("max_slot_wal_keep_size", "1MB")
    try:
        for _ in range(30):
            env.execute("INSERT INTO st_lost SELECT g FROM generate_series(1, 20000) g ON CONFLICT DO NOTHING; "
                        "DELETE FROM st_lost; SELECT pg_switch_wal(); CHECKPOINT")
            if env.slot_state()["wal_status"] == "lost":
                break
        assert env.slot_state()["wal_status"] == "lost"
        data = status_json(env, code=1)
        assert any("wal_status = 'lost'" in p for p in data["problems"])
    finally:
        _reload_setting("max_slot_wal_keep_size", None)


def test_max_slot_wal_keep_size_warning_says_what_to_set(worker_env):
    env = worker_env
    env.run_once()
    data = status_json(env)
    assert data["max_slot_wal_keep_size"] == "-1"  # the default, as on most installations
    [warning] = [w for w in data["warnings"] if "max_slot_wal_keep_size" in w]
    assert "max_slot_wal_keep_size = -1" in warning and "ALTER SYSTEM SET max_slot_wal_keep_size" in warning
    assert "unbounded" in status(env).stdout
    _reload_setting("max_slot_wal_keep_size", "1GB")
    try:
        data = status_json(env)
        assert data["max_slot_wal_keep_size"] == "1GB"
        assert not [w for w in data["warnings"] if "max_slot_wal_keep_size" in w]
        assert 0 < data["slot"]["safe_wal_size"] <= 1024 ** 3 + 64 * 1024 ** 2  # counted in whole segments
    finally:
        _reload_setting("max_slot_wal_keep_size", None)


def test_tables_missing_from_the_publication_or_without_trigger_or_full_identity(worker_env):
    env = worker_env
    env.run_once()
    env.execute("CREATE TABLE st_bare (id int PRIMARY KEY)")  # the migration's event triggers set it up
    data = status_json(env)
    for key in ("missing_from_publication", "without_trigger", "without_replica_identity_full"):
        assert "public.st_bare" not in data["tables"][key], key
    env.execute("DROP TRIGGER _bemi_row_trigger_st_bare ON st_bare")
    env.execute("ALTER TABLE st_bare REPLICA IDENTITY DEFAULT")
    env.execute(f'ALTER PUBLICATION "{env.publication}" DROP TABLE st_bare')
    env.execute("CREATE TABLE _bemi_own (id int)")  # not tracked (_bemi_is_tracked says so): never listed
    data = status_json(env)
    tables = data["tables"]
    assert "public.st_bare" in tables["missing_from_publication"]
    assert "public.st_bare" in tables["without_trigger"]
    assert "public.st_bare" in tables["without_replica_identity_full"]
    assert not any("_bemi_own" in name for key in ("missing_from_publication", "without_trigger",
                                                   "without_replica_identity_full") for name in tables[key])
    assert any(w.startswith("tracked tables without their bemi trigger") and "public.st_bare" in w
               for w in data["warnings"])
    assert data["healthy"] is True  # warnings only
    env.execute("DROP TABLE _bemi_own")


def test_search_path_is_pinned_and_bemi_tables_qualified(worker_env):
    """A table named like a catalog in a schema first on the search_path changes nothing."""
    env = worker_env
    env.run_once()
    env.execute("CREATE SCHEMA IF NOT EXISTS st_evil")
    try:
        env.execute("CREATE TABLE st_evil._bemi_worker_checkpoints AS "
                    "SELECT * FROM bemi._bemi_worker_checkpoints WHERE false")  # same columns, no constraints
        env.execute("INSERT INTO st_evil._bemi_worker_checkpoints (slot, database, commit_lsn, end_lsn) "
                    "VALUES (%s, current_database(), '0/1', '0/1')", [env.slot])
        env.execute("CREATE TABLE st_evil._bemi_worker_failures (slot text)")
        env.execute("INSERT INTO st_evil._bemi_worker_failures VALUES (%s)", [env.slot])
        dsn = env.dsn + " options='-c search_path=st_evil,public'"
        result = subprocess.run([sys.executable, "-m", "bemi.cli", "status", "--dsn", dsn, "--slot", env.slot,
                                 "--publication", env.publication, "--json"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["slot"]["exists"] is True
        assert data["checkpoint"] is None  # nothing stored yet: the impostor's row is not read
        assert data["dead_letters"] == 0
    finally:
        env.execute("DROP SCHEMA st_evil CASCADE")


def test_cannot_connect_is_exit_2():
    result = subprocess.run([sys.executable, "-m", "bemi.cli", "status", "--dsn",
                             "host=127.0.0.1 port=1 dbname=x connect_timeout=2"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "cannot connect to the source database" in result.stderr


def test_sizes():
    assert parse_bytes("1073741824") == parse_bytes("1GB") == parse_bytes("1 gb") == 1024 ** 3
    assert parse_bytes("512MB") == 512 * 1024 ** 2 and parse_bytes("0") == 0
    with pytest.raises(ValueError):
        parse_bytes("lots")


@pytest.fixture(autouse=True)
def _no_leftover_setting():
    yield
    # a failed test must not leave the shared cluster with a WAL bound
    from tests.db import db_dsn

    try:
        with psycopg.connect(db_dsn()) as conn:
            keep = conn.execute("SELECT current_setting('max_slot_wal_keep_size')").fetchone()[0]
        if keep != "-1":
            _reload_setting("max_slot_wal_keep_size", None)
    except Exception:
        pass


def test_separate_destination_holds_the_checkpoint(worker_env):
    env = worker_env
    dest_db = f"bemi_st_dest_{os.getpid()}"
    env.execute(f"DROP DATABASE IF EXISTS {dest_db}")
    env.execute(f"CREATE DATABASE {dest_db}")
    dest_dsn = env.dsn.replace(f"dbname={env.execute('SELECT current_database()')[0][0]}", f"dbname={dest_db}")
    try:
        env.execute("CREATE TABLE st_dest (id int PRIMARY KEY)")
        env.run_once(destination_dsn=dest_dsn)
        env.execute("INSERT INTO st_dest VALUES (1), (2)")
        env.run_once(destination_dsn=dest_dsn)
        data = status_json(env, "--destination-dsn", dest_dsn)
        assert data["destination_database"] == dest_db
        with psycopg.connect(dest_dsn) as dest:
            stored = dest.execute("SELECT commit_lsn::text FROM bemi._bemi_worker_checkpoints WHERE slot = %s",
                                  [env.slot]).fetchone()[0]
        assert data["checkpoint"]["commit_lsn"] == stored
        # Without the destination the status looks in the source, finds no checkpoint, and says so.
        alone = status_json(env)
        assert alone["checkpoint"] is None
    finally:
        env.execute(f"DROP DATABASE IF EXISTS {dest_db} WITH (FORCE)")


def test_help_names_the_status_command_and_its_exit_statuses():
    top = subprocess.run([sys.executable, "-m", "bemi.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "bemi-worker status" in top.stdout and "--metrics-port" in top.stdout and "--metrics-host" in top.stdout
    sub = subprocess.run([sys.executable, "-m", "bemi.cli", "status", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert sub.returncode == 0
    for word in ("--json", "--max-lag-seconds", "--max-retained-bytes", "--dsn", "--destination-dsn",
                 "exit status: 0 healthy; 1 unhealthy"):
        assert word in sub.stdout, word


def test_without_replication_privilege_the_lag_is_an_upper_bound(worker_env):
    env = worker_env
    env.execute("CREATE TABLE st_priv (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO st_priv VALUES (1)")
    env.run_once()
    env.execute("INSERT INTO st_priv VALUES (2)")  # waiting, with no worker
    env.execute("DROP ROLE IF EXISTS bemi_monitor; CREATE ROLE bemi_monitor LOGIN")
    try:
        dsn = env.dsn.replace("user=postgres", "user=bemi_monitor")
        result = subprocess.run([sys.executable, "-m", "bemi.cli", "status", "--dsn", dsn, "--slot", env.slot,
                                 "--publication", env.publication, "--json"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        # It may not read the checkpoint table either: said so, and the lag in seconds is unknown.
        assert data["checkpoint"] is None and data["lag_seconds"] is None
        assert data["lag_seconds_source"].startswith("unknown (could not peek at the slot: ")  # no REPLICATION
        assert any("GRANT SELECT ON bemi._bemi_worker_checkpoints" in w for w in data["warnings"])
        # Granted: the age of the last stored commit, as an upper bound.
        env.execute("GRANT USAGE ON SCHEMA bemi TO bemi_monitor; GRANT SELECT ON bemi._bemi_worker_checkpoints TO bemi_monitor")
        data = json.loads(subprocess.run([sys.executable, "-m", "bemi.cli", "status", "--dsn", dsn, "--slot",
                                          env.slot, "--publication", env.publication, "--json"],
                                         capture_output=True, text=True, timeout=60, cwd=ROOT).stdout)
        assert data["lag_seconds_source"].startswith("upper bound, the age of the last stored commit")
        assert data["lag_seconds"] == pytest.approx(data["checkpoint"]["age_seconds"], abs=1)
        assert data["healthy"] is True
    finally:
        env.execute("REVOKE ALL ON bemi._bemi_worker_checkpoints FROM bemi_monitor; REVOKE ALL ON SCHEMA bemi FROM bemi_monitor; DROP ROLE bemi_monitor")


def test_a_replication_connection_holding_the_slot_is_named(worker_env, pg_bindir):
    """A streaming consumer (here pg_recvlogical) holds the slot: named, lag from pg_stat_replication."""
    env = worker_env
    env.run_once()
    proc = subprocess.Popen([os.path.join(pg_bindir, "pg_recvlogical"), "-d", env.dsn, "--slot", env.slot, "--start",
                             "-o", "proto_version=1", "-o", f"publication_names={env.publication}", "-f", "/dev/null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env.processes.append(proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not env.execute(
            "SELECT 1 FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid "
            "WHERE s.slot_name = %s", [env.slot]):
        time.sleep(0.1)
    data = status_json(env)
    assert data["worker"]["via"] == "replication connection"
    assert data["worker"]["application_name"] == "pg_recvlogical"
    assert data["slot"]["active"] is True
    assert data["lag_seconds_source"] in ("pg_stat_replication (replay_lag)", "nothing waiting")
    assert isinstance(data["lag_seconds"], float)
    proc.terminate()


def test_wal_status_extended_is_a_warning(worker_env):
    """A slot keeping more WAL than max_wal_size (wal_status 'extended'): warned, still healthy."""
    env = worker_env
    env.execute("CREATE TABLE st_ext (id int)")
    env.run_once()
    default = env.execute("SHOW max_wal_size")[0][0]
    env.execute("ALTER SYSTEM SET max_wal_size = '32MB'")
    env.execute("SELECT pg_reload_conf()")
    try:
        for _ in range(4):  # each switch starts a new 16 MB segment: 64 MB of WAL after the slot
            env.execute("INSERT INTO st_ext VALUES (1); SELECT pg_switch_wal()")
        deadline = time.monotonic() + 10
        while env.slot_state()["wal_status"] != "extended" and time.monotonic() < deadline:
            time.sleep(0.1)
        data = status_json(env)
        assert data["slot"]["wal_status"] == "extended"
        assert any("wal_status = 'extended'" in w and "max_wal_size" in w for w in data["warnings"])
        assert data["healthy"] is True
    finally:
        env.execute("ALTER SYSTEM RESET max_wal_size")
        env.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while env.execute("SELECT current_setting('max_wal_size')")[0][0] != default and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_leftover_slot_of_the_published_worker_is_a_warning_with_its_drop(worker_env):
    env = worker_env
    env.run_once()
    env.execute("SELECT pg_create_logical_replication_slot('bemi_local', 'pgoutput')")
    try:
        data = status_json(env)
        assert data["healthy"] is True  # a leftover is a warning: it does not stop tracking
        leftovers = {x["name"]: x for x in data["leftovers"]}
        assert leftovers["bemi_local"]["kind"] == "slot"
        assert leftovers["bemi_local"]["drop_sql"] == "SELECT pg_catalog.pg_drop_replication_slot('bemi_local'::pg_catalog.name);"
        assert env.slot not in leftovers  # the slot this status is about is never a leftover
        assert any("'bemi_local'" in w and "pg_drop_replication_slot" in w for w in data["warnings"])
    finally:
        env.execute("SELECT pg_drop_replication_slot('bemi_local')")
    assert "bemi_local" not in {x["name"] for x in status_json(env)["leftovers"]}
