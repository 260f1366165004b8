"""A new user's first run is quiet: `migrate` on a stock server, the worker's first start, an upgrade.

Production advice (bemi.W002, W003, W004, W020, W021) waits for `check --deploy`; the
worker's first start does not untrack the tables it has just created; each notice of a
migration is printed once.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from bemi.worker.runner import Config, Worker
from bemi_devtools.legacy import PREVIOUS_CHANGES

ROOT = Path(__file__).resolve().parent.parent


def manage(args: list[str], database: str, settings: str = "tests.settings", pythonpath: str = "",
           ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings, "BEMI_TEST_DB_NAME": database}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "django", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=180, env=env)
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_migrate_on_a_stock_server_prints_no_production_advice(pg_server, scratch):
    result = manage(["migrate"], scratch)
    output = result.stdout + result.stderr
    assert "Applying bemi.0001_initial... OK" in result.stdout
    assert "bemi." not in output.replace("Applying bemi.", ""), output  # no bemi.W0xx at all
    assert "System check identified" not in output

    # the advice is there when asked for, Django's way
    deploy = manage(["check", "--deploy", "--database", "default"], scratch)
    advice = deploy.stdout + deploy.stderr
    for check in ("bemi.W002", "bemi.W020", "bemi.W021"):  # stock server: PUBLIC emits, WAL unbounded, no slot
        assert check in advice, advice
    plain = manage(["check", "--database", "default"], scratch)
    assert "bemi.W0" not in plain.stdout + plain.stderr


def test_the_workers_first_start_does_not_untrack_its_own_new_tables(pg_server, scratch, caplog):
    manage(["migrate"], scratch)
    dsn = pg_server.dsn(scratch)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text)")
    slot = f"bemi_first_{uuid.uuid4().hex[:6]}"
    caplog.set_level(logging.INFO, logger="bemi.worker")
    caplog.set_level(logging.INFO, logger="bemi")
    assert Worker(Config(source_dsn=dsn, slot=slot, publication=slot, once=True)).run() == 0
    text = caplog.text
    assert "created" in text  # it did create the publication, the slot and changes
    assert "no longer tracked" not in text, text
    assert "removed" not in text and "not tracked any more" not in text, text
    with psycopg.connect(dsn, autocommit=True) as conn:
        published = {r[0] for r in conn.execute(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = %s", [slot])}
        assert "todo" in published and not any(t.startswith(("changes", "_bemi")) for t in published), published
        # bemi's own tables never got a trigger that then had to be dropped (nor have one now)
        triggered = {r[0] for r in conn.execute(
            "SELECT c.relname::text FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid "
            "WHERE tg.tgname LIKE '\\_bemi\\_row\\_trigger\\_%' AND NOT tg.tgisinternal")}
        assert not any(t.startswith(("changes", "_bemi")) for t in triggered), triggered
        conn.execute("INSERT INTO todo VALUES (1, 'Sleep')")
    caplog.clear()
    assert Worker(Config(source_dsn=dsn, slot=slot, publication=slot, once=True)).run() == 0
    assert "no longer tracked" not in caplog.text and "removed" not in caplog.text
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'todo'").fetchone()[0] == 1


@pytest.fixture
def settings_dir(tmp_path):
    (tmp_path / "ignore_todo_settings.py").write_text(
        "from tests.settings import *  # noqa\nBEMI_IGNORED_TABLES = ['todo']\n")
    return str(tmp_path)


def test_each_notice_of_a_migration_is_printed_once(pg_server, scratch, settings_dir):
    # A database with history recorded before this version: 0004 says once that it may hold credentials.
    manage(["migrate", "bemi", "0003"], scratch)
    with psycopg.connect(pg_server.dsn(scratch), autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text)")
        conn.execute(PREVIOUS_CHANGES)
        conn.execute("INSERT INTO public.changes (database, schema, \"table\", operation, committed_at, transaction_id, "
                     "position, commit_position, change_index) VALUES ('x', 'public', 'todo', 'CREATE', now(), 1, "
                     "1, 1, 0)")
    result = manage(["migrate", "bemi"], scratch)
    output = result.stdout + result.stderr
    assert output.count("may hold credentials") == 1, output

    # A changed setting brings the triggers in line after migrate: each notice once.
    result = manage(["migrate"], scratch, settings="ignore_todo_settings", pythonpath=settings_dir)
    output = result.stdout + result.stderr
    assert output.count("public.todo is no longer tracked: dropped its trigger") == 1, output
