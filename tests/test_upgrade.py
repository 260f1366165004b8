"""Switching a database set up by the published bemi-django 0.1.3 to this package.

The published package is installed from the package registry into a throwaway
virtual environment (once per test session) and its own ``manage.py migrate``
sets up a scratch database; its code never enters this repository. Then this
package's ``migrate`` must take the database over (migration bemi.0003_upgrade).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from bemi import sql
from bemi.worker.runner import Config, Worker
from bemi_devtools.legacy import PUBLISHED_CHANGES

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = "bemi-django==0.1.3"
OUR_EVENT_TRIGGERS = {"_bemi_create_table_trigger", "_bemi_set_replica_identity_trigger"}
# Messages pip gives when the registry cannot be reached (then the test skips; anything else fails it).
UNREACHABLE = ("Could not find a version", "No matching distribution", "Max retries exceeded",
               "Temporary failure in name resolution", "Network is unreachable", "ConnectionError",
               "Failed to establish a new connection", "Read timed out")

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="session")
def published_python(tmp_path_factory) -> Path:
    """The Python of a virtual environment holding the published bemi-django (and psycopg).

    Made once per test session; kept inside this project's own virtual environment
    (``.venv/published-bemi-django``) so later runs on this machine reuse it.
    """
    venv = Path(sys.prefix) / "published-bemi-django" if sys.prefix != sys.base_prefix else \
        tmp_path_factory.mktemp("published") / "venv"
    python, marker = venv / "bin" / "python", venv / f"installed-{PUBLISHED}"
    if marker.exists() and python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", PUBLISHED, "psycopg[binary]"],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(text in output for text in UNREACHABLE):
            pytest.skip(f"the package registry is unreachable, cannot install {PUBLISHED}: {output.strip()[-300:]}")
        raise AssertionError(f"pip install {PUBLISHED} failed:\n{output}")
    marker.touch()
    return python


def published_migrate(python: Path, pg_server, database: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``manage.py migrate`` of a project that has the published bemi-django in INSTALLED_APPS."""
    (tmp_path / "published_settings.py").write_text(textwrap.dedent(f"""
        SECRET_KEY = "published"
        USE_TZ = True
        INSTALLED_APPS = ["bemi"]
        DATABASES = {{"default": {{
            "ENGINE": "django.db.backends.postgresql", "HOST": {pg_server.host!r},
            "PORT": {str(pg_server.port)!r}, "USER": {pg_server.user!r}, "NAME": {database!r},
        }}}}
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    result = subprocess.run(
        [str(python), "-m", "django", "migrate", "--settings", "published_settings"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**env, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def our_manage(args: list[str], database: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BEMI_TEST_DB_NAME": database},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def bemi_triggers(conn, table: str | None = None) -> list[tuple[str, str, bool]]:
    """(table, trigger, row-level?) of every trigger calling _bemi_row_trigger_func."""
    return conn.execute(
        "SELECT c.relname::text, tg.tgname::text, (tg.tgtype & 1) = 1 FROM pg_trigger tg "
        "JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_class c ON c.oid = tg.tgrelid "
        "WHERE p.proname = '_bemi_row_trigger_func' AND NOT tg.tgisinternal "
        "AND (%s::text IS NULL OR c.relname = %s::text) ORDER BY 1, 2",
        [table, table],
    ).fetchall()


def replica_identity(conn, table: str) -> str:
    return conn.execute("SELECT relreplident::text FROM pg_class WHERE oid = %s::regclass", [table]).fetchone()[0]


def event_triggers(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT evtname FROM pg_event_trigger WHERE evtname LIKE '\\_bemi%'")}


def test_a_database_of_the_published_package_switches_to_ours(published_python, pg_server, scratch, tmp_path):
    published_migrate(published_python, pg_server, scratch, tmp_path)
    dsn = pg_server.dsn(scratch)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The app's table and the Docker worker's `changes`, created while 0.1.3 is installed.
        conn.execute("CREATE TABLE todo (id serial PRIMARY KEY, task text NOT NULL, is_completed bool NOT NULL)")
        conn.execute(PUBLISHED_CHANGES)
        conn.execute("INSERT INTO todo (task, is_completed) VALUES ('Sleep', false), ('Eat', false)")
        # What 0.1.3 left: per-row triggers everywhere (`changes` included), default replica identity.
        assert bemi_triggers(conn, "todo") == [("todo", "_bemi_row_trigger_todo", True)]
        assert bemi_triggers(conn, "changes") == [("changes", "_bemi_row_trigger_changes", True)]
        assert replica_identity(conn, "todo") == "d"
        assert event_triggers(conn) == {"_bemi_create_table_trigger"}

    result = our_manage(["migrate", "bemi"], scratch)
    assert re.search(r"Applying bemi.0003_upgrade\.\.\..*\bOK\n", result.stdout, re.S), result.stdout
    assert "0001_initial" not in result.stdout  # Django believes the published 0001/0002 are ours
    assert "dropped 3 per-row trigger(s) of the published bemi-django" in result.stdout  # todo, changes, django_migrations

    with psycopg.connect(dsn, autocommit=True) as conn:
        assert all(not row_level for _t, _n, row_level in bemi_triggers(conn)), "no per-row trigger is left"
        assert bemi_triggers(conn, "todo") == [("todo", "_bemi_row_trigger_todo", False)]
        assert bemi_triggers(conn, "changes") == [], "the worker's table is never tracked"
        assert replica_identity(conn, "todo") == "f"
        assert replica_identity(conn, "changes") == "d"
        assert event_triggers(conn) == OUR_EVENT_TRIGGERS
        assert conn.execute("SELECT count(*) FROM todo").fetchone()[0] == 2  # writes still go through
        # A table created afterwards is tracked.
        conn.execute("CREATE TABLE later (id int PRIMARY KEY, note text)")
        assert bemi_triggers(conn, "later") == [("later", "_bemi_row_trigger_later", False)]
        assert replica_identity(conn, "later") == "f"

        # An UPDATE afterwards is recorded with its `before` (the worker adopts the published `changes`).
        slot = f"bemi_up_{uuid.uuid4().hex[:6]}"
        config = Config(source_dsn=dsn, slot=slot, publication=slot, once=True)
        assert Worker(config).run() == 0
        conn.execute("UPDATE todo SET is_completed = true WHERE task = 'Sleep' /*Bemi {\"user_id\": 7} Bemi*/")
        conn.execute("INSERT INTO later VALUES (1, 'new')")
        assert Worker(config).run() == 0
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute('SELECT "table", operation, before, after, context FROM bemi.changes '
                               "ORDER BY commit_position, change_index").fetchall()
        assert rows == [
            {"table": "todo", "operation": "UPDATE",
             "before": {"id": 1, "task": "Sleep", "is_completed": False},
             "after": {"id": 1, "task": "Sleep", "is_completed": True}, "context": {"user_id": 7}},
            {"table": "later", "operation": "CREATE", "before": {}, "after": {"id": 1, "note": "new"}, "context": {}},
        ]

    # Reverse: `migrate bemi 0002` keeps our SQL (what our 0001 installs); `zero` removes everything.
    our_manage(["migrate", "bemi", "0002"], scratch)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert bemi_triggers(conn, "todo") == [("todo", "_bemi_row_trigger_todo", False)]
        assert event_triggers(conn) == OUR_EVENT_TRIGGERS
    our_manage(["migrate", "bemi", "zero"], scratch)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert bemi_triggers(conn) == [] and event_triggers(conn) == set()
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname LIKE '\\_bemi%'").fetchone()[0] == 0
        assert replica_identity(conn, "todo") == "f"  # left as it is, like uninstall.sql says


def test_published_functions_outside_schema_public_are_dropped(published_python, pg_server, scratch, tmp_path):
    # The published migration creates its functions in the first schema of the search_path.
    with psycopg.connect(pg_server.dsn(scratch), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA legacy")
        conn.execute(f"ALTER DATABASE {scratch} SET search_path = legacy, public")
    published_migrate(published_python, pg_server, scratch, tmp_path)
    with psycopg.connect(pg_server.dsn(scratch), autocommit=True) as conn:
        conn.execute("CREATE TABLE public.todo (id serial PRIMARY KEY, task text)")
        schemas = conn.execute("SELECT DISTINCT n.nspname::text FROM pg_proc p JOIN pg_namespace n "
                               "ON n.oid = p.pronamespace WHERE p.proname LIKE '\\_bemi%'").fetchall()
        assert schemas == [("legacy",)]
        assert bemi_triggers(conn, "todo") == [("todo", "_bemi_row_trigger_todo", True)]

    result = our_manage(["migrate", "bemi"], scratch)
    assert "dropped event trigger _bemi_create_table_trigger of the published bemi-django" in result.stdout
    assert "dropped legacy._bemi_create_triggers() of the published bemi-django" in result.stdout
    with psycopg.connect(pg_server.dsn(scratch), autocommit=True) as conn:
        schemas = conn.execute("SELECT DISTINCT n.nspname::text FROM pg_proc p JOIN pg_namespace n "
                               "ON n.oid = p.pronamespace WHERE p.proname LIKE '\\_bemi%'").fetchall()
        assert schemas == [("public",)]
        assert bemi_triggers(conn, "todo") == [("todo", "_bemi_row_trigger_todo", False)]
        assert event_triggers(conn) == OUR_EVENT_TRIGGERS
        conn.execute("CREATE TABLE public.later (id int PRIMARY KEY)")
        assert bemi_triggers(conn, "later") == [("later", "_bemi_row_trigger_later", False)]


def test_published_migrations_recorded_without_their_sql_get_ours(pg_server, scratch):
    # bemi-django 0.1.3's router answers allow_migrate = False for the bemi app: its migrations are
    # recorded as applied while nothing was installed.
    our_manage(["migrate", "bemi", "0002", "--fake"], scratch)
    result = our_manage(["migrate", "bemi"], scratch)
    assert "Applying bemi.0003_upgrade" in result.stdout
    with psycopg.connect(pg_server.dsn(scratch), autocommit=True) as conn:
        assert event_triggers(conn) == OUR_EVENT_TRIGGERS
        assert bemi_triggers(conn, "django_migrations") == [("django_migrations", "_bemi_row_trigger_django_migrations",
                                                             False)]
        assert replica_identity(conn, "django_migrations") == "f"


def test_install_sql_run_alone_over_the_published_package_never_cancels_a_write(
        published_python, pg_server, scratch, tmp_path):
    # `psql -f install.sql` without upgrade_0_1_3.sql: the published per-row trigger on a table we do not
    # track (`changes`) stays, now calling our function; it must let the row through.
    published_migrate(published_python, pg_server, scratch, tmp_path)
    with psycopg.connect(pg_server.dsn(scratch), autocommit=True) as conn:
        conn.execute(PUBLISHED_CHANGES)
        conn.execute(sql.read("tracking.sql") + sql.read("install.sql"))
        # psql alone cannot tell that this `changes` is the worker's (bemi's own tables are known by oid,
        # registered by migrate bemi and the worker): the trigger of that name is there, per row or ours.
        assert [t[:2] for t in bemi_triggers(conn, "changes")] == [("changes", "_bemi_row_trigger_changes")]
        conn.execute("INSERT INTO public.changes (\"database\", \"schema\", \"table\", operation, committed_at, queued_at, "
                     "transaction_id, \"position\") VALUES ('d', 'public', 't', 'CREATE', now(), now(), 1, 1)")
        conn.execute("DELETE FROM public.changes")
        conn.execute("INSERT INTO public.changes (\"database\", \"schema\", \"table\", operation, committed_at, queued_at, "
                     "transaction_id, \"position\") SELECT 'd', 'public', 't', 'CREATE', now(), now(), 1, g "
                     "FROM generate_series(1, 3) g")
        conn.execute("UPDATE public.changes SET operation = 'UPDATE' WHERE \"position\" = 1")
        assert conn.execute("SELECT count(*), count(*) FILTER (WHERE operation = 'UPDATE') FROM public.changes").fetchone() \
            == (3, 1)


def snapshot(conn) -> dict:
    """What migrate bemi leaves in the catalog, by name (not by oid)."""
    return {
        "triggers": conn.execute(
            "SELECT c.relname::text, tg.tgname::text, tg.tgtype, p.proname::text, tg.tgenabled::text "
            "FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_proc p ON p.oid = tg.tgfoid "
            "WHERE NOT tg.tgisinternal ORDER BY 1, 2").fetchall(),
        "functions": conn.execute(
            "SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), pg_get_userbyid(p.proowner)::text "
            "FROM pg_proc p WHERE p.proname LIKE '\\_bemi%' ORDER BY 1").fetchall(),
        "event_triggers": conn.execute(
            "SELECT evtname::text, evtevent::text, evttags::text, evtfoid::regproc::text, evtenabled::text "
            "FROM pg_event_trigger ORDER BY 1").fetchall(),
        "identity": conn.execute(
            "SELECT c.relname::text, c.relreplident::text FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1").fetchall(),
    }


def test_the_upgrade_changes_nothing_on_our_own_installation(pg_server, scratch):
    result = our_manage(["migrate", "bemi"], scratch)
    assert "Applying bemi.0001_initial... OK" in result.stdout and "Applying bemi.0003_upgrade... OK" in result.stdout
    assert "per-row trigger" not in result.stdout
    with psycopg.connect(pg_server.dsn(scratch), autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id serial PRIMARY KEY, task text)")
        before = snapshot(conn)
        assert bemi_triggers(conn, "todo") == [("todo", "_bemi_row_trigger_todo", False)]
    our_manage(["migrate", "bemi", "0002"], scratch)
    result = our_manage(["migrate", "bemi"], scratch)
    assert "Applying bemi.0003_upgrade... OK" in result.stdout
    with psycopg.connect(pg_server.dsn(scratch), autocommit=True) as conn:
        assert snapshot(conn) == before
