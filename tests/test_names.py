"""BEMI_SLOT and BEMI_PUBLICATION: the worker's names from the Django settings, and two databases on one server.

A slot's name is the server's while its data is one database's: two databases
on one server need two slot names, and `bemi_status` in one of them must not
report the other's slot and worker as its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from bemi import conf
from tests.queryapp.models import Todo
from tests.workerapp.harness import ROOT

pytestmark = pytest.mark.django_db(transaction=True)


def manage(args: list[str], database: str, settings_dir: str, settings: str = "names_settings",
           ) -> subprocess.CompletedProcess:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings, "BEMI_TEST_DB_NAME": database,
           "PYTHONPATH": os.pathsep.join([settings_dir, str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "django", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=env)


def test_the_settings_and_their_defaults():
    assert (conf.slot(), conf.publication()) == ("bemi", "bemi")
    with override_settings(BEMI_SLOT="bemi_shop", BEMI_PUBLICATION="bemi_shop_pub"):
        assert (conf.slot("other"), conf.publication("other")) == ("bemi_shop", "bemi_shop_pub")
    with override_settings(BEMI_SLOT={"default": "bemi_a", "other": "bemi_b"}):
        assert (conf.slot(), conf.slot("other"), conf.slot("third")) == ("bemi_a", "bemi_b", "bemi")
    for bad in ("", 7, "x" * 64, {"default": None}):
        with override_settings(BEMI_SLOT=bad):
            assert [m.id for m in run_checks() if m.id == "bemi.E011"] == ["bemi.E011"]
            with pytest.raises(CommandError, match="BEMI_SLOT must be a name"):
                call_command("bemi_worker", once=True, verbosity=0)


def test_bemi_worker_and_bemi_status_read_them(worker_env, capsys):
    env = worker_env
    with override_settings(BEMI_SLOT={"default": env.slot}, BEMI_PUBLICATION=env.publication):
        call_command("bemi_worker", once=True, verbosity=0)  # no --slot, no --publication
        assert env.slot_state()["database"] == env.execute("SELECT current_database()")[0][0]
        assert env.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s", [env.publication]) == [(1,)]
        assert env.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'bemi'") == [(0,)]
        Todo.objects.create(task="Sleep")
        call_command("bemi_worker", once=True, verbosity=0)
        assert [c["table"] for c in env.changes()] == ["todo"]
        capsys.readouterr()
        call_command("bemi_status", "--json")
        data = json.loads(capsys.readouterr().out)
    assert data["slot"]["name"] == env.slot and data["slot"]["exists"] is True
    assert data["publication"]["name"] == env.publication and data["healthy"] is True
    # the flags still win over the settings
    with override_settings(BEMI_SLOT="bemi_nope"):
        call_command("bemi_status", "--json", "--slot", env.slot, "--publication", env.publication)
        assert json.loads(capsys.readouterr().out)["slot"]["name"] == env.slot


@pytest.fixture
def second_database(pg_server, scratch, tmp_path, worker_env):
    """A second database on the same server with bemi migrated, and settings that name the first one's slot."""
    (tmp_path / "names_settings.py").write_text(
        f"from tests.settings import *  # noqa\nBEMI_SLOT = {worker_env.slot!r}\n"
        f"BEMI_PUBLICATION = {worker_env.publication!r}\n")
    result = manage(["migrate"], scratch, str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    return scratch, str(tmp_path)


def test_status_in_a_second_database_reports_only_its_own(worker_env, second_database):
    env = worker_env
    scratch, settings_dir = second_database
    env.run_once()
    proc = env.spawn("--poll-interval", "0.05")  # the first database's worker, running
    deadline = time.monotonic() + 30
    while not (env.slot_state() or {}).get("active") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert env.slot_state()["active"]

    result = manage(["bemi_status", "--json"], scratch, settings_dir)
    assert result.returncode == 1, result.stdout + result.stderr  # unhealthy: this database records nothing
    data = json.loads(result.stdout)
    assert data["source_database"] == scratch
    assert data["worker"] is None and data["worker_running"] is False  # the other database's worker is not ours
    assert data["slot"]["exists"] is False and data["lag_bytes"] is None
    first = env.execute("SELECT current_database()")[0][0]
    (problem,) = [p for p in data["problems"] if env.slot in p]
    assert f"belongs to database {first!r}" in problem and "BEMI_SLOT" in problem

    # The first database's own status still names its worker.
    result = manage(["bemi_status", "--json"], first, settings_dir)
    assert json.loads(result.stdout)["worker_running"] is True, result.stdout + result.stderr

    # The system check says so in the second database, before the worker would fail there.
    result = manage(["check", "--database", "default"], scratch, settings_dir)
    assert "bemi.W022" in result.stderr and f"belongs to database {first!r}" in result.stderr, result.stderr
    assert f"BEMI_SLOT = 'bemi_{scratch}'" in result.stderr
    result = manage(["check", "--database", "default"], first, settings_dir)
    assert "bemi.W022" not in result.stderr
    proc.terminate()
    proc.wait(timeout=30)


def test_two_databases_on_one_server_each_with_its_own_slot(worker_env, pg_server, second_database):
    env = worker_env
    scratch, settings_dir = second_database
    slot = f"bemi_second_{uuid.uuid4().hex[:6]}"
    settings_file = os.path.join(settings_dir, "second_settings.py")
    with open(settings_file, "w") as f:
        f.write(f"from tests.settings import *  # noqa\nBEMI_SLOT = {slot!r}\n")
    env.run_once()
    with psycopg.connect(pg_server.dsn(scratch), autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text)")
        result = manage(["bemi_worker", "--once", "--verbosity", "0"], scratch, settings_dir, "second_settings")
        assert result.returncode == 0, result.stdout + result.stderr
        conn.execute("INSERT INTO todo VALUES (1, 'second')")
        result = manage(["bemi_worker", "--once", "--verbosity", "0"], scratch, settings_dir, "second_settings")
        assert result.returncode == 0, result.stdout + result.stderr
        assert conn.execute("SELECT after->>'task' FROM bemi.changes").fetchall() == [("second",)]
        assert conn.execute("SELECT database::text FROM pg_replication_slots WHERE slot_name = %s",
                            [slot]).fetchall() == [(scratch,)]
    result = manage(["bemi_status", "--json"], scratch, settings_dir, "second_settings")
    data = json.loads(result.stdout)
    assert data["slot"]["name"] == slot and data["slot"]["exists"] and data["healthy"], result.stdout
    assert env.slot_state()["database"] != scratch  # the first database's slot is untouched
