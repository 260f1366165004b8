"""How fast the query API answers on a big audit trail.

    python bench/query.py [--rows 1000000] [--calls 50]

Starts its own PostgreSQL (bemi_devtools.pgcluster), fills `changes` with SQL
(1,000,000 rows over 1,000 tables and 100,000 records: 10 changes per record,
3 changes per request), then times repeated calls of each helper with random
arguments and prints the median, the ratio to a baseline measured in the
same run (a primary-key lookup of one change through the ORM), and the
indexes PostgreSQL's plan uses (EXPLAIN). Target: each median < 20 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bemi_devtools.pgcluster import Cluster  # noqa: E402

BASE = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
TABLES = 1000
CHANGES_PER_RECORD = 10


def setup_django(cluster: Cluster) -> None:
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": {
            "ENGINE": "django.db.backends.postgresql", "HOST": cluster.host, "PORT": str(cluster.port),
            "USER": cluster.user, "NAME": "bench",
        }},
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "bemi", "benchmodels"],
        USE_TZ=True, TIME_ZONE="UTC", DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


def fill(rows: int) -> None:
    """Create `changes` (bemi/sql/changes.sql) and its monthly partitions, load rows with one INSERT."""
    from bemi import sql as bemi_sql

    from django.db import connection

    from bemi.worker.partitions import Partitions, period_end, period_start

    ddl = bemi_sql.read("changes.sql")
    records = rows // CHANGES_PER_RECORD
    per_table = records // TABLES
    with connection.cursor() as cursor:
        cursor.execute(ddl)  # partitioned: the indexes exist before the rows (they cannot be added after)
        connection.ensure_connection()
        starts, start = [], period_start(BASE, "month")
        while start <= BASE + dt.timedelta(seconds=rows):
            starts.append(start)
            start = period_end(start, "month")
        Partitions(connection.connection, "month").ensure_periods(starts)
        started = time.perf_counter()
        # Change g touches record r = g % records (its (g // records)-th change): table r % TABLES,
        # primary key r // TABLES + 1, so every table has `per_table` records with keys 1..per_table.
        cursor.execute(
            """
            INSERT INTO bemi.changes (database, schema, "table", primary_key, operation, before, after, context,
                                 committed_at, queued_at, created_at, transaction_id, position, commit_position, change_index)
            SELECT 'bench', 'public', t.name, (r / %(tables)s + 1)::text,
                   CASE WHEN v = 0 THEN 'CREATE' ELSE 'UPDATE' END,
                   CASE WHEN v = 0 THEN '{}'::jsonb ELSE jsonb_build_object(
                       'id', r / %(tables)s + 1, 'task', 'task ' || r || ' v' || (v - 1), 'is_completed', (v - 1) %% 3 = 2) END,
                   jsonb_build_object('id', r / %(tables)s + 1, 'task', 'task ' || r || ' v' || v, 'is_completed', v %% 3 = 2),
                   jsonb_build_object('request_id', 'req-' || (g / 3), 'user_id', g %% 5000, 'method', 'PATCH',
                                      'path', '/' || t.name || '/' || (r / %(tables)s + 1),
                                      'SQL', 'UPDATE "' || t.name || '" SET "task" = %%s WHERE "id" = %%s'),
                   %(base)s::timestamptz + g * interval '1 second', now(), now(), g, g * 100, g * 100 + 50, 0
            FROM generate_series(0, %(rows)s - 1) AS g,
                 LATERAL (SELECT g %% %(records)s AS r, g / %(records)s AS v) AS k,
                 LATERAL (SELECT CASE WHEN k.r %% %(tables)s = 0 THEN 'todo'
                                      ELSE 'table_' || lpad((k.r %% %(tables)s)::text, 4, '0') END AS name) AS t
            """,
            {"rows": rows, "records": records, "tables": TABLES, "base": BASE},
        )
        loaded = time.perf_counter() - started
        cursor.execute("VACUUM ANALYZE changes")
        indexed = time.perf_counter() - started - loaded
    print(f"loaded {rows:,} changes ({records:,} records, {per_table} per table, {TABLES} tables) "
          f"in {loaded:.1f} s (indexes included), analyze in {indexed:.1f} s")


def explain(queryset: Any) -> tuple[str, float]:
    """The indexes the plan uses, and the server's execution time (EXPLAIN ANALYZE) in ms."""
    plan = json.loads(queryset.explain(format="json", analyze=True))
    names: list[str] = []

    def walk(node: dict) -> None:
        if "Index Name" in node and node["Index Name"] not in names:
            names.append(node["Index Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return ", ".join(names) or "none (sequential scan)", plan[0]["Execution Time"]


def median_ms(call: Callable[[], Any], calls: int) -> float:
    call()  # warm: connection, caches
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()

    cluster = Cluster().start_throwaway()
    cluster.psql("CREATE DATABASE bench")
    setup_django(cluster)
    fill(args.rows)

    from bemi.models import BemiChange
    from benchmodels.models import Todo

    rng = random.Random(7)
    records = args.rows // CHANGES_PER_RECORD
    per_table = records // TABLES
    span = args.rows  # seconds of history: one change per second

    def pk() -> int:
        return rng.randint(1, per_table)

    def table() -> str:
        return f"table_{rng.randint(1, TABLES - 1):04d}"

    def when() -> dt.datetime:
        return BASE + dt.timedelta(seconds=rng.randint(0, span))

    some_ids = list(BemiChange.objects.values_list("id", flat=True)[:1000])

    cases: list[tuple[str, Callable[[], Any], Any]] = [
        ("baseline: BemiChange.objects.get(id=...)", lambda: BemiChange.objects.get(id=rng.choice(some_ids)),
         BemiChange.objects.filter(id=some_ids[0])),
        ("todo.bemi_changes()", lambda: list(Todo(id=pk()).bemi_changes()), Todo(id=1).bemi_changes()),
        ("todo.bemi_changes('task')", lambda: list(Todo(id=pk()).bemi_changes("task")), Todo(id=1).bemi_changes("task")),
        ("field_changed(table, pk, 'is_completed')",
         lambda: list(BemiChange.objects.field_changed(table(), pk(), "is_completed")),
         BemiChange.objects.field_changed("table_0001", 1, "is_completed")),
        ("context({'request_id': ...})  (3 rows)",
         lambda: list(BemiChange.objects.context({"request_id": f"req-{rng.randint(0, args.rows // 3)}"})),
         BemiChange.objects.context({"request_id": "req-1"})),
        ("context({'user_id': ...})  (" + f"{args.rows // 5000} rows)",
         lambda: list(BemiChange.objects.context({"user_id": rng.randint(0, 4999)})),
         BemiChange.objects.context({"user_id": 1})),
        ("context({'user_id': ...}).desc()[:20]",
         lambda: list(BemiChange.objects.context({"user_id": rng.randint(0, 4999)}).desc()[:20]),
         BemiChange.objects.context({"user_id": 1}).desc()[:20]),
        ("todo.bemi_as_of(when)", lambda: Todo(id=pk()).bemi_as_of(when()),
         BemiChange.objects.filter(table="todo", primary_key="1", committed_at__lte=BASE + dt.timedelta(days=5)).desc()[:1]),
        ("as_of(table, pk, when)  (dict)", lambda: BemiChange.objects.as_of(table(), pk(), when()),
         BemiChange.objects.filter(table="table_0001", primary_key="1", committed_at__lte=BASE + dt.timedelta(days=5)).desc()[:1]),
    ]
    print(f"\nmedian of {args.calls} calls, random arguments; PostgreSQL {cluster.psql('SHOW server_version')}")
    print("median: whole call from Python (query, rows to objects); server: EXPLAIN ANALYZE execution time")
    print(f"{'query':45} {'median':>9} {'x base':>7} {'server':>8}  index used (EXPLAIN)")
    baseline = None
    for name, call, sample in cases:
        ms = median_ms(call, args.calls)
        baseline = baseline or ms
        indexes, server_ms = explain(sample)
        print(f"{name:45} {ms:7.2f}ms {ms / baseline:6.1f}x {server_ms:6.2f}ms  {indexes}")


if __name__ == "__main__":
    main()
