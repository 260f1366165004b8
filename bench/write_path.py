"""Write-path overhead of the execute wrapper: the same operations with and without tracking.

    python bench/write_path.py [--rounds 7] [--no-migration]

Starts its own PostgreSQL (tests.pgcluster, autovacuum off), configures
Django itself, runs ``migrate`` (so the ``bemi`` triggers are installed
unless ``--no-migration``), then, round after round, runs each operation
under three variants in a shuffled order:

  plain    the wrapper removed from the connection (pure Django): the baseline
  idle     the wrapper installed, no context set
  tracked  the wrapper installed and a context set: one message per statement

It prints the median time and WAL bytes (``pg_current_wal_lsn`` before and
after) of each, the ratios against ``plain``, and the WAL added per tracked
statement against the size of the context JSON that statement carried.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONTEXT = {"user_id": 187234, "method": "POST", "path": "/todo", "endpoint": "todo-create"}
VARIANTS = ("plain", "idle", "tracked")
TARGETS = {"create() x2000, autocommit": 1.10, "create() x2000, atomic()": 1.10, "save() x1000": 1.10,
           "bulk_create() 10,000 rows": 1.05, "update() 10,000 rows": 1.05}


def setup_django(dsn_parts: dict, migrate: bool) -> None:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        SECRET_KEY="bench",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", **dsn_parts}},
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "bemi", "tests.ctxapp"],
        LOGGING_CONFIG=None,
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0, **({} if migrate else {}))
    if not migrate:
        call_command("migrate", "bemi", "zero", verbosity=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-migration", action="store_true", help="without the bemi triggers")
    args = parser.parse_args()

    from tests.pgcluster import Cluster

    cluster = Cluster(settings={"autovacuum": "off"}).start_throwaway()
    cluster.psql("CREATE DATABASE bench")
    setup_django({"HOST": cluster.host, "PORT": str(cluster.port), "USER": cluster.user, "NAME": "bench"},
                 migrate=not args.no_migration)

    import psycopg
    from django.db import connection, transaction
    from django.db.models import F

    import bemi
    from bemi.wrapper import bemi_execute_wrapper
    from tests.ctxapp.models import Item

    monitor = psycopg.connect(cluster.dsn("bench"), autocommit=True)
    triggers = monitor.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '\\_bemi\\_row\\_trigger\\_%' "
        "AND tgrelid = 'ctxapp_item'::regclass"
    ).fetchone()[0]

    def lsn() -> int:
        return monitor.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0]

    Item.objects.bulk_create([Item(name="seed", qty=i) for i in range(10_000)])
    seed_ids = list(Item.objects.filter(name="seed").order_by("pk").values_list("pk", flat=True))
    save_objs = list(Item.objects.filter(pk__in=seed_ids[:1000]))

    def create_autocommit() -> None:
        for i in range(2000):
            Item.objects.create(name="c", qty=i)

    def create_atomic() -> None:
        with transaction.atomic():
            for i in range(2000):
                Item.objects.create(name="a", qty=i)

    def bulk() -> None:
        Item.objects.bulk_create([Item(name="b", qty=i, note="bulk") for i in range(10_000)])

    def update() -> None:
        assert Item.objects.filter(name="seed").update(qty=F("qty") + 1) == 10_000

    def save() -> None:
        for obj in save_objs:
            obj.qty += 1
            obj.save()

    operations: dict[str, Callable[[], None]] = {
        "create() x2000, autocommit": create_autocommit,
        "create() x2000, atomic()": create_atomic,
        "bulk_create() 10,000 rows": bulk,
        "update() 10,000 rows": update,
        "save() x1000": save,
    }

    connection.ensure_connection()
    assert connection.execute_wrappers == [bemi_execute_wrapper]

    def run(op: Callable[[], None], variant: str) -> tuple[float, int]:
        if variant == "plain":
            connection.execute_wrappers.remove(bemi_execute_wrapper)
        token = bemi.set_context(CONTEXT) if variant == "tracked" else None
        gc.collect()
        before = lsn()
        start = time.perf_counter()
        try:
            op()
        finally:
            elapsed = time.perf_counter() - start
            if token is not None:
                bemi.appcontext.reset_context(token)
            if variant == "plain":
                connection.execute_wrappers.insert(0, bemi_execute_wrapper)
        return elapsed, lsn() - before

    # Calibration (untimed): statements per operation and the size of the context JSON they carry.
    sizes: dict[str, list[int]] = {}
    for name, op in operations.items():
        seen: list[int] = []

        def capture(execute, sql, params, many, context, seen=seen):
            if isinstance(sql, str) and bemi.statements.is_tracked_write(sql):
                seen.append(len(json.dumps({**CONTEXT, "SQL": sql}, ensure_ascii=False).encode()))
            return execute(sql, params, many, context)

        connection.execute_wrappers.insert(0, capture)
        try:
            op()
        finally:
            connection.execute_wrappers.remove(capture)
        sizes[name] = seen

    def clean() -> None:
        Item.objects.exclude(name="seed").delete()
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE ctxapp_item")
            cursor.execute("CHECKPOINT")

    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    rng = random.Random(42)
    clean()
    for round_no in range(args.rounds):
        for name, op in operations.items():
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                results.setdefault((name, variant), []).append(run(op, variant))
        clean()
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)

    print()
    print(f"bemi write path: {args.rounds} interleaved rounds, medians; PostgreSQL "
          f"{monitor.info.server_version // 10000}, Django {__import__('django').get_version()}, "
          f"psycopg {psycopg.__version__}, Python {sys.version.split()[0]}")
    print(f"bemi triggers on the table: {'yes' if triggers else 'no'} "
          f"({'migrate bemi applied' if not args.no_migration else '--no-migration'})")
    print("baseline 'plain' = bemi's wrapper removed from the connection (pure Django); "
          "'idle' = wrapper installed, no context set; 'tracked' = context set")
    print(f"context: {json.dumps(CONTEXT)} ({len(json.dumps(CONTEXT))} bytes) + \"SQL\"")
    print()
    header = (f"{'operation':28} {'plain ms':>9} {'idle ms':>9} {'tracked ms':>10} {'idle/plain':>10} "
              f"{'tracked/plain':>13} {'target':>6}  {'WAL plain':>10} {'WAL tracked':>11} "
              f"{'stmts':>5} {'ctx bytes':>9} {'WAL+/stmt':>9} {'limit':>6}")
    print(header)
    print("-" * len(header))
    for name in operations:
        t = {v: statistics.median(r[0] for r in results[(name, v)]) * 1000 for v in VARIANTS}
        w = {v: int(statistics.median(r[1] for r in results[(name, v)])) for v in VARIANTS}
        stmts = len(sizes[name])
        ctx_bytes = statistics.mean(sizes[name]) if stmts else 0
        added = (w["tracked"] - w["plain"]) / stmts if stmts else 0
        ratio = t["tracked"] / t["plain"]
        print(f"{name:28} {t['plain']:9.1f} {t['idle']:9.1f} {t['tracked']:10.1f} {t['idle'] / t['plain']:10.3f} "
              f"{ratio:13.3f} {TARGETS[name]:6.2f}  {w['plain']:10,d} {w['tracked']:11,d} "
              f"{stmts:5d} {ctx_bytes:9.0f} {added:9.0f} {ctx_bytes + 150:6.0f}")
    print()
    print("ratios are medians of time; WAL+/stmt = (median WAL tracked - median WAL plain) / statements;")
    print("limit = context JSON bytes + 150 (target: WAL+/stmt <= limit)")


if __name__ == "__main__":
    main()
