"""System checks: configuration mistakes and a server without logical decoding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.checks import run_checks
from django.test import override_settings

from bemi import checks
from bemi_devtools.pgcluster import Cluster

ROOT = Path(__file__).resolve().parent.parent


def ids(**kwargs) -> list[str]:
    return [m.id for m in run_checks(**kwargs) if m.id and m.id.startswith("bemi.")]


def deploy(**kwargs):
    """``check --deploy``: where production advice (W002, W003, W004, W020, W021) is given."""
    return run_checks(include_deployment_checks=True, **kwargs)


def deploy_ids(**kwargs) -> list[str]:
    return [m.id for m in deploy(**kwargs) if m.id and m.id.startswith("bemi.")]


def test_valid_configuration_has_no_messages():
    assert ids() == []


@pytest.mark.parametrize("path", ["tests.ctxapp.context.missing", "no_such_module.get", "tests.settings.SECRET_KEY"])
def test_context_function_not_importable_or_not_callable(path):
    with override_settings(BEMI_CONTEXT_FUNCTION=path):
        messages = [m for m in run_checks() if m.id == "bemi.E001"]
    assert len(messages) == 1
    assert path in messages[0].msg


def test_context_function_without_middleware():
    with override_settings(MIDDLEWARE=["django.middleware.common.CommonMiddleware"]):
        assert ids() == ["bemi.W001"]
    with override_settings(MIDDLEWARE=[], BEMI_CONTEXT_FUNCTION=None):
        assert ids() == []


@pytest.mark.django_db
def test_database_checks_pass_on_a_logical_server():
    # W002: PostgreSQL's default (PUBLIC may execute pg_logical_emit_message), production advice.
    assert slotless(deploy_ids(databases=["default"])) == ["bemi.W002"]


@pytest.mark.django_db
def test_production_advice_waits_for_check_deploy():
    # A stock server: PUBLIC may emit messages, max_slot_wal_keep_size = -1, no worker slot yet.
    assert {"bemi.W002", "bemi.W020", "bemi.W021"} <= set(deploy_ids(databases=["default"]))
    assert ids(databases=["default"]) == []  # what `migrate` runs: nothing to say


@pytest.mark.django_db  # rolled back: the REVOKE/GRANT and GRANT below do not outlive the test
def test_public_may_emit_messages_is_reported_with_the_statements_that_fix_it():
    from django.db import connection

    (warning,) = [m for m in deploy(databases=["default"]) if m.id == "bemi.W002"]
    assert "REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text) FROM PUBLIC;" in warning.hint
    with connection.cursor() as cursor:
        cursor.execute("SELECT quote_ident(current_user)")
        role = cursor.fetchone()[0]
        assert f"GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text) TO {role};" in warning.hint
        # Run what the hint says: the warning goes away.
        cursor.execute(warning.hint.split("run: ", 1)[1].split(" (see", 1)[0])
    assert slotless(deploy_ids(databases=["default"])) == []


def slotless(found: list[str]) -> list[str]:
    """Without W020/W021, which depend on the worker's slot and the cluster's settings (tested below)."""
    return [i for i in found if i not in ("bemi.W020", "bemi.W021")]


def _reload_setting(name: str, value: str | None) -> None:
    """ALTER SYSTEM SET (or RESET) a reloadable setting, and wait until new sessions see it."""
    import time

    import psycopg

    from tests.db import db_dsn

    with psycopg.connect(db_dsn(), autocommit=True) as conn:
        if value is None:
            conn.execute(f"ALTER SYSTEM RESET {name}")
        else:
            conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        conn.execute("SELECT pg_reload_conf()")
    expected = value or "-1"
    for _ in range(100):
        with psycopg.connect(db_dsn()) as conn:
            if conn.execute("SELECT current_setting(%s)", [name]).fetchone()[0] == expected:
                return
        time.sleep(0.05)
    raise AssertionError(f"{name} did not become {expected}")


@pytest.mark.django_db
def test_unbounded_wal_retention_is_a_warning_with_the_setting_to_change():
    messages = [m for m in deploy(databases=["default"]) if m.id == "bemi.W020"]
    assert len(messages) == 1  # the test cluster runs with the default: -1
    assert "max_slot_wal_keep_size = -1" in messages[0].msg
    assert "ALTER SYSTEM SET max_slot_wal_keep_size" in messages[0].hint
    _reload_setting("max_slot_wal_keep_size", "1GB")
    try:
        assert _eventually(lambda: "bemi.W020" not in deploy_ids(databases=["default"]))
    finally:
        _reload_setting("max_slot_wal_keep_size", None)
    assert _eventually(lambda: "bemi.W020" in deploy_ids(databases=["default"]))


def _eventually(predicate) -> bool:
    """Our own session sees a reloaded setting once it has processed the reload signal."""
    import time

    for _ in range(100):
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.django_db
def test_missing_worker_slot_after_migrate_bemi_is_a_warning():
    import psycopg

    from tests.db import db_dsn

    messages = [m for m in deploy(databases=["default"]) if m.id == "bemi.W021"]
    assert len(messages) == 1
    assert "no pgoutput replication slot" in messages[0].msg
    assert "manage.py bemi_worker" in messages[0].hint
    with psycopg.connect(db_dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('bemi_check_w021', 'pgoutput')")
        try:
            assert "bemi.W021" not in deploy_ids(databases=["default"])
        finally:
            conn.execute("SELECT pg_drop_replication_slot('bemi_check_w021')")


@pytest.mark.django_db
def test_public_may_create_in_schema_public_is_reported():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")  # PostgreSQL 14's default
    (warning,) = [m for m in deploy(databases=["default"]) if m.id == "bemi.W003"]
    assert "REVOKE CREATE ON SCHEMA public FROM PUBLIC;" in warning.hint


@pytest.mark.django_db
def test_old_server_version_is_reported(monkeypatch):
    # The real server answers; only the threshold moves above it.
    monkeypatch.setattr(checks, "MIN_SERVER_VERSION", 10_000_000)
    assert slotless(deploy_ids(databases=["default"])) == ["bemi.E003", "bemi.W002"]
    assert ids(databases=["default"]) == ["bemi.E003"]  # an error stops migrate


@pytest.fixture(scope="module")
def replica_server():
    cluster = Cluster(settings={"wal_level": "replica"})
    cluster.start()
    yield cluster
    cluster.destroy()


def test_wal_level_not_logical_is_an_error_with_the_fix(replica_server):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "BEMI_TEST_PGPORT": str(replica_server.port),
        "BEMI_TEST_DB_NAME": "postgres",
    }
    result = subprocess.run(
        [sys.executable, "-m", "django", "check", "--database", "default"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "bemi.E002" in result.stderr
    assert "wal_level = 'replica'" in result.stderr
    assert "ALTER SYSTEM SET wal_level = logical;" in result.stderr


# -- tracking settings (bemi/tracking.py) ------------------------------------------------------

@pytest.mark.parametrize("setting, value", [
    ("BEMI_SCHEMAS", "public"), ("BEMI_IGNORED_TABLES", ["a.b.c"]), ("BEMI_IGNORED_COLUMNS", ["todo"]),
    ("BEMI_MASKED_COLUMNS", ["todo.[x"]), ("BEMI_UNSAFE_TRACK_BUILTINS", ["todo"]),
    ("BEMI_SKIP_UNCHANGED_UPDATES", "yes"),
])
def test_malformed_tracking_setting_is_an_error_naming_it(setting, value):
    with override_settings(**{setting: value}):
        messages = [m for m in run_checks() if m.id == "bemi.E010"]
    assert len(messages) == 1 and messages[0].msg.startswith(f"{setting}: ")


def test_unknown_table_or_column_is_a_warning_naming_it():
    with override_settings(BEMI_IGNORED_TABLES=["todo", "no_such_table"],
                           BEMI_MASKED_COLUMNS=["auth_user.email", "auth_user.no_such_column", "nope.x"],
                           BEMI_IGNORED_COLUMNS=["todo.*"]):
        messages = [m.msg for m in run_checks() if m.id == "bemi.W010"]
    assert messages == [
        "BEMI_IGNORED_TABLES: 'no_such_table' matches no table of a Django model.",
        "BEMI_MASKED_COLUMNS: 'auth_user.no_such_column' matches no column of the tables it names.",
        "BEMI_MASKED_COLUMNS: 'nope.x' matches no table of a Django model.",
    ]


def test_opting_out_of_a_builtin_is_a_warning():
    with override_settings(BEMI_UNSAFE_TRACK_BUILTINS=["django_session"]):
        messages = [m for m in run_checks() if m.id == "bemi.W011"]
    assert len(messages) == 1 and "'django_session'" in messages[0].msg and "session key" in messages[0].msg
