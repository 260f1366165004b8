"""manage.py bemi_export: JSON lines and CSV, filters, exact values, streamed in bounded memory."""

import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from bemi.management.commands.bemi_export import columns
from bemi.models import BemiChange
from tests.queryapp.factory import BASE

ROOT = Path(__file__).resolve().parent.parent
EXACT = '{"id": 1, "price": 12345678901234567890.10, "ratio": 1.0E-7, "name": "Ünïcode \\"q\\"\\n"}'


@pytest.fixture
def changes(recorder):
    recorder.add("todo", 1, "CREATE", after={"id": 1, "task": "a"}, context={"user_id": 42, "path": "/todo"})
    recorder.add("todo", 1, "UPDATE", before={"id": 1, "task": "a"}, after={"id": 1, "task": "b"},
                 context={"user_id": "42", "job": "x"}, committed_at=BASE + dt.timedelta(days=1))
    recorder.add("queryapp_item", 1, "DELETE", before={"id": 1}, context={"user_id": 7},
                 committed_at=BASE + dt.timedelta(days=2))
    recorder.add("todo", None, "TRUNCATE", committed_at=BASE + dt.timedelta(days=3))
    with connection.cursor() as cursor:  # a value Python's float would round, and text needing escapes
        cursor.execute("UPDATE bemi.changes SET before = %s::jsonb WHERE operation = 'DELETE'", [EXACT])
    return recorder


def export(*args: str) -> str:
    out = io.StringIO()
    call_command("bemi_export", *args, stdout=out)
    return out.getvalue()


def stored(operation: str) -> dict:
    """The change as PostgreSQL holds it: every column, the JSON ones as their text."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT to_jsonb(c) - 'before' - 'after' - 'context', before::text, after::text, context::text "
            "FROM bemi.changes c WHERE operation = %s", [operation])
        row, before, after, context = cursor.fetchone()
    return {**(json.loads(row) if isinstance(row, str) else row), "before": before, "after": after, "context": context}


def test_jsonl_has_every_column_and_exact_values(changes):
    lines = export().splitlines()
    assert len(lines) == 4
    records = [json.loads(line) for line in lines]
    assert [r["operation"] for r in records] == ["CREATE", "UPDATE", "DELETE", "TRUNCATE"]  # oldest first
    assert list(records[0]) == columns() == [
        "id", "database", "schema", "table", "primary_key", "operation", "before", "after", "context",
        "committed_at", "queued_at", "created_at", "transaction_id", "position", "commit_position", "change_index"]
    deleted = stored("DELETE")
    line = lines[2]
    assert f'"before": {deleted["before"]}' in line and "12345678901234567890.10" in line  # digit for digit
    assert json.loads(line, parse_float=str)["before"]["price"] == "12345678901234567890.10"
    record = records[2]
    for column in ("id", "database", "schema", "table", "primary_key", "operation", "transaction_id", "position",
                   "commit_position", "change_index"):
        assert record[column] == deleted[column], column
    for column in ("committed_at", "queued_at", "created_at"):
        assert dt.datetime.fromisoformat(record[column]) == dt.datetime.fromisoformat(deleted[column])
    assert record["committed_at"] == "2023-12-13T17:09:09+00:00"
    assert record["before"]["name"] == 'Ünïcode "q"\n'
    assert records[3]["primary_key"] is None and records[3]["before"] == {}


def test_csv_has_a_header_and_the_same_values(changes):
    rows = list(csv.reader(io.StringIO(export("--format", "csv"))))
    assert rows[0] == columns()
    assert len(rows) == 5
    deleted = dict(zip(rows[0], rows[3]))
    assert deleted["before"] == stored("DELETE")["before"]
    assert json.loads(deleted["before"])["name"] == 'Ünïcode "q"\n'
    assert deleted["operation"] == "DELETE" and deleted["committed_at"] == "2023-12-13T17:09:09+00:00"
    assert dict(zip(rows[0], rows[4]))["primary_key"] == ""


def test_filters(changes):
    def operations(*args: str) -> list[str]:
        return [json.loads(line)["operation"] for line in export(*args).splitlines()]

    assert operations("--table", "todo") == ["CREATE", "UPDATE", "TRUNCATE"]
    assert operations("--table", "public.queryapp_item") == ["DELETE"]
    assert operations("--table", "other.todo") == []
    assert operations("--since", "2023-12-12", "--until", "2023-12-13T17:09:09+00:00") == ["UPDATE"]
    assert operations("--since", "2023-12-13T17:09:09Z") == ["DELETE", "TRUNCATE"]
    assert operations("--context", "user_id=42") == ["CREATE", "UPDATE"]  # 42 and "42"
    assert operations("--context", "user_id=42", "--context", "job=x") == ["UPDATE"]
    assert operations("--context", "path=/todo", "--table", "todo") == ["CREATE"]


def test_bad_arguments(changes):
    with pytest.raises(CommandError, match="--since takes a date"):
        export("--since", "yesterday")
    with pytest.raises(CommandError, match="--context takes KEY=VALUE"):
        export("--context", "user_id")
    with pytest.raises(CommandError):
        export("--format", "xml")


def test_output_file(changes, tmp_path):
    target = tmp_path / "changes.csv"
    assert export("--format", "csv", "--output", str(target)) == ""
    assert target.read_text(encoding="utf-8").splitlines()[0] == ",".join(columns())
    assert len(target.read_text(encoding="utf-8").splitlines()) == 5


def test_streamed_through_a_server_side_cursor(changes):
    with CaptureQueriesContext(connection) as queries:
        export()
    sql = [q["sql"] for q in queries]
    assert len(sql) == 1 and sql[0].startswith('DECLARE "_django_curs_') and " CURSOR " in sql[0]
    assert 'FROM "bemi"."changes"' in sql[0] and "COUNT(" not in sql[0]  # no progress bar: stderr is not a terminal


@pytest.mark.django_db(transaction=True)
def test_memory_stays_bounded_on_a_large_export(tx_recorder):
    """100 MB of changes exported in a subprocess: its peak memory grows by far less than the data."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO bemi.changes (database, schema, \"table\", primary_key, operation, before, after, context, "
            "committed_at, queued_at, created_at, transaction_id, position, commit_position, change_index) "
            "SELECT 'test_bemi', 'public', 'big', g::text, 'UPDATE', jsonb_build_object('v', repeat(md5(g::text), 80)), "
            "jsonb_build_object('v', repeat(md5((g + 1)::text), 80)), '{}', %s::timestamptz + g * interval '1 ms', "
            "now(), now(), g, g, g, 0 FROM generate_series(1, 20000) g", [BASE])
    code = ("import resource, sys; from django.core.management import call_command; "
            "call_command('bemi_export', *sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    environ = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
               "BEMI_TEST_DB_NAME": connection.settings_dict["NAME"]}

    def peak_kib(*args: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", "import django; django.setup(); " + code, *args],
                              env=environ, capture_output=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return int(done.stderr.decode().split()[-1]), len(done.stdout)

    empty, _ = peak_kib("--table", "nothing")
    full, size = peak_kib()
    assert size > 100_000_000  # 20,000 changes of 5 kB each, twice
    assert full - empty < 40_000, (empty, full)  # KiB: under 40 MB more than exporting nothing
