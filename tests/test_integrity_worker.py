"""Nobody but the worker's role can stop or stall recording (issue 18, "What must hold" item 2).

Attacks on a real cluster: a role with LOGIN only (rows 6 and 7 of the issue) and the
owner of a tracked table (row 8). Each would stop the worker, make it exit, or make it
reconnect forever; every test asserts the worker goes on and stores the change after
the attack. Plus every built-in type and its array through the real worker into
``changes``, compared with what ``to_jsonb()`` shows (the worker's contract,
bemi/worker/values.py).
"""

from __future__ import annotations

import subprocess
import time
import uuid
import zlib

import psycopg
import pytest

from tests.db import db_dsn
from tests.workerapp.harness import WorkerEnv


@pytest.fixture
def login_role(worker_env):
    """A role with LOGIN only (no membership, no privilege beyond PUBLIC's), connected to the test database."""
    name = f"login_{uuid.uuid4().hex[:8]}"
    worker_env.execute(f'CREATE ROLE "{name}" LOGIN NOSUPERUSER')
    conn = psycopg.connect(db_dsn(), user=name, autocommit=True)
    yield name, conn
    conn.close()
    worker_env.execute(f'DROP OWNED BY "{name}" CASCADE; DROP ROLE "{name}"')


@pytest.fixture(autouse=True)
def _drop_tables(worker_env):
    """The tables a test made (the database is shared with the rest of the suite)."""
    yield
    worker_env.execute("DROP TABLE IF EXISTS integrity_msg, integrity_lock, integrity_lock_r, integrity_after_vec, "
                       "integrity_fence")


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _once(env: WorkerEnv, *args: str, timeout: float = 45) -> subprocess.CompletedProcess:
    """``bemi-worker --once``: a worker that stops, loops or waits fails here (exit code or timeout)."""
    try:
        return env.cli("--once", *args, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the worker did not finish within {timeout} s (it waits or reconnects forever): "
                    f"{(exc.stderr or b'')[-2000:]!r}")


# -- row 6: a message nobody can stop the worker with ---------------------------------------

MESSAGES = {
    "non-transactional, 1,100-byte prefix": "SELECT pg_logical_emit_message(false, repeat('x', 1100), '')",
    "transactional, 1,100-byte prefix": "SELECT pg_logical_emit_message(true, repeat('x', 1100), 'c')",
    "transactional, 100,000-byte prefix, 1 MB content":
        "SELECT pg_logical_emit_message(true, repeat('p', 100000), repeat('c', 1048576))",
    "non-transactional, empty prefix, empty content": "SELECT pg_logical_emit_message(false, '', '')",
    "transactional _bemi, 2 MB content": "SELECT pg_logical_emit_message(true, '_bemi', repeat('{', 2097152))",
    "transactional _bemi, bytes that are not UTF-8":
        "SELECT pg_logical_emit_message(true, '_bemi', '\\xfffe00'::bytea)",
    "non-transactional _bemi, 1,100-byte content": "SELECT pg_logical_emit_message(false, '_bemi', repeat('x', 1100))",
}


@pytest.mark.parametrize("emit", MESSAGES.values(), ids=MESSAGES.keys())
def test_no_message_a_login_role_emits_stops_the_worker(worker_env, login_role, emit):
    env = worker_env
    _role, hostile = login_role
    env.execute("DROP TABLE IF EXISTS integrity_msg; CREATE TABLE integrity_msg (id int PRIMARY KEY)")
    assert _once(env).returncode == 0
    hostile.execute(emit)
    with hostile.transaction():  # also inside a transaction of its own, around a write of the table owner
        hostile.execute(emit)
    env.execute(f"BEGIN; {emit}; INSERT INTO integrity_msg VALUES (1); {emit}; INSERT INTO integrity_msg VALUES (2); COMMIT")
    env.execute("INSERT INTO integrity_msg VALUES (3)")
    result = _once(env)
    assert result.returncode == 0, result.stderr
    assert [r["primary_key"] for r in env.changes("\"table\" = 'integrity_msg'")] == ["1", "2", "3"]
    assert env.slot_state()["confirmed_flush_lsn"] is not None
    again = _once(env)  # the slot moved past the message: nothing is read twice, nothing stops there
    assert again.returncode == 0, again.stderr
    assert len(env.changes("\"table\" = 'integrity_msg'")) == 3


# -- row 7: exclusivity that a LOGIN role cannot take --------------------------------------

def _take_the_old_advisory_lock(env: WorkerEnv, conn: psycopg.Connection) -> None:
    database = env.execute("SELECT current_database()")[0][0]
    key = zlib.crc32(f"{database}/{env.slot}".encode()) & 0x7FFFFFFF
    assert conn.execute("SELECT pg_try_advisory_lock(%s, %s)", [0x62656D69, key]).fetchone()[0]


def test_a_login_role_holding_the_old_advisory_lock_does_not_stop_a_starting_worker(worker_env, login_role):
    env = worker_env
    _role, hostile = login_role
    env.execute("DROP TABLE IF EXISTS integrity_lock; CREATE TABLE integrity_lock (id int PRIMARY KEY)")
    assert _once(env).returncode == 0
    _take_the_old_advisory_lock(env, hostile)
    env.execute("INSERT INTO integrity_lock VALUES (1)")
    result = _once(env)
    assert result.returncode == 0, result.stderr  # was: exit 3, "another bemi worker is already reading"
    assert len(env.changes("\"table\" = 'integrity_lock'")) == 1
    standby = _once(env, "--standby", timeout=60)  # was: waited forever
    assert standby.returncode == 0, standby.stderr


def test_a_login_role_holding_the_old_advisory_lock_does_not_stop_a_running_worker_at_reconnect(
        worker_env, login_role):
    env = worker_env
    _role, hostile = login_role
    env.execute("DROP TABLE IF EXISTS integrity_lock_r; CREATE TABLE integrity_lock_r (id int PRIMARY KEY)")
    assert _once(env).returncode == 0
    proc = env.spawn("--poll-interval", "0.05")
    env.execute("INSERT INTO integrity_lock_r VALUES (1)")
    assert _wait_for(lambda: len(env.changes("\"table\" = 'integrity_lock_r'")) == 1)
    _take_the_old_advisory_lock(env, hostile)
    # A fault: its walsender is terminated; the worker reconnects.
    assert env.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
                       [env.slot]) == [(True,)]
    env.execute("INSERT INTO integrity_lock_r VALUES (2)")
    assert _wait_for(lambda: len(env.changes("\"table\" = 'integrity_lock_r'")) == 2 or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()[1]  # was: exit 3 at the reconnect
    assert len(env.changes("\"table\" = 'integrity_lock_r'")) == 2


# -- row 8 and item 4: every built-in type and its array -------------------------------------

#: A value of each built-in base type of pg_catalog that has an array type (tricky where it can be).
SAMPLES = {
    "bool": "t", "bytea": "\\x00ff", "char": "q", "name": "a \"name\", with {braces}", "int8": "9223372036854775807",
    "int2": "-32768", "int2vector": "1 2 -3", "int4": "2147483647", "regproc": "now", "text": "x,\"y\"\\ {z} NULL",
    "oid": "4294967295", "tid": "(1,2)", "xid": "42", "cid": "7", "oidvector": "1 2 4294967295",
    "json": "{\"a\": [1, 2.50, \"\\u00e9\"], \"b\": null}", "xml": "<a x=\"1\">b, c</a>",
    "point": "(1.5,2)", "lseg": "[(1,2),(3,4)]", "path": "[(1,2),(3,4)]", "box": "(1,1),(0,0)",
    "polygon": "((0,0),(1,1),(1,0))", "line": "{1,2,3}", "cidr": "10.0.0.0/8", "float4": "1.5",
    "float8": "-0.1", "circle": "<(1,2),3>", "macaddr8": "08:00:2b:01:02:03:04:05", "money": "12.34",
    "macaddr": "08:00:2b:01:02:03", "inet": "192.168.1.5/24", "aclitem": "postgres=arwdDxt/postgres",
    "bpchar": "a b", "varchar": "v, w", "date": "2024-02-29", "time": "12:34:56.789",
    "timestamp": "2024-01-02 03:04:05.678", "timestamptz": "2024-01-02 03:04:05+02",
    "interval": "1 year 2 mons 3 days 04:05:06", "timetz": "12:00:00+05:30", "bit": "1", "varbit": "10101",
    "numeric": "12345678901234567890.000100", "refcursor": "cur", "regprocedure": "now()",
    "regoper": "||/", "regoperator": "+(integer,integer)", "regclass": "pg_class", "regtype": "int4",
    "uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "txid_snapshot": "10:20:10,14,15", "pg_lsn": "16/B374D848",
    "tsvector": "a fat:1 cat", "tsquery": "fat & (rat | cat)", "regconfig": "english", "regdictionary": "simple",
    "jsonb": "{\"b\": 1e2, \"a\": [\"x\"]}", "jsonpath": "$.a[*] ? (@ > 1)", "regnamespace": "pg_catalog",
    "regrole": "postgres", "regcollation": "\"C\"", "pg_snapshot": "10:20:10,14,15", "xid8": "12345678901",
    # ranges and multiranges of pg_catalog
    "int4range": "[1,5)", "numrange": "(1.5,2.5]", "tsrange": "[2024-01-01 00:00,infinity)",
    "tstzrange": "[2024-01-01 00:00+00,2024-01-02 00:00+00)", "daterange": "[2024-01-01,2024-02-01)",
    "int8range": "empty", "int4multirange": "{[1,3),[5,7)}", "nummultirange": "{}",
    "tsmultirange": "{[2024-01-01 00:00,2024-01-02 00:00)}", "tstzmultirange": "{[2024-01-01 00:00+00,)}",
    "datemultirange": "{[2024-01-01,2024-01-05)}", "int8multirange": "{[1,2)}",
}

#: Built-in types no value can be made of (their input function always fails).
NO_INPUT = {"gtsvector"}

#: Types of the test's own: enum, domain (over a scalar and over an array), composite.
OWN_TYPES = {
    "mood_i": ("CREATE TYPE {name} AS ENUM ('sad', 'happy, \"very\"')", "happy, \"very\""),
    "posint_i": ("CREATE DOMAIN {name} AS int4 CHECK (VALUE > 0)", "7"),
    "vec_i": ("CREATE DOMAIN {name} AS int2vector", "3 4"),
    "arr_i": ("CREATE DOMAIN {name} AS numeric[]", "{1.50,NaN}"),
    "pair_i": ("CREATE TYPE {name} AS (v oidvector, n numeric, t text, w int2vector[], at timestamptz)",
               "(\"1 2\",1.50,\"a,b\",\"{\"\"1 2\"\",NULL}\",\"2024-01-01 00:00:00+00\")"),
}


def _catalog_types(env: WorkerEnv) -> list[str]:
    return [r[0] for r in env.execute(
        "SELECT t.typname::text FROM pg_type t WHERE t.typnamespace = 'pg_catalog'::regnamespace "
        "AND t.typtype IN ('b', 'r', 'm') AND t.typarray <> 0 AND NOT t.typname::text LIKE 'pg_%%' "
        "OR t.typname IN ('pg_lsn', 'pg_snapshot') ORDER BY t.oid")]


@pytest.fixture
def every_builtin(worker_env, login_role):
    env = worker_env
    role, owner = login_role
    env.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')  # it owns a tracked table
    names = [t for t in _catalog_types(env) if t not in NO_INPUT]
    try:
        env.execute("SELECT '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:  # a server built without libxml (the PostgreSQL 14 wheel)
        names.remove("xml")
    missing = sorted(set(names) - set(SAMPLES))
    assert not missing, f"built-in types without a sample value here: {missing}"
    for name, (ddl, _value) in OWN_TYPES.items():
        owner.execute(ddl.format(name=f"public.{name}"))
    types = [(f"pg_catalog.{t}", SAMPLES[t]) for t in names]
    types += [(f"public.{n}", v) for n, (_ddl, v) in OWN_TYPES.items()]
    types.append(("pg_catalog.pg_namespace", None))  # a catalog's row type (oid, name, regrole, aclitem[])
    columns = ", ".join(f"c{i} {t}, a{i} {t}[]" for i, (t, _v) in enumerate(types))
    owner.execute(f"CREATE TABLE public.every_builtin (id int PRIMARY KEY, n int, {columns})")
    owner.execute("ALTER TABLE public.every_builtin REPLICA IDENTITY FULL")
    return env, role, owner, types


def test_every_builtin_type_and_its_array_is_stored_as_to_jsonb_shows_it(every_builtin):
    env, role, owner, types = every_builtin
    assert _once(env).returncode == 0
    table = "public.every_builtin"
    values, params = [], []
    for t, value in types:
        if value is None:  # a whole catalog row
            values.append(f"(SELECT n FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pg_catalog'), "
                          "ARRAY[(SELECT n FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pg_catalog'), NULL]")
            continue
        # ARRAY[] of a domain over an array would be a 2-D array of its base; of an int2vector or oidvector
        # (arrays themselves) it is one of those on PostgreSQL 14: array literals instead.
        if t.endswith((".arr_i", ".int2vector", ".oidvector", ".vec_i")):
            quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            values.append(f"%s::{t}, %s::{t}[]")
            params += [value, "{" + quoted + ",NULL," + quoted + "}"]
            continue
        values.append(f"%s::{t}, ARRAY[%s::{t}, NULL, %s::{t}]")
        params += [value, value, value]
    owner.execute(f"INSERT INTO {table} VALUES (1, 0, {', '.join(values)})", params)
    owner.execute(f"INSERT INTO {table} (id, n) VALUES (2, 0)")  # every value NULL
    owner.execute(f"INSERT INTO {table} (id, n, {', '.join(f'a{i}' for i in range(len(types)))}) VALUES (3, 0, "
                  + ", ".join("'{}'" for _ in types) + ")")  # every array empty
    expected = dict(env.execute(f"SELECT id, to_jsonb(r) FROM {table} r"))
    owner.execute(f"UPDATE {table} SET n = 1")
    updated = dict(env.execute(f"SELECT id, to_jsonb(r) FROM {table} r"))
    result = _once(env)
    assert result.returncode == 0, result.stderr
    rows = env.changes("\"table\" = 'every_builtin'")
    assert [(r["operation"], r["primary_key"]) for r in rows] == [
        ("CREATE", "1"), ("CREATE", "2"), ("CREATE", "3"), ("UPDATE", "1"), ("UPDATE", "2"), ("UPDATE", "3")]
    names = {f"c{i}": t for i, (t, _v) in enumerate(types)} | {f"a{i}": t + "[]" for i, (t, _v) in enumerate(types)}
    wrong = []
    for row in rows:
        key = int(row["primary_key"])
        for side, want in (("after", updated[key] if row["operation"] == "UPDATE" else expected[key]),
                           ("before", expected[key] if row["operation"] == "UPDATE" else {})):
            got = row[side]
            for column in sorted(set(want) | set(got)):
                if got.get(column, "<missing>") != want.get(column, "<missing>"):
                    wrong.append(f"{row['operation']} {key} {side} {names.get(column, column)}: "
                                 f"{got.get(column, '<missing>')!r} != to_jsonb {want.get(column, '<missing>')!r}")
    assert not wrong, "\n".join(wrong)
    assert env.execute("SELECT count(*) FROM _bemi_worker_failures WHERE slot = %s", [env.slot]) == [(0,)]


def test_an_oidvector_and_an_int2vector_a_table_owner_writes_do_not_stop_the_worker(worker_env, login_role):
    env = worker_env
    role, owner = login_role
    env.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
    owner.execute("CREATE TABLE public.integrity_vec (id int PRIMARY KEY, o oidvector, i int2vector)")
    assert _once(env).returncode == 0
    owner.execute("INSERT INTO public.integrity_vec VALUES (1, '1 2 3', '4 5')")
    env.execute("DROP TABLE IF EXISTS integrity_after_vec; CREATE TABLE integrity_after_vec (id int PRIMARY KEY)")
    env.execute("INSERT INTO integrity_after_vec VALUES (1)")
    result = _once(env, timeout=60)  # was: "database error", reconnecting forever
    assert result.returncode == 0, result.stderr
    [row] = env.changes("\"table\" = 'integrity_vec'")
    assert row["after"] == {"id": 1, "o": ["1", "2", "3"], "i": [4, 5]}
    assert len(env.changes("\"table\" = 'integrity_after_vec'")) == 1


# -- exactly once without the lock: the checkpoint moves only from where a worker read it ------

def test_a_worker_that_lost_the_slot_cannot_commit_over_the_one_that_took_it(worker_env):
    """Exclusivity now rests on the slot, which a worker loses with its stream; one that still had a
    batch in hand must not store it when another worker took the slot and stored past it."""
    from datetime import datetime, timezone

    from bemi.worker import pgoutput as po
    from bemi.worker.sink import Sink
    from bemi.worker.stitch import ChangeRow

    env = worker_env
    env.execute("DROP TABLE IF EXISTS integrity_fence; CREATE TABLE integrity_fence (id int PRIMARY KEY)")
    assert _once(env).returncode == 0
    env.execute("INSERT INTO integrity_fence VALUES (1)")
    assert _once(env).returncode == 0
    source, end = env.execute("SELECT source, (end_lsn - '0/0')::int8 FROM _bemi_worker_checkpoints "
                              "WHERE slot = %s", [env.slot])[0]
    database = env.execute("SELECT current_database()")[0][0]
    now = datetime.now(timezone.utc)

    def batch(sink: Sink, position: int) -> po.Commit:
        sink.write([ChangeRow("public", "integrity_fence", str(position), "CREATE", "{}", "{}", "{}", now, 1, end + position,
                              end + position, 0)], now)
        return po.Commit(0, end + position, end + position + 8, now)

    lost, taker = Sink(env.dsn, env.slot, database, source), Sink(env.dsn, env.slot, database, source)
    try:
        lost.checkpoint()  # the worker that will lose its stream read the checkpoint...
        taker.checkpoint()  # ... and so did the one that takes the slot
        taker.commit(batch(taker, 100), 1, 1)
        in_hand = batch(lost, 50)  # an earlier transaction, decoded before its stream broke
        with pytest.raises(psycopg.OperationalError, match="checkpoint .* moved"):
            lost.commit(in_hand, 1, 1)
        lost.rollback()
    finally:
        lost.close()
        taker.close()
    assert env.execute("SELECT primary_key FROM changes WHERE \"table\" = 'integrity_fence' AND primary_key <> '1'") == [
        ("100",)]
    assert env.execute("SELECT (end_lsn - '0/0')::int8 FROM _bemi_worker_checkpoints WHERE slot = %s",
                       [env.slot]) == [(end + 108,)]


def test_a_login_role_holding_the_old_partition_lock_does_not_stall_partition_upkeep(worker_env, login_role):
    """Partition upkeep took an advisory lock (class 0x62656D69, key 12) that any role can hold:
    every pass then waited out its lock_timeout and made no partition, so changes piled up in
    changes_default. It now locks the parent table, which a LOGIN role may not."""
    from datetime import datetime, timezone

    from bemi.worker.partitions import Partitions

    env = worker_env
    env.run_once()
    _, hostile = login_role
    assert hostile.execute("SELECT pg_try_advisory_lock(%s, %s)", [0x62656D69, 12]).fetchone()[0]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        hostile.execute("BEGIN; LOCK TABLE bemi.changes IN SHARE UPDATE EXCLUSIVE MODE")
    hostile.execute("ROLLBACK")
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        manager = Partitions(conn, "month", clock=lambda: datetime(2031, 5, 20, tzinfo=timezone.utc),
                             lock_timeout_ms=200)
        made = manager.ensure_ahead()
    try:
        assert made == ["changes_p20310501", "changes_p20310601"]
    finally:
        env.execute("DROP TABLE IF EXISTS bemi.changes_p20310501, bemi.changes_p20310601")
