"""Attacks on what `migrate bemi` installs (issue 9, item 1), run on the real cluster.

A hostile role that may CREATE in schema public (every role on PostgreSQL 14;
the database owner on 15+, usually the application's own role) plants a
function or an operator that bemi's functions would pick up, then waits for a
superuser to fire them (CREATE TABLE fires the event triggers, `migrate bemi`
runs the install). Each attack "wins" by making the hostile role superuser;
every test asserts it did not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from bemi import sql

ROOT = Path(__file__).resolve().parent.parent

ESCALATE = """
  IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user) THEN
    EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', '{role}');
  END IF;
"""

PLANTED_LEFT = """
CREATE FUNCTION public.left(name, integer) RETURNS text LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN pg_catalog.left($1::text, $2); END $$;
"""

PLANTED_EQUALS = """
CREATE FUNCTION public.hostile_eq(oid, regclass) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN $1 OPERATOR(pg_catalog.=) $2::oid; END $$;
CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regclass, FUNCTION = public.hostile_eq);
"""

PLANTS = {"left(name, integer)": PLANTED_LEFT, "operator =(oid, regclass)": PLANTED_EQUALS}


class Scene:
    """A database owned by a hostile non-superuser role, with connections as both."""

    def __init__(self, server) -> None:
        self.server = server
        suffix = uuid.uuid4().hex[:8]
        self.role = f"hostile_{suffix}"
        self.database = f"sec_{suffix}"
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{self.role}" LOGIN NOSUPERUSER')
            conn.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.role}"')
        self.su = psycopg.connect(server.dsn(self.database), autocommit=True)
        self.hostile = psycopg.connect(server.dsn(self.database, user=self.role), autocommit=True)
        self.su_notices: list[str] = []
        self.su.add_notice_handler(lambda d: self.su_notices.append(d.message_primary or ""))

    def plant(self, template: str) -> None:
        self.hostile.execute(template.format(escalate=ESCALATE.format(role=self.role)))

    def install_as_superuser(self) -> None:
        self.su.execute(sql.read("tracking.sql") + sql.read("install.sql"))

    def escalated(self) -> bool:
        return self.su.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [self.role]).fetchone()[0]

    def triggers_on(self, table: str) -> list[str]:
        return [r[0] for r in self.su.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal", [table])]

    def close(self) -> None:
        self.su.close()
        self.hostile.close()
        with psycopg.connect(self.server.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{self.role}"')


@pytest.fixture
def scene(pg_server):
    s = Scene(pg_server)
    yield s
    s.close()


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_planted_function_or_operator_does_not_run_when_a_superuser_creates_a_table(scene, plant):
    scene.install_as_superuser()
    scene.plant(plant)
    scene.su.execute("CREATE TABLE public.victim_table (id int PRIMARY KEY)")
    assert not scene.escalated(), "the event trigger ran the planted code as superuser"
    # Tracking still works.
    assert scene.triggers_on("public.victim_table") == ["_bemi_row_trigger_victim_table"]


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_planted_function_or_operator_does_not_run_when_a_superuser_runs_migrate_bemi(scene, plant):
    scene.hostile.execute("CREATE TABLE public.app_table (id int PRIMARY KEY)")
    scene.plant(plant)
    result = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "bemi"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BEMI_TEST_DB_NAME": scene.database},
    )
    assert result.returncode == 0, result.stderr
    assert not scene.escalated(), "the install ran the planted code as superuser"
    assert scene.triggers_on("public.app_table") == ["_bemi_row_trigger_app_table"]


def test_installing_as_superuser_over_functions_the_app_role_owns_is_refused(scene):
    # First install by the application's role (no event triggers: not a superuser).
    scene.hostile.execute(sql.read("tracking.sql") + sql.read("install.sql"))
    # The app role could now rewrite any of them; here it rewrites one the event triggers call.
    scene.hostile.execute(
        "CREATE OR REPLACE FUNCTION public._bemi_is_tracked(rel regclass) RETURNS boolean LANGUAGE plpgsql AS $$"
        f"BEGIN {ESCALATE.format(role=scene.role)} RETURN true; END $$")
    with pytest.raises(psycopg.errors.RaiseException) as refused:
        scene.install_as_superuser()
    diagnostic = refused.value.diag
    assert "refusing to install over functions or tables owned by another role" in diagnostic.message_primary
    assert f'public._bemi_is_tracked(regclass) (owner {scene.role})' in diagnostic.message_primary
    assert "ALTER ROUTINE public._bemi_is_tracked(regclass) OWNER TO" in diagnostic.message_hint
    assert scene.su.execute("SELECT count(*) FROM pg_event_trigger").fetchone()[0] == 0
    scene.su.execute("CREATE TABLE public.after_refusal (id int PRIMARY KEY)")
    assert not scene.escalated()

    # What the hint says to run fixes it: owners moved, bodies rewritten by the install.
    fixes = diagnostic.message_hint.split("run: ", 1)[1].split("and install again", 1)[0]
    scene.su.execute(fixes)
    scene.install_as_superuser()
    owners = {r[0] for r in scene.su.execute(
        "SELECT DISTINCT proowner::regrole::text FROM pg_proc WHERE proname LIKE '\\_bemi%'")}
    assert owners == {scene.server.user}
    scene.su.execute("CREATE TABLE public.after_fix (id int PRIMARY KEY)")
    assert not scene.escalated()
    assert scene.triggers_on("public.after_fix") == ["_bemi_row_trigger_after_fix"]


def test_event_triggers_refuse_to_run_functions_another_role_owns(scene):
    scene.install_as_superuser()
    # However it happened (an install before this check existed, a careless ALTER ... OWNER):
    scene.su.execute(f'ALTER FUNCTION public._bemi_is_tracked(regclass) OWNER TO "{scene.role}"')
    scene.hostile.execute(
        "CREATE OR REPLACE FUNCTION public._bemi_is_tracked(rel regclass) RETURNS boolean LANGUAGE plpgsql AS $$"
        f"BEGIN {ESCALATE.format(role=scene.role)} RETURN true; END $$")
    scene.su.execute("CREATE TABLE public.refused (id int PRIMARY KEY)")
    assert not scene.escalated(), "the event trigger ran a function the hostile role owns"
    assert scene.triggers_on("public.refused") == []
    assert any("not owned by the owner of the event trigger" in n for n in scene.su_notices)


def test_new_table_is_never_blocked_by_a_transaction_holding_the_publication(scene):
    """A CREATE TABLE does not wait for another transaction's CREATE TABLE (the publication lock)."""
    scene.install_as_superuser()
    scene.su.execute("CREATE PUBLICATION sec_pub; COMMENT ON PUBLICATION sec_pub IS 'bemi: tables of schema public'")
    with psycopg.connect(scene.server.dsn(scene.database)) as first:  # a transaction left open
        first.execute("CREATE TABLE public.first_t (id int PRIMARY KEY)")
        scene.su.execute("SET statement_timeout = '5s'")
        scene.su.execute("CREATE TABLE public.second_t (id int PRIMARY KEY)")  # does not wait 5 s
        assert any("could not add public.second_t to publication sec_pub" in n for n in scene.su_notices)
        first.commit()
    published = {r[0] for r in scene.su.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = 'sec_pub'")}
    assert published == {"first_t"}
    scene.su.execute("CREATE TABLE public.third_t (id int PRIMARY KEY)")  # lock free again: added at once
    published = {r[0] for r in scene.su.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = 'sec_pub'")}
    assert published == {"first_t", "third_t"}


def test_after_revoking_pg_logical_emit_message_a_marker_never_fails_the_write(scene):
    """docs/security.md recommends the REVOKE; the statement trigger must then not break writers."""
    scene.install_as_superuser()
    scene.hostile.execute("CREATE TABLE public.notes (id int PRIMARY KEY)")
    scene.su.execute("REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC")
    warnings: list[str] = []
    scene.hostile.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
    scene.hostile.execute('INSERT INTO public.notes VALUES (1) /*Bemi {"user_id": 666} Bemi*/')
    assert scene.hostile.execute("SELECT count(*) FROM public.notes").fetchone()[0] == 1
    assert any("may not execute pg_logical_emit_message" in w for w in warnings)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        scene.hostile.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 666}')")


def test_migrate_bemi_by_the_app_role_keeps_a_superusers_install(scene):
    scene.install_as_superuser()
    result = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "bemi"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BEMI_TEST_DB_NAME": scene.database,
             "BEMI_TEST_DB_USER": scene.role},
    )
    assert result.returncode == 0, result.stderr
    assert f"bemi: already installed by superuser {scene.server.user}" in result.stdout
    owners = {r[0] for r in scene.su.execute(
        "SELECT DISTINCT proowner::regrole::text FROM pg_proc WHERE proname LIKE '\\_bemi%'")}
    assert owners == {scene.server.user}


PLANTED_FOR_THE_WRAPPER = """
CREATE FUNCTION public.hostile_ns_eq(oid, regnamespace) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN $1 OPERATOR(pg_catalog.=) $2::oid; END $$;
CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regnamespace, FUNCTION = public.hostile_ns_eq);
CREATE FUNCTION public.pg_logical_emit_message(boolean, name, text) RETURNS pg_lsn LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN NULL; END $$;
"""


def test_the_wrappers_own_queries_do_not_pick_up_planted_operators_or_functions(scene):
    """The wrapper's SQL runs in the application's session (search_path with public), often as the owner."""
    from bemi import wrapper

    scene.plant(PLANTED_FOR_THE_WRAPPER)
    role, function, may_emit = scene.su.execute(wrapper.CONNECTION_FACTS).fetchone()
    assert function == "pg_logical_emit_message(boolean,text,text)" and may_emit
    with psycopg.ClientCursor(scene.su) as cursor:  # as Django sends it: the context inlined
        cursor.execute(wrapper.EMIT + "SELECT 1", ['{"user_id": 1}'])
    scene.su.execute(wrapper.EMIT_ALONE, ['{"user_id": 1}'])
    assert not scene.escalated()
