"""Partitioned `changes`: ingest, bemi_prune against DELETE, queries over 12 monthly partitions.

    python bench/partitions.py                      # 1,000,000-row figures (several minutes)
    python bench/partitions.py --rows 100000 --tx 5000   # a quick run

Starts its own PostgreSQL (bemi_devtools.pgcluster). In one run:

1. ingest: the worker (`bemi-worker --once`, a fresh process) stores the same
   --tx single-row transactions (each with a context message) into a partitioned
   `changes` (bemi/sql/changes.sql) and into the previous, unpartitioned one;
   --rounds rounds (the order alternates); medians, their ratio, and the median of
   the per-round ratios partitioned / unpartitioned; for the whole process, and
   for the storing alone (the worker's own "wrote N changes in X s" log lines:
   without process start-up and setup).
2. prune: --rows changes in one month's partition; `python -m django bemi_prune
   --before <end of that month>` as a whole command (process start included)
   against `DELETE FROM bemi.changes WHERE committed_at < <same>` on the same rows.
3. queries: --rows changes over 12 monthly partitions (1,000 tables, 100,000
   records), `record.bemi_changes()` and `as_of`, median of --calls calls, on the
   partitioned table and on an unpartitioned copy of the same rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psycopg  # noqa: E402

from bemi_devtools.legacy import PREVIOUS_CHANGES  # noqa: E402
from bemi_devtools.pgcluster import Cluster  # noqa: E402

CONTEXT = ("SELECT pg_logical_emit_message(true, '_bemi', "
           "'{\"user_id\": 187234, \"endpoint\": \"/todo\", \"method\": \"POST\"}')")
# The previous version's unpartitioned table, made in schema bemi where changes now live.
UNPARTITIONED = "SET search_path = bemi;" + PREVIOUS_CHANGES + """
RESET search_path;
CREATE TABLE bemi._bemi_pruned (pruned_before timestamptz NOT NULL, pruned_at timestamptz NOT NULL DEFAULT now(),
    partitions text[] NOT NULL DEFAULT '{}', changes bigint NOT NULL DEFAULT 0, pruned_by text NOT NULL DEFAULT '');
"""
FILL = """
INSERT INTO bemi.changes (database, schema, "table", primary_key, operation, before, after, context,
                     committed_at, queued_at, created_at, transaction_id, position, commit_position, change_index)
SELECT 'bench', 'public', CASE WHEN k.r %% 1000 = 0 THEN 'todo' ELSE 'table_' || lpad((k.r %% 1000)::text, 4, '0') END,
       (k.r / 1000 + 1)::text, CASE WHEN k.v = 0 THEN 'CREATE' ELSE 'UPDATE' END,
       CASE WHEN k.v = 0 THEN '{}'::jsonb ELSE jsonb_build_object('id', k.r / 1000 + 1, 'task', 'task ' || k.r || ' v' || (k.v - 1)) END,
       jsonb_build_object('id', k.r / 1000 + 1, 'task', 'task ' || k.r || ' v' || k.v),
       jsonb_build_object('request_id', 'req-' || (g / 3), 'user_id', g %% 5000),
       %(start)s::timestamptz + g * %(step)s::interval, now(), now(), g, g * 100, g * 100 + 50, 0
FROM generate_series(0, %(rows)s - 1) AS g, LATERAL (SELECT g %% %(records)s AS r, g / %(records)s AS v) AS k
"""


# bemi's stored tables live in schema bemi (bemi/tables.py); the worker makes it, the loads here need it first.
SCHEMA = "CREATE SCHEMA IF NOT EXISTS bemi"


def worker_cmd(dsn: str, slot: str, verbosity: str = "0") -> list[str]:
    return [sys.executable, "-m", "bemi.cli", "--dsn", dsn, "--slot", slot, "--publication", "bemi",
            "--verbosity", verbosity, "--once"]


def ingest(cluster: Cluster, tx: int, rounds: int) -> dict:
    dsn = cluster.dsn()
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(SCHEMA)
    from bemi import sql as bemi_sql

    rates: dict[str, list[float]] = {"partitioned": [], "unpartitioned": []}
    store_rates: dict[str, list[float]] = {"partitioned": [], "unpartitioned": []}
    n = 0
    for round_ in range(rounds):
        for kind in (("partitioned", "unpartitioned") if round_ % 2 else ("unpartitioned", "partitioned")):
            n += 1
            for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall():
                conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            conn.execute("DROP TABLE IF EXISTS todo, bemi.changes, bemi._bemi_worker_checkpoints, bemi._bemi_pruned CASCADE")
            conn.execute("DROP PUBLICATION IF EXISTS bemi")
            conn.execute(bemi_sql.read("changes.sql") if kind == "partitioned" else UNPARTITIONED)
            conn.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text NOT NULL)")
            slot = f"s{n}"
            subprocess.run(worker_cmd(dsn, slot), check=True, cwd=ROOT)
            cur = conn.cursor()
            for i in range(tx):
                cur.execute("BEGIN; " + CONTEXT + f"; INSERT INTO todo (task) VALUES ('t{i}'); COMMIT")
            conn.execute("CHECKPOINT")
            started = time.perf_counter()
            log = subprocess.run(worker_cmd(dsn, slot, "1"), check=True, cwd=ROOT, capture_output=True,
                                 text=True).stderr
            elapsed = time.perf_counter() - started
            stored = conn.execute("SELECT count(*) FROM bemi.changes").fetchone()[0]
            assert stored == tx, (stored, tx)
            # The worker's own "wrote N changes in X s" lines: storing, without process start and setup.
            storing = sum(float(m) for m in re.findall(r"wrote \d+ changes? in ([0-9.]+) s", log))
            rates[kind].append(tx / elapsed)
            store_rates[kind].append(tx / storing)
            print(f"  ingest {kind:13} {tx:,} transactions in {elapsed:.2f} s ({tx / elapsed:,.0f} changes/s; "
                  f"storing alone {storing:.2f} s, {tx / storing:,.0f} changes/s)", flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    paired = statistics.median(p / u for p, u in zip(rates["partitioned"], rates["unpartitioned"]))
    print(f"ingest: partitioned {median['partitioned']:,.0f}/s, unpartitioned {median['unpartitioned']:,.0f}/s "
          f"(medians of {rounds} rounds): ratio {median['partitioned'] / median['unpartitioned']:.2f}x; median of "
          f"the per-round ratios {paired:.2f}x", flush=True)
    store = {k: statistics.median(v) for k, v in store_rates.items()}
    store_paired = statistics.median(p / u for p, u in zip(store_rates["partitioned"], store_rates["unpartitioned"]))
    print(f"ingest, storing alone: partitioned {store['partitioned']:,.0f}/s, unpartitioned "
          f"{store['unpartitioned']:,.0f}/s: ratio {store['partitioned'] / store['unpartitioned']:.2f}x; median of "
          f"the per-round ratios {store_paired:.2f}x", flush=True)
    return {**median, "paired": paired}


def settings_module(cluster: Cluster, dbname: str) -> str:
    folder = tempfile.mkdtemp(prefix="bemi-bench-")
    with open(os.path.join(folder, "bench_settings.py"), "w") as f:
        f.write(f"""
SECRET_KEY = 'bench'
USE_TZ = True
DATABASES = {{'default': {{'ENGINE': 'django.db.backends.postgresql', 'HOST': {cluster.host!r},
    'PORT': '{cluster.port}', 'USER': {cluster.user!r}, 'NAME': {dbname!r}}}}}
INSTALLED_APPS = ['django.contrib.contenttypes', 'django.contrib.auth', 'bemi']
DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'
""")
    return folder


def prune(cluster: Cluster, rows: int) -> dict:
    from bemi import sql as bemi_sql
    from bemi.worker.partitions import Partitions

    cluster.psql("CREATE DATABASE prune")
    dsn = cluster.dsn("prune")
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(SCHEMA)
    month = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
    step = f"{(31 * 86400) / rows} seconds"

    def load(partitioned: bool) -> None:
        conn.execute("DROP TABLE IF EXISTS bemi.changes, bemi._bemi_pruned CASCADE")
        conn.execute(bemi_sql.read("changes.sql") if partitioned else UNPARTITIONED)
        if partitioned:
            Partitions(conn, "month").ensure_periods([month, dt.datetime(2024, 4, 1, tzinfo=dt.timezone.utc)])
        started = time.perf_counter()
        conn.execute(FILL, {"rows": rows, "records": max(rows // 10, 1), "start": month, "step": step})
        conn.execute("VACUUM ANALYZE bemi.changes")
        print(f"  loaded {rows:,} changes into one month ({'partitioned' if partitioned else 'unpartitioned'}) "
              f"in {time.perf_counter() - started:.1f} s", flush=True)

    load(True)
    folder = settings_module(cluster, "prune")
    env = {**os.environ, "PYTHONPATH": f"{folder}:{ROOT}", "DJANGO_SETTINGS_MODULE": "bench_settings"}
    command = [sys.executable, "-m", "django", "bemi_prune", "--before"]
    empty = []
    for _ in range(3):  # the same command with nothing to remove: process start, Django, connection
        started = time.perf_counter()
        subprocess.run(command + ["2000-01-01"], env=env, cwd=ROOT, check=True, capture_output=True)
        empty.append(time.perf_counter() - started)
    startup_s = statistics.median(empty)
    started = time.perf_counter()
    out = subprocess.run(command + ["2024-04-01"], env=env,
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    prune_s = time.perf_counter() - started
    assert conn.execute("SELECT count(*) FROM bemi.changes").fetchone()[0] == 0
    print("  " + out.strip().replace("\n", "\n  "), flush=True)
    load(False)
    wal = lambda: int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])  # noqa: E731
    wal_before = wal()
    started = time.perf_counter()
    deleted = conn.execute("DELETE FROM bemi.changes WHERE committed_at < '2024-04-01'").rowcount
    delete_s = time.perf_counter() - started
    delete_wal = wal() - wal_before
    assert deleted == rows
    started = time.perf_counter()
    conn.execute("VACUUM bemi.changes")  # what gives the space back to the table (DELETE only marks rows)
    vacuum_s = time.perf_counter() - started
    print(f"prune: bemi_prune (whole command) {prune_s:.2f} s, of which {startup_s:.2f} s is the same command with "
          f"nothing to remove (median of 3: Python, Django, connection); DELETE of the same {rows:,} rows "
          f"{delete_s:.2f} s ({delete_s / prune_s:.1f}x the whole command, {delete_wal / 1e6:.0f} MB of WAL), then "
          f"VACUUM {vacuum_s:.2f} s: {(delete_s + vacuum_s) / prune_s:.1f}x", flush=True)
    return {"prune_s": prune_s, "delete_s": delete_s, "startup_s": startup_s, "vacuum_s": vacuum_s}


def queries(cluster: Cluster, rows: int, calls: int) -> dict:
    import django
    from django.conf import settings

    from bemi import sql as bemi_sql
    from bemi.worker.partitions import Partitions

    cluster.psql("CREATE DATABASE q")
    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "HOST": cluster.host,
                               "PORT": str(cluster.port), "USER": cluster.user, "NAME": "q"}},
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "bemi", "benchmodels"],
        USE_TZ=True, TIME_ZONE="UTC", DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    from bemi.models import BemiChange
    from django.db import connection
    from benchmodels.models import Todo

    conn = psycopg.connect(cluster.dsn("q"), autocommit=True)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    span = dt.timedelta(days=365)
    step = f"{span.total_seconds() / rows} seconds"
    results: dict[str, dict[str, float]] = {}
    conn.execute(SCHEMA)
    for kind in ("unpartitioned", "partitioned"):
        conn.execute("DROP TABLE IF EXISTS bemi.changes, bemi._bemi_pruned CASCADE")
        conn.execute(bemi_sql.read("changes.sql") if kind == "partitioned" else UNPARTITIONED)
        if kind == "partitioned":
            Partitions(conn, "month").ensure_periods(
                [dt.datetime(2024, m, 1, tzinfo=dt.timezone.utc) for m in range(1, 13)])
        started = time.perf_counter()
        conn.execute(FILL, {"rows": rows, "records": rows // 10, "start": start, "step": step})
        conn.execute("VACUUM ANALYZE bemi.changes")
        parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'bemi.changes'::regclass").fetchone()[0]
        print(f"  loaded {rows:,} changes ({kind}, {parts} partitions) in {time.perf_counter() - started:.1f} s",
              flush=True)
        connection.close()
        rng = random.Random(7)
        per_table = rows // 10 // 1000

        def median(call) -> float:
            call()
            timings = []
            for _ in range(calls):
                t0 = time.perf_counter()
                call()
                timings.append((time.perf_counter() - t0) * 1000)
            return statistics.median(timings)

        pk = lambda: rng.randint(1, max(per_table, 1))  # noqa: E731
        when = lambda: start + dt.timedelta(seconds=rng.randint(0, int(span.total_seconds())))  # noqa: E731
        results[kind] = {
            "bemi_changes": median(lambda: list(Todo(id=pk()).bemi_changes())),
            "as_of": median(lambda: Todo(id=pk()).bemi_as_of(when())),
            "one month": median(lambda: BemiChange.objects.filter(
                committed_at__gte="2024-06-01T00:00Z", committed_at__lt="2024-07-01T00:00Z").count()),
        }
        if kind == "partitioned":
            plan = BemiChange.objects.filter(committed_at__gte="2024-06-03T00:00Z", committed_at__lt="2024-06-04T00:00Z").explain()
            print("  EXPLAIN of a day's changes:\n    " + plan.replace("\n", "\n    "), flush=True)
    for name in results["partitioned"]:
        a, b = results["partitioned"][name], results["unpartitioned"][name]
        print(f"query {name:13} partitioned {a:6.2f} ms, unpartitioned {b:6.2f} ms: ratio {a / b:.2f}x", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tx", type=int, default=20_000, help="single-row transactions of the ingest run")
    parser.add_argument("--rounds", type=int, default=6, help="ingest rounds")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--skip", default="", help="comma-separated: ingest, prune, queries")
    options = parser.parse_args()
    skip = set(filter(None, options.skip.split(",")))
    cluster = Cluster(settings={"max_wal_size": "4GB"}).start_throwaway()
    with psycopg.connect(cluster.dsn()) as c:
        print(f"PostgreSQL {c.execute('SHOW server_version').fetchone()[0]}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if "ingest" not in skip:
        ingest(cluster, options.tx, options.rounds)
    if "prune" not in skip:
        prune(cluster, options.rows)
    if "queries" not in skip:
        queries(cluster, options.rows, options.calls)


if __name__ == "__main__":
    main()
