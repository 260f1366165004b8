"""`migrate bemi`: the published functions, statement triggers, event triggers.

Everything is checked against the real server: the catalog for what exists,
the WAL (test_decoding slot) for what the triggers emit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from django.core.management import call_command

from tests.db import db_dsn

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = {
    "_bemi_row_trigger_func",
    "_bemi_create_table_trigger_func",
    "_bemi_set_replica_identity_func",
    "_bemi_create_triggers",
    "_bemi_set_replica_identity",
}
EVENT_TRIGGERS = {"_bemi_create_table_trigger", "_bemi_set_replica_identity_trigger"}

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def db():
    """A raw autocommit connection to the test database (not through Django)."""
    with psycopg.connect(db_dsn(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(db):
    """A fresh table created after the migration (so the event triggers act on it)."""
    name = f"mig_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, task text, done boolean DEFAULT false)")
    yield name
    db.execute(f"DROP TABLE IF EXISTS {name} CASCADE")


def installed(db) -> tuple[set[str], set[str]]:
    functions = {r[0] for r in db.execute("SELECT proname FROM pg_proc WHERE proname LIKE '\\_bemi%'")}
    events = {r[0] for r in db.execute("SELECT evtname FROM pg_event_trigger WHERE evtname LIKE '\\_bemi%'")}
    return functions, events


def triggers_on(db, table: str) -> list[tuple[str, int]]:
    return db.execute(
        "SELECT tgname, tgtype FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal", [table]
    ).fetchall()


def replica_identity(db, table: str) -> str:
    return db.execute("SELECT relreplident FROM pg_class WHERE oid = %s::regclass", [table]).fetchone()[0]


def test_migration_installs_published_names(db):
    functions, events = installed(db)
    assert FUNCTIONS <= functions
    assert events == EVENT_TRIGGERS


def test_new_table_gets_statement_trigger_and_replica_identity_full(db, table):
    (name, tgtype), = triggers_on(db, table)
    assert name == f"_bemi_row_trigger_{table}"
    # tgtype bits: 1 = ROW (must be unset), 2 = BEFORE, 4 INSERT, 8 DELETE, 16 UPDATE, 32 TRUNCATE
    assert tgtype & 1 == 0 and tgtype & 2
    assert tgtype & (4 | 8 | 16 | 32) == 4 | 8 | 16 | 32
    assert replica_identity(db, table) == "f"


def test_tables_created_before_install_are_covered(db):
    # tests.ctxapp & co. have no migrations: syncdb created them before `migrate bemi` ran.
    assert triggers_on(db, "django_migrations")
    assert replica_identity(db, "django_migrations") == "f"


def test_sql_comment_context_is_emitted_before_the_rows(db, table, wal):
    context = {"user_id": 1, "path": "/todo?x=1&y=2#a;b+c", "SQL": "x"}
    db.execute(f"INSERT INTO {table} (task) VALUES ('a'), ('b') /*Bemi {json.dumps(context)} Bemi*/")
    records = [r for r in wal.read() if r.kind in ("MESSAGE", "INSERT")]
    assert [r.kind for r in records] == ["MESSAGE", "INSERT", "INSERT"], "one message per statement, first"
    assert records[0].prefix == "_bemi" and records[0].transactional
    assert records[0].json == context
    assert records[0].content == json.dumps(context), "emitted as written, not percent-encoded or re-encoded"
    assert len({r.xid for r in records}) == 1


@pytest.mark.parametrize("statement, kind", [("UPDATE {t} SET done = true", "UPDATE"), ("DELETE FROM {t}", "DELETE")])
def test_the_message_comes_before_the_rows_of_updates_and_deletes_too(db, table, wal, statement, kind):
    """An EXCEPTION block around the emit (a subtransaction) had the message decoded after the rows."""
    db.execute(f"INSERT INTO {table} (task) VALUES ('a'), ('b')")
    wal.read()
    db.execute(statement.format(t=table) + ' /*Bemi {"op": 1} Bemi*/')
    assert [r.kind for r in wal.read() if r.kind in ("MESSAGE", kind)] == ["MESSAGE", kind, kind]


@pytest.mark.parametrize("operation", ["UPDATE {t} SET done = true", "DELETE FROM {t}", "TRUNCATE {t}"])
def test_every_operation_is_labelled(db, table, wal, operation):
    db.execute(f"INSERT INTO {table} (task) VALUES ('a')")
    wal.read()
    db.execute(operation.format(t=table) + ' /*Bemi {"op": 1} Bemi*/;  ')
    assert [m.json for m in wal.messages()] == [{"op": 1}]


def test_marker_in_a_string_literal_cannot_forge_context(db, table, wal):
    forged = '/*Bemi {"user_id": 666} Bemi*/'
    with psycopg.ClientCursor(db) as cursor:  # values inlined: current_query() holds them
        cursor.execute(f"INSERT INTO {table} (task) VALUES (%s)", [forged])
        cursor.execute(f"UPDATE {table} SET task = %s", [forged])
        assert forged in db.execute("SELECT task FROM " + table).fetchone()[0]
        assert wal.messages() == []
        # A forged marker earlier in the query neither hides nor replaces the real one at the end.
        cursor.execute(f"UPDATE {table} SET task = %s /*Bemi {{\"user_id\": 1}} Bemi*/", [forged])
    assert [m.json for m in wal.messages()] == [{"user_id": 1}]


def test_markers_inside_the_wrappers_own_message_are_ignored(db, table, wal):
    hostile = {"path": "/x /*Bemi {} Bemi*/", "note": "Bemi*/ /*Bemi {} Bemi*/"}
    with psycopg.ClientCursor(db) as cursor:
        cursor.execute(
            f"SELECT pg_logical_emit_message(true, '_bemi', %s); INSERT INTO {table} (task) VALUES (%s)",
            [json.dumps(hostile), "/*Bemi {} Bemi*/"],
        )
    assert [m.json for m in wal.messages()] == [hostile]


@pytest.mark.parametrize("comment", [
    "/*Bemi not json Bemi*/",
    "/*Bemi [1, 2] Bemi*/",
    '/*Bemi "text" Bemi*/',
    "/*Bemi  Bemi*/",
    "/* Bemi {} Bemi*/",
])
def test_malformed_comments_emit_nothing_and_never_fail_the_statement(db, table, wal, comment):
    db.execute(f"INSERT INTO {table} (task) VALUES ('a') {comment}")
    assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1
    assert wal.messages() == []


def test_migration_is_reversible(db, table):
    call_command("migrate", "bemi", "zero", verbosity=0)
    try:
        functions, events = installed(db)
        assert functions == set() and events == set()
        assert triggers_on(db, table) == []
        db.execute(f"INSERT INTO {table} (task) VALUES ('still works') /*Bemi {{}} Bemi*/")
    finally:
        call_command("migrate", "bemi", verbosity=0)
    functions, events = installed(db)
    assert FUNCTIONS <= functions and events == EVENT_TRIGGERS
    assert triggers_on(db, table)


def _manage(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", **env},
    )


@pytest.fixture
def scratch_database(pg_server):
    """An empty database (and optionally an unprivileged owner) for `manage.py migrate` runs."""
    made: list[str] = []

    def make(owner: str | None = None) -> str:
        name = f"scratch_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            if owner:
                conn.execute(f"DROP ROLE IF EXISTS {owner}")
                conn.execute(f"CREATE ROLE {owner} LOGIN NOSUPERUSER")
            conn.execute(f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))
        made.append(name)
        return name

    yield make
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        for name in made:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_without_event_trigger_privilege_migration_succeeds_and_says_what_to_run(pg_server, scratch_database):
    database = scratch_database(owner="bemi_unprivileged")
    result = _manage(["migrate"], BEMI_TEST_DB_NAME=database, BEMI_TEST_DB_USER="bemi_unprivileged")
    assert result.returncode == 0, result.stderr
    assert "CALL public._bemi_create_triggers();" in result.stdout
    with psycopg.connect(pg_server.dsn(database, user="bemi_unprivileged"), autocommit=True) as conn:
        functions, events = installed(conn)
        assert FUNCTIONS <= functions and events == set()
        conn.execute("CREATE TABLE later (id int PRIMARY KEY)")
        assert triggers_on(conn, "later") == []
        conn.execute("CALL _bemi_create_triggers()")
        conn.execute("CALL _bemi_set_replica_identity()")
        assert [t[0] for t in triggers_on(conn, "later")] == ["_bemi_row_trigger_later"]
        assert replica_identity(conn, "later") == "f"


def test_migration_runs_with_the_router_configured(pg_server, scratch_database):
    source, destination = scratch_database(), scratch_database()
    result = _manage(["migrate", "bemi"], BEMI_TEST_DB_NAME=source, BEMI_TEST_ROUTER=destination)
    assert result.returncode == 0, result.stderr
    assert "Applying bemi.0001_initial... OK" in result.stdout
    with psycopg.connect(pg_server.dsn(source), autocommit=True) as conn:
        functions, events = installed(conn)
        assert FUNCTIONS <= functions and events == EVENT_TRIGGERS
    # The destination holds `changes`; nothing there to track.
    result = _manage(["migrate", "bemi", "--database", "bemi"], BEMI_TEST_DB_NAME=source, BEMI_TEST_ROUTER=destination)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(pg_server.dsn(destination), autocommit=True) as conn:
        assert installed(conn) == (set(), set())


@pytest.mark.parametrize("operation", ["INSERT INTO {t} (task) VALUES ('c')", "UPDATE {t} SET done = true",
                                       "DELETE FROM {t}"])
def test_sql_comment_context_comes_before_the_rows_of_every_operation(db, table, wal, operation):
    # The worker labels a row with the latest message before it: a message decoded after the rows
    # (as one emitted inside an EXCEPTION block, a subtransaction, is) would label nothing.
    db.execute(f"INSERT INTO {table} (task) VALUES ('a'), ('b')")
    wal.read()
    db.execute(operation.format(t=table) + ' /*Bemi {"op": 1} Bemi*/')
    kinds = [r.kind for r in wal.read() if r.kind not in ("BEGIN", "COMMIT")]
    assert kinds[0] == "MESSAGE" and len(kinds) >= 2 and "MESSAGE" not in kinds[1:], kinds
def test_upgrade_says_once_that_recorded_history_may_hold_credentials(pg_server, scratch_database):
    from bemi import sql as bemi_sql

    fresh = scratch_database()
    result = _manage(["migrate"], BEMI_TEST_DB_NAME=fresh)
    assert result.returncode == 0, result.stderr
    assert "bemi_redact" not in result.stdout  # a new install has no history

    upgraded = scratch_database()
    result = _manage(["migrate", "bemi", "0002"], BEMI_TEST_DB_NAME=upgraded)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(pg_server.dsn(upgraded), autocommit=True) as conn:  # history recorded before
        conn.execute(bemi_sql.read("changes.sql"))
        conn.execute("INSERT INTO bemi.changes (database, schema, \"table\", primary_key, operation, before, after, "
                     "context, committed_at, queued_at, transaction_id, position, commit_position, change_index) "
                     "VALUES ('app', 'public', 'django_session', 'k', 'CREATE', '{}', '{}', '{}', now(), now(), "
                     "1, 1, 1, 0)")
    result = _manage(["migrate", "bemi"], BEMI_TEST_DB_NAME=upgraded)
    assert result.returncode == 0, result.stderr
    assert "Applying bemi.0004_tracking..." in result.stdout
    assert "may hold credentials" in result.stdout and "python manage.py bemi_redact" in result.stdout
    result = _manage(["migrate", "bemi"], BEMI_TEST_DB_NAME=upgraded)
    assert result.returncode == 0 and "bemi_redact" not in result.stdout  # once


FUNCTION_BODIES = """
    SELECT p.oid::regprocedure::text, l.lanname::text, p.prosrc, p.proconfig, p.prosecdef, p.provolatile::text
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
    WHERE n.nspname = 'public' AND p.proname LIKE '\\_bemi%' ORDER BY 1"""


def _new_install_bodies(pg_server, scratch_database) -> list:
    """Migrate a new database (as a role without superuser): this version's function bodies. Every
    migration that installs (0001, 0003, 0004, 0007, 0008) runs, and each notice prints once."""
    owner = "bemi_unprivileged"
    fresh = scratch_database(owner=owner)
    result = _manage(["migrate"], BEMI_TEST_DB_NAME=fresh, BEMI_TEST_DB_USER=owner)
    assert result.returncode == 0, result.stderr
    assert "Applying bemi.0007_reinstall_functions... OK" in result.stdout
    assert "Applying bemi.0008_reinstall_functions... OK" in result.stdout
    assert result.stdout.count("no privilege to create event triggers") == 1, result.stdout  # not again later
    with psycopg.connect(pg_server.dsn(fresh, user=owner), autocommit=True) as conn:
        return conn.execute(FUNCTION_BODIES).fetchall()


def _aged_install(pg_server, scratch_database, owner: str, migration: str, *files: str) -> tuple[str, list]:
    """A database migrated up to ``migration``, then given the SQL ``files`` (under tests/data) that an
    earlier version installed: (its name, its function bodies)."""
    old = scratch_database(owner=owner)
    result = _manage(["migrate", "bemi", migration], BEMI_TEST_DB_NAME=old, BEMI_TEST_DB_USER=owner)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(pg_server.dsn(old, user=owner), autocommit=True) as conn:
        for name in files:
            conn.execute((ROOT / "tests" / "data" / name).read_text())
        return old, conn.execute(FUNCTION_BODIES).fetchall()


def _migrate_brings(pg_server, old: str, owner: str, migration: str, current: list) -> None:
    """``migrate bemi`` runs ``migration`` on ``old`` and leaves the ``current`` bodies, each notice printed
    once; a second ``migrate bemi`` has nothing to say."""
    result = _manage(["migrate", "bemi"], BEMI_TEST_DB_NAME=old, BEMI_TEST_DB_USER=owner)
    assert result.returncode == 0, result.stderr
    assert f"Applying bemi.{migration}..." in result.stdout
    notices = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("bemi:")]
    assert len(notices) == len(set(notices)), result.stdout  # each once
    with psycopg.connect(pg_server.dsn(old, user=owner), autocommit=True) as conn:
        assert conn.execute(FUNCTION_BODIES).fetchall() == current
    again = _manage(["migrate", "bemi"], BEMI_TEST_DB_NAME=old, BEMI_TEST_DB_USER=owner)
    assert again.returncode == 0 and "bemi:" not in again.stdout, again.stdout  # nothing left to do


def test_migrate_gives_an_install_made_before_this_version_its_functions(pg_server, scratch_database):
    """Only 0001, 0003 and 0004 ran bemi/sql: an install that had passed them kept the bodies of its
    day (here those 0004 installed, tests/data/sql_0004: no pinned search_path in the event triggers'
    helpers, a marker honoured for any role, _bemi_publish failing a CREATE TABLE on a lock) whatever
    version it ran later. 0007 installs this version's; a new install runs 0001 to 0008 together and
    says each thing once."""
    current = _new_install_bodies(pg_server, scratch_database)
    assert {"_bemi_publish(regclass)", "_bemi_row_trigger_func()"} <= {r[0] for r in current}
    owner = "bemi_unprivileged_0006"
    old, aged = _aged_install(pg_server, scratch_database, owner, "0006",  # what 0004 installed, kept since
                              "sql_0004/tracking.sql", "sql_0004/install.sql")
    assert [r[0] for r in aged] == [r[0] for r in current]
    assert {r[0] for r in aged if r not in current} >= {
        "_bemi_publish(regclass)", "_bemi_row_trigger_func()", "_bemi_is_tracked(regclass,jsonb)"}
    _migrate_brings(pg_server, old, owner, "0007_reinstall_functions", current)


def test_migrate_gives_an_install_made_at_0007_this_versions_statement_trigger(pg_server, scratch_database):
    """0008: an install that had passed 0007 kept a statement trigger that set bemi.statement_context at
    every statement (tests/data/sql_0007); migrate replaces it."""
    current = _new_install_bodies(pg_server, scratch_database)
    owner = "bemi_unprivileged_0007"
    old, aged = _aged_install(pg_server, scratch_database, owner, "0007", "sql_0007/row_trigger.sql")
    assert {r[0] for r in aged if r not in current} == {"_bemi_row_trigger_func()"}
    _migrate_brings(pg_server, old, owner, "0008_reinstall_functions", current)
