"""Append-only changes: bemi_grants, and the app role's UPDATE refused; the bemi.W004 check."""

from __future__ import annotations

import io

import psycopg
import pytest
from django.core.checks import run_checks
from django.core.management import call_command

from bemi.grants import rewrite_privileges

APP, WORKER = "bemi_app_role_t", "bemi_worker_role_t"


@pytest.fixture
def roles(worker_env):
    env = worker_env
    for role in (APP, WORKER):
        env.execute(f"DROP ROLE IF EXISTS {role}")
        env.execute(f"CREATE ROLE {role} LOGIN")
    yield env
    env.execute("DROP TABLE IF EXISTS bemi.changes CASCADE")
    for table in ("_bemi_worker_checkpoints", "_bemi_pruned"):
        env.execute(f"DROP TABLE IF EXISTS {table}")
    for role in (APP, WORKER):
        env.execute(f"DROP OWNED BY {role}")
        env.execute(f"DROP ROLE {role}")


def as_role(env, role):
    return psycopg.connect(env.dsn.replace(f"user={env.conn.info.user}", f"user={role}"), autocommit=True)


def test_app_role_may_only_read_changes_after_bemi_grants(roles):
    env = roles
    env.execute("CREATE TABLE grants_t (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO grants_t VALUES (1)")
    env.run_once()
    # the usual setup before: the application's role can write everything
    env.execute(f"GRANT USAGE ON SCHEMA bemi TO {APP}; GRANT ALL ON bemi.changes, bemi.changes_default TO {APP}")
    with as_role(env, APP) as app:
        assert sorted(rewrite_privileges(app.cursor())) == ["DELETE", "TRUNCATE", "UPDATE"]
        app.execute("UPDATE bemi.changes SET context = '{\"forged\": true}' WHERE false")

    printed = io.StringIO()
    call_command("bemi_grants", "--app-role", APP, "--worker-role", WORKER, "--print", stdout=printed)
    assert f'GRANT SELECT ON "bemi"."changes" TO "{APP}";' in printed.getvalue()
    call_command("bemi_grants", "--app-role", APP, "--worker-role", WORKER, stdout=io.StringIO())

    with as_role(env, APP) as app:
        assert rewrite_privileges(app.cursor()) == []
        assert app.execute("SELECT count(*) FROM bemi.changes").fetchone()[0] == 1
        for statement in ("UPDATE bemi.changes SET context = '{\"forged\": true}'", "DELETE FROM bemi.changes",
                          "TRUNCATE bemi.changes", "UPDATE bemi.changes_default SET context = '{}'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(statement)
    owners = {r[0] for r in env.execute("SELECT relowner::regrole::text FROM pg_class WHERE relname = 'changes' "
                                        "OR relname LIKE 'changes\\_p%' OR relname = 'changes_default'")}
    assert owners == {WORKER}


@pytest.mark.django_db
def test_check_warns_when_the_application_can_rewrite_history(roles):
    env = roles
    env.run_once()
    # the test suite connects as a superuser: it can rewrite anything
    assert "bemi.W004" not in [m.id for m in run_checks(databases=["default"])]  # production advice: --deploy
    messages = [m for m in run_checks(databases=["default"], include_deployment_checks=True) if m.id == "bemi.W004"]
    assert len(messages) == 1 and "UPDATE, DELETE, TRUNCATE" in messages[0].msg
    assert "bemi_grants" in messages[0].hint
