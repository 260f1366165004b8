"""Table-level time travel on a 100,000-row table, side by side with a plain read of the table.

    .venv/bin/python bench/table_as_of.py [--rows 100000] [--after 3000] [--other 1000000] [--calls 7]

Starts its own PostgreSQL (bemi_devtools.pgcluster), creates table ``todo``
(``rows`` rows) and ``changes`` with: a CREATE per row a day before the
instant, ``other`` changes of 100 other tables, and ``after`` changes of
``todo`` after the instant (4 in 6 updates, 1 in 6 deletes, 1 in 6 creates),
applied to ``todo`` so that today's rows are what those changes left. Then
times, in the same run (median of ``calls``), a plain read of the table
(``list(Todo.objects.order_by('pk'))``, the baseline) and
``Todo.bemi_table_as_of(instant)``, whole and with a filter, and checks that
the rebuilt table is the table as it was. Target: under 1 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bemi_devtools.pgcluster import Cluster  # noqa: E402
from query import median_ms, setup_django  # noqa: E402

INSTANT = dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc)


def fill(rows: int, after: int, other: int) -> None:
    from django.db import connection

    from bemi import sql as bemi_sql
    from bemi.worker.partitions import Partitions
    from benchmodels.models import Todo

    with connection.schema_editor() as editor:
        editor.create_model(Todo)
    with connection.cursor() as cursor:
        cursor.execute(bemi_sql.read("changes.sql"))
        connection.ensure_connection()
        Partitions(connection.connection, "month").ensure_periods(
            [dt.datetime(2023, 12, 1, tzinfo=dt.timezone.utc), dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)])
        started = time.perf_counter()
        cursor.execute("INSERT INTO todo (id, task, is_completed) SELECT i, 'task ' || i, i %% 3 = 0 "
                       "FROM generate_series(1, %s) i", [rows])
        common = ("INSERT INTO bemi.changes (database, schema, \"table\", primary_key, operation, before, after, context, "
                  "committed_at, queued_at, created_at, transaction_id, position, commit_position, change_index) ")
        # a CREATE per row, a day before the instant; other tables' changes around it
        cursor.execute(common + "SELECT 'bench', 'public', 'todo', i::text, 'CREATE', '{}', to_jsonb(t), "
                       "'{\"job\": \"import\"}', %s::timestamptz - interval '1 day' + i * interval '1 ms', now(), now(), "
                       "i, i, i, 0 FROM todo t, LATERAL (SELECT t.id AS i) k", [INSTANT])
        cursor.execute(common + "SELECT 'bench', 'public', 'table_' || (g %% 100), (g / 100)::text, 'UPDATE', "
                       "jsonb_build_object('id', g / 100, 'v', g - 1), jsonb_build_object('id', g / 100, 'v', g), "
                       "jsonb_build_object('user_id', g %% 5000), "
                       "%s::timestamptz - interval '12 hours' + g * interval '50 ms', now(), now(), "
                       "g + 1000000, g + 1000000, g + 1000000, 0 FROM generate_series(1, %s) g", [INSTANT, other])
        # the changes after the instant: kind = k % 6 (0-3 update, 4 delete, 5 create), row = a spread-out id
        cursor.execute("CREATE TEMP TABLE later AS SELECT k, k %% 6 AS kind, "
                       "CASE WHEN k %% 6 = 5 THEN %s + k ELSE 1 + (k * 7919) %% %s END AS id "
                       "FROM generate_series(0, %s - 1) k", [rows, rows, after])
        cursor.execute("DELETE FROM later l WHERE l.kind < 5 AND EXISTS "
                       "(SELECT FROM later m WHERE m.id = l.id AND m.k < l.k)")  # one change per row is enough
        cursor.execute(common + "SELECT 'bench', 'public', 'todo', l.id::text, "
                       "CASE l.kind WHEN 4 THEN 'DELETE' WHEN 5 THEN 'CREATE' ELSE 'UPDATE' END, "
                       "CASE WHEN l.kind = 5 THEN '{}'::jsonb ELSE to_jsonb(t) END, "
                       "CASE l.kind WHEN 4 THEN '{}'::jsonb WHEN 5 THEN jsonb_build_object("
                       "'id', l.id, 'task', 'new ' || l.id, 'is_completed', false) "
                       "ELSE to_jsonb(t) || jsonb_build_object('task', t.task || ' v2') END, "
                       "'{\"job\": \"edit\"}', %s::timestamptz + (l.k + 1) * interval '1 s', now(), now(), "
                       "l.k + 5000000, l.k + 5000000, l.k + 5000000, 0 "
                       "FROM later l LEFT JOIN todo t ON t.id = l.id", [INSTANT])
        cursor.execute("UPDATE todo t SET task = t.task || ' v2' FROM later l WHERE l.id = t.id AND l.kind < 4")
        cursor.execute("DELETE FROM todo t USING later l WHERE l.id = t.id AND l.kind = 4")
        cursor.execute("INSERT INTO todo (id, task, is_completed) SELECT id, 'new ' || id, false FROM later WHERE kind = 5")
        cursor.execute("SELECT count(*) FROM later")
        stored = cursor.fetchone()[0]
        cursor.execute("VACUUM ANALYZE bemi.changes")
        cursor.execute("VACUUM ANALYZE todo")
        cursor.execute("SELECT count(*) FROM bemi.changes")
        total = cursor.fetchone()[0]
    print(f"todo: {rows:,} rows; changes: {total:,} rows, {stored:,} of todo after the instant; "
          f"filled in {time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--after", type=int, default=3000)
    parser.add_argument("--other", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=7)
    args = parser.parse_args()

    cluster = Cluster().start_throwaway()
    cluster.psql("CREATE DATABASE bench")
    setup_django(cluster)
    fill(args.rows, args.after, args.other)

    from benchmodels.models import Todo

    old = Todo.bemi_table_as_of(INSTANT)
    expected = [(i, f"task {i}", i % 3 == 0) for i in range(1, args.rows + 1)]
    assert [(t.pk, t.task, t.is_completed) for t in old] == expected, "the rebuilt table is not the table then"
    window = {"id__gte": args.rows // 2, "id__lt": args.rows // 2 + 1000}
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("baseline: list(Todo.objects.order_by('pk'))", lambda: list(Todo.objects.order_by("pk"))),
        ("Todo.bemi_table_as_of(instant)", lambda: Todo.bemi_table_as_of(INSTANT)),
        ("baseline: Todo.objects.filter(1,000 ids)", lambda: list(Todo.objects.filter(**window).order_by("pk"))),
        ("Todo.bemi_table_as_of(instant, 1,000 ids)", lambda: Todo.bemi_table_as_of(INSTANT, **window)),
        ("Todo.bemi_table_as_of(instant, task=...)", lambda: Todo.bemi_table_as_of(INSTANT, task="task 7")),
    ]
    print(f"\nmedian of {args.calls} calls; PostgreSQL {cluster.psql('SHOW server_version')}; load {os.getloadavg()[0]:.2f}")
    print(f"{'call':45} {'median':>10} {'x base':>7}")
    baseline = 0.0
    for name, call in cases:
        ms = median_ms(call, args.calls)
        if name.startswith("baseline"):
            baseline = ms
        print(f"{name:45} {ms:8.1f}ms {ms / baseline:6.2f}x")


if __name__ == "__main__":
    main()
