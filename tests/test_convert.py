"""bemi_partition: an unpartitioned `changes` converted while the worker writes into it."""

from __future__ import annotations

import io
import threading
import time
import uuid

import psycopg
import pytest
from django.core.management import call_command

from bemi import sql as bemi_sql
from bemi import verify
from bemi.worker.convert import convert
from bemi_devtools.legacy import PREVIOUS_CHANGES, PUBLISHED_CHANGES
from tests.db import db_dsn


def fill(env, rows: int, identity: bool = True) -> None:
    extra = ", commit_position, change_index" if identity else ""
    values = ", g, 0" if identity else ""
    env.execute(f"""INSERT INTO public.changes (database, schema, "table", primary_key, operation, after, committed_at,
                                         queued_at, transaction_id, position{extra})
                    SELECT 'src', 'public', 'old_t', g::text, 'CREATE', jsonb_build_object('id', g, 'pad', repeat('x', 200)),
                           '2024-01-01'::timestamptz + g * interval '1 hour', now(), g, g{values}
                    FROM generate_series(1, %s) g""", [rows])


def catalog(env, table: str) -> tuple:
    columns = env.execute("SELECT attname, format_type(atttypid, atttypmod), attnotnull, "
                          "pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a LEFT JOIN pg_attrdef d "
                          "ON d.adrelid = a.attrelid AND d.adnum = a.attnum WHERE attrelid = %s::regclass "
                          "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", [table])
    indexes = env.execute("SELECT c.relname, regexp_replace(pg_get_indexdef(i.indexrelid), '^.* USING ', '') "
                          "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass "
                          "ORDER BY 1", [table])
    return columns, indexes


@pytest.mark.parametrize("ddl", [PREVIOUS_CHANGES, PUBLISHED_CHANGES], ids=["previous", "published"])
def test_convert_while_the_worker_writes(worker_env, ddl):
    env = worker_env
    env.execute("DROP TABLE IF EXISTS bemi.changes")
    env.execute(ddl)
    fill(env, 3000, identity=ddl is PREVIOUS_CHANGES)  # about 100 pages over 5 months
    env.execute("DROP TABLE IF EXISTS conv_t")
    env.execute("CREATE TABLE conv_t (id int PRIMARY KEY)")
    env.run_once()  # adopts the table as it is (a published one gets its identity columns)
    worker = env.spawn("--poll-interval", "0.02")
    stop = threading.Event()
    written = []

    def write():
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set() or i < 10:
                i += 1
                conn.execute("INSERT INTO conv_t VALUES (%s)", [i])
                written.append(i)
                time.sleep(0.005)

    writer = threading.Thread(target=write)
    writer.start()

    def stored_more(than: int) -> int:
        deadline = time.monotonic() + 30
        while (n := env.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'conv_t'")[0][0]) <= than:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return n

    try:
        stored = stored_more(5)  # the worker is writing
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            # interrupted after a few batches...
            assert convert(conn, "month", batch_pages=5, stop_after_pages=20) == "interrupted"
        assert env.execute("SELECT next_page FROM bemi._bemi_changes_conversion") == [(20,)]
        stored_more(stored + 5)  # stored in the old table meanwhile, copied by the trigger
        # ... and resumed by the management command
        out, err = io.StringIO(), io.StringIO()
        call_command("bemi_partition", "--batch-pages", "7", stdout=out, stderr=err)
        assert "resuming the conversion" in out.getvalue() and "changes: converted" in out.getvalue()
        assert "copying [" in err.getvalue() and "100.0%" in err.getvalue()
    finally:
        stop.set()
        writer.join()
    deadline = time.monotonic() + 30
    while env.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'conv_t'")[0][0] < len(written):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert worker.poll() is None
    assert env.execute("SELECT relkind FROM pg_class WHERE oid = 'bemi.changes'::regclass") == [("p",)]
    # nothing lost, nothing doubled
    assert env.execute("SELECT count(*), count(DISTINCT primary_key) FROM bemi.changes WHERE \"table\" = 'conv_t'") == [
        (len(written), len(written))]
    assert env.execute("SELECT count(*), count(DISTINCT id) FROM bemi.changes WHERE \"table\" = 'old_t'") == [(3000, 3000)]
    (before_swap,), = env.execute("SELECT count(*) FROM bemi.changes_unpartitioned")
    assert 3000 < before_swap < 3000 + len(written)  # the worker wrote into both tables, each change once
    partitions = {r[0] for r in env.execute("SELECT inhrelid::regclass::text FROM pg_inherits "
                                             "WHERE inhparent = 'bemi.changes'::regclass")}
    assert {"changes_p20240101", "changes_p20240201", "changes_p20240301", "changes_p20240401",
            "changes_p20240501", "changes_default"} <= partitions
    assert env.execute("SELECT count(*) FROM bemi.changes_default") == [(0,)]
    # The chain (issue 18) survives the conversion: the links were copied with the rows.
    with verify.connect(env.dsn) as conn:
        report = verify.verify(conn)
    assert report.exit_code == 0, verify.render_text(report)
    ours = [c for c in report.chains if c.database == env.conn.info.dbname]
    assert ours[0].checked >= len(written)  # and whatever else the running worker stored meanwhile
    if ddl is PREVIOUS_CHANGES:  # the same table as a fresh install's
        converted = catalog(env, "changes")
        env.execute("DROP TABLE bemi.changes, bemi.changes_unpartitioned")
        env.execute(bemi_sql.read("changes.sql"))
        assert catalog(env, "changes") == converted
    else:
        env.execute("DROP TABLE bemi.changes_unpartitioned")


def test_convert_says_when_there_is_nothing_to_do(worker_env):
    env = worker_env
    env.run_once()
    out = io.StringIO()
    call_command("bemi_partition", stdout=out)
    assert "changes: already partitioned" in out.getvalue()


def _unpartitioned(env, rows: int) -> None:
    """An earlier version's unpartitioned changes, moved into schema bemi as the worker does at start."""
    from bemi import relocate

    env.execute("DROP TABLE IF EXISTS bemi.changes")
    env.execute(PREVIOUS_CHANGES)
    fill(env, rows)
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        assert relocate.move_own(conn) == ["changes"]


def test_a_login_role_holding_the_old_conversion_lock_does_not_stop_bemi_partition(worker_env):
    """bemi_partition took a session advisory lock (class 0x62656D69, key 13) that any role can hold:
    every run then refused ("another bemi_partition is running") for as long as that role liked.
    Its steps now lock bemi.changes or the conversion's state row, which a role that may only read
    changes (the application's, after bemi_grants) cannot lock in those modes."""
    env = worker_env
    _unpartitioned(env, 600)
    role = f"login_{uuid.uuid4().hex[:8]}"
    env.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
    env.execute(f'GRANT USAGE ON SCHEMA bemi TO "{role}"; GRANT SELECT ON bemi.changes TO "{role}"')
    try:
        with psycopg.connect(db_dsn(), user=role, autocommit=True) as hostile:
            assert hostile.execute("SELECT pg_try_advisory_lock(%s, %s)", [0x62656D69, 13]).fetchone()[0]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                hostile.execute("BEGIN; LOCK TABLE bemi.changes IN SHARE ROW EXCLUSIVE MODE")
            hostile.execute("ROLLBACK")
            with psycopg.connect(env.dsn, autocommit=True) as conn:
                assert convert(conn, "month", batch_pages=3) == "converted"  # was: "another bemi_partition is running"
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                hostile.execute("BEGIN; SELECT * FROM bemi.changes_unpartitioned FOR UPDATE")
            hostile.execute("ROLLBACK")
        assert env.execute("SELECT relkind FROM pg_class WHERE oid = 'bemi.changes'::regclass") == [("p",)]
        assert env.execute("SELECT count(*), count(DISTINCT id) FROM bemi.changes WHERE \"table\" = 'old_t'") == [
            (600, 600)]
    finally:
        env.execute("DROP TABLE IF EXISTS bemi.changes_unpartitioned")
        env.execute(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')


def test_two_bemi_partition_runs_at_once_finish_one_conversion(worker_env):
    """Without a session lock, concurrent runs take turns on each step's lock and look again at what
    the other did: one swaps, the other finds the table partitioned; every row once."""
    env = worker_env
    _unpartitioned(env, 3000)
    results: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            with psycopg.connect(env.dsn, autocommit=True) as conn:
                start.wait()
                results.append(convert(conn, "month", batch_pages=2))
        except BaseException as exc:  # reported below, with the other thread's result
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert not errors, errors
        assert "converted" in results and len(results) == 2, results
        assert env.execute("SELECT relkind FROM pg_class WHERE oid = 'bemi.changes'::regclass") == [("p",)]
        assert env.execute("SELECT count(*), count(DISTINCT id) FROM bemi.changes WHERE \"table\" = 'old_t'") == [
            (3000, 3000)]
        assert env.execute("SELECT to_regclass('bemi._bemi_changes_conversion'), "
                           "to_regclass('bemi._bemi_changes_new')") == [(None, None)]
    finally:
        env.execute("DROP TABLE IF EXISTS bemi.changes_unpartitioned")
