"""Write-path overhead of bemi's cursor hook (bemi/wrapper.py): the same operations with and without tracking.

    python bench/write_path.py [--rounds 5] [--no-migration] [--one-string-only]

Starts its own PostgreSQL (bemi_devtools.pgcluster, autovacuum off), configures
Django itself, runs ``migrate`` (so the ``bemi`` statement triggers are
installed, unless ``--no-migration``), then runs each operation in units of
work; every unit runs once per variant, in a shuffled order, so that all
variants see the same (noisy) machine:

  no bemi  the cursor hook removed and bemi's triggers disabled: Django without bemi
  plain    the hook removed, triggers in place: the baseline ("without tracking")
  idle     the hook installed, no context set
  tracked  the hook installed and a context set: one message per write statement

A last table times one query string of many INSERTs (5,000 and 20,000, with
and without a ``/*Bemi ... Bemi*/`` marker) sent by psycopg, with bemi's
statement trigger enabled and disabled, interleaved (issue 20: the trigger
used to read the whole string from every statement of it).

Ratios are the median, over all units of all rounds, of the unit's time
under a variant divided by the same unit's time under ``plain`` (robust to
load that drifts between units). WAL bytes come from ``pg_current_wal_lsn``
before and after each unit; the size of the messages themselves comes from
``pg_walinspect`` (the ``LogicalMessage`` records), compared with the size
of the context JSON each statement carried.
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
from collections import defaultdict
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONTEXT = {"user_id": 187234, "method": "POST", "path": "/todo", "endpoint": "todo-create"}
VARIANTS = ("no bemi", "plain", "idle", "tracked")
Unit = Callable[[], None]


def setup_django(dsn_parts: dict, migrate: bool) -> None:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        SECRET_KEY="bench",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", **dsn_parts}},
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "bemi", "benchmodels"],
        LOGGING_CONFIG=None,
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)
    if not migrate:
        call_command("migrate", "bemi", "zero", verbosity=0)


def cost_breakdown(connection, Item, bemi) -> dict[str, float]:
    """One create() at a time, interleaved: how much of the overhead is the wrapper's
    Python, the second statement in the query string, and the message itself."""
    from bemi.wrapper import install_execute_wrapper, uninstall_execute_wrapper

    payload = json.dumps({**CONTEXT, "SQL": 'INSERT INTO "bench_item" ("name", "qty", "note") '
                          'VALUES (%s, %s, %s) RETURNING "bench_item"."id"'})

    def prefixed(prefix: str, with_payload: bool):
        def w(execute, sql, params, many, context):
            result = execute(prefix + sql, [payload, *params] if with_payload else params, many, context)
            context["cursor"].cursor.nextset()
            return result
        return w

    with connection.cursor() as cursor:  # for the prepared-statement variant (not used by bemi: see docs)
        cursor.execute("PREPARE _bench_emit(text) AS SELECT pg_catalog.pg_logical_emit_message(true, '_bemi', $1)")
    variants = {
        "plain (no wrapper)": None,
        "'SELECT 1; ' + INSERT (a second statement, no message)": prefixed("SELECT 1; ", False),
        "'SELECT pg_logical_emit_message(...); ' + INSERT, fixed JSON": prefixed(
            "SELECT pg_logical_emit_message(true, '_bemi', %s::text); ", True),
        "'EXECUTE <prepared message>(...); ' + INSERT, fixed JSON": prefixed("EXECUTE _bench_emit(%s); ", True),
        "bemi's hook, one context for all calls (a job, a loop)": "steady",
        "bemi's hook, a new context per call (like one write per request)": "tracked",
    }
    token = bemi.set_context(CONTEXT)
    steady = bemi.appcontext.current_frame()  # the same frame for every call: its JSON is serialised once
    bemi.appcontext.reset_context(token)
    samples: dict[str, list[float]] = {label: [] for label in variants}
    labels = list(variants)
    rng = random.Random(7)
    uninstall_execute_wrapper()
    try:
        for _ in range(2000):
            rng.shuffle(labels)
            for label in labels:
                extra = variants[label]
                token = None
                if extra in ("tracked", "steady"):
                    install_execute_wrapper()
                    token = bemi.set_context(CONTEXT) if extra == "tracked" else bemi.appcontext._current.set(steady)
                elif extra is not None:
                    connection.execute_wrappers.append(extra)
                start = time.perf_counter()
                Item.objects.create(name="x", qty=0)
                samples[label].append(time.perf_counter() - start)
                if token is not None:
                    bemi.appcontext.reset_context(token)
                    uninstall_execute_wrapper()
                elif extra is not None:
                    connection.execute_wrappers.remove(extra)
    finally:
        install_execute_wrapper()
    return {label: statistics.median(values) * 1e6 for label, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-migration", action="store_true", help="without the bemi triggers")
    parser.add_argument("--one-string-only", action="store_true",
                        help="only the table of one query string of many INSERTs")
    args = parser.parse_args()

    from bemi_devtools.pgcluster import Cluster

    cluster = Cluster(settings={"autovacuum": "off"}).start_throwaway()
    cluster.psql("CREATE DATABASE bench")
    setup_django({"HOST": cluster.host, "PORT": str(cluster.port), "USER": cluster.user, "NAME": "bench"},
                 migrate=not args.no_migration)

    import django
    import psycopg
    from django.db import connection, transaction
    from django.db.models import F

    import bemi
    from bemi.wrapper import install_execute_wrapper, is_hooked, uninstall_execute_wrapper
    from benchmodels.models import Item

    monitor = psycopg.connect(cluster.dsn("bench"), autocommit=True)
    monitor.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    triggers = monitor.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '\\_bemi\\_row\\_trigger\\_%' "
        "AND tgrelid = 'bench_item'::regclass"
    ).fetchone()[0]

    def lsn() -> str:
        return monitor.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]

    def wal_between(start: str, end: str) -> tuple[int, list[int]]:
        """Bytes of WAL, and the (8-byte aligned) size of each logical message record."""
        total = monitor.execute("SELECT %s::pg_lsn - %s::pg_lsn", [end, start]).fetchone()[0]
        messages = monitor.execute(
            "SELECT (record_length + 7) / 8 * 8 FROM pg_get_wal_records_info(%s, %s) "
            "WHERE resource_manager = 'LogicalMessage'", [start, end]).fetchall() if start != end else []
        return int(total), [m[0] for m in messages]

    Item.objects.bulk_create([Item(name="seed", qty=i) for i in range(10_000)])
    seed_ids = list(Item.objects.filter(name="seed").order_by("pk").values_list("pk", flat=True))
    save_objs = list(Item.objects.filter(pk__in=seed_ids[:1000]).order_by("pk"))

    def creates(n: int, name: str) -> Unit:
        def unit() -> None:
            for i in range(n):
                Item.objects.create(name=name, qty=i)
        return unit

    def creates_in_atomic(n: int) -> Unit:
        def unit() -> None:
            with transaction.atomic():
                for i in range(n):
                    Item.objects.create(name="a", qty=i)
        return unit

    def bulk() -> None:
        Item.objects.bulk_create([Item(name="b", qty=i, note="bulk") for i in range(10_000)])

    def update() -> None:
        assert Item.objects.filter(name="seed").update(qty=F("qty") + 1) == 10_000

    def saves(objs: list) -> Unit:
        def unit() -> None:
            for obj in objs:
                obj.qty += 1
                obj.save()
        return unit

    def vacuum(delete_name: str | None = None) -> Unit:
        def reset() -> None:  # untimed, after each run of a big statement: same table state for all
            if delete_name:
                monitor.execute("DELETE FROM bench_item WHERE name = %s", [delete_name])
            monitor.execute("VACUUM bench_item")
        return reset

    # name: (units run per round, how many units make one operation, target ratio, description, reset)
    operations: dict[str, tuple[list[Unit], int, float, str, Unit | None]] = {
        "create() x2000, autocommit": ([creates(100, "c")] * 20, 20, 1.10, "20 units of 100 create()", None),
        "create() x2000, atomic()": ([creates_in_atomic(200)] * 10, 10, 1.10, "10 atomic() blocks of 200", None),
        "bulk_create() 10,000 rows": ([bulk] * 8, 1, 1.05, "the whole operation, 8 times", vacuum("b")),
        "update() 10,000 rows": ([update] * 8, 1, 1.05, "the whole operation, 8 times", vacuum()),
        "save() x1000": ([saves(save_objs[i:i + 100]) for i in range(0, 1000, 100)], 10, 1.10,
                         "10 units of 100 save()", None),
    }

    if args.one_string_only:
        one_query_string(monitor, args.rounds, bool(triggers))
        return

    connection.ensure_connection()
    assert is_hooked(connection.connection)

    def set_triggers(enabled: bool) -> None:
        if triggers:
            with connection.cursor() as cursor:
                cursor.execute(f"ALTER TABLE bench_item {'ENABLE' if enabled else 'DISABLE'} TRIGGER USER")

    def run(unit: Unit, variant: str) -> tuple[float, int, list[int]]:
        if variant in ("plain", "no bemi"):
            uninstall_execute_wrapper()
        if variant == "no bemi":
            set_triggers(False)
        token = bemi.set_context(CONTEXT) if variant == "tracked" else None
        before = lsn()
        start = time.perf_counter()
        try:
            unit()
        finally:
            elapsed = time.perf_counter() - start
            after = lsn()
            if token is not None:
                bemi.appcontext.reset_context(token)
            if variant in ("plain", "no bemi"):
                install_execute_wrapper()
            if variant == "no bemi":
                set_triggers(True)
        return (elapsed, *wal_between(before, after))

    # Calibration (untimed): the write statements of each unit and their context JSON sizes.
    sizes: dict[str, list[int]] = {}
    for name, (units, _, _, _, reset) in operations.items():
        seen: list[int] = []

        def capture(execute, sql, params, many, context, seen=seen):
            if isinstance(sql, str) and bemi.statements.is_tracked_write(sql):
                seen.append(len(json.dumps({**CONTEXT, "SQL": sql}, ensure_ascii=False).encode()))
            return execute(sql, params, many, context)

        with connection.execute_wrapper(capture):
            units[0]()
        if reset:
            reset()
        sizes[name] = seen

    def clean() -> None:
        Item.objects.exclude(name="seed").delete()
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE bench_item")
            cursor.execute("CHECKPOINT")

    times: dict[tuple[str, str], list[float]] = defaultdict(list)  # per unit
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)  # per unit, against plain
    wal: dict[tuple[str, str], list[int]] = defaultdict(list)  # per unit
    message_sizes: dict[str, list[int]] = defaultdict(list)
    rng = random.Random(42)
    clean()
    gc.disable()  # a collection would land on whichever variant happens to run
    for round_no in range(args.rounds):
        for name, (units, _, _, _, reset) in operations.items():
            for unit in units:
                order = list(VARIANTS)
                rng.shuffle(order)
                unit_times = {}
                for variant in order:
                    elapsed, wal_bytes, messages = run(unit, variant)
                    if reset:
                        reset()
                    unit_times[variant] = elapsed
                    times[(name, variant)].append(elapsed)
                    wal[(name, variant)].append(wal_bytes)
                    if variant == "tracked":
                        message_sizes[name].extend(messages)
                for variant in VARIANTS:
                    ratios[(name, variant)].append(unit_times[variant] / unit_times["plain"])
                gc.collect()
        clean()
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    gc.enable()

    print()
    print(f"bemi write path: {args.rounds} rounds; PostgreSQL {monitor.info.server_version // 10000}, "
          f"Django {django.get_version()}, psycopg {psycopg.__version__}, Python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"bemi statement triggers on the table: {'yes' if triggers else 'no'} "
          f"({'--no-migration' if args.no_migration else 'migrate bemi applied'})")
    print("variants, interleaved in shuffled order for every unit of work:")
    print("  no bemi = hook removed and bemi's triggers disabled (Django without bemi)")
    print("  plain   = hook removed, triggers in place: the baseline of the ratios (without tracking)")
    print("  idle    = hook installed, no context set")
    print("  tracked = hook installed, context set: one message per write statement")
    print(f"context: {json.dumps(CONTEXT)} ({len(json.dumps(CONTEXT))} bytes) plus \"SQL\"")
    print()
    print(f"{'':28}{'time per operation, ms (median)':^36}  {'ratio to plain (median of units)':^33}")
    header = (f"{'operation':28}{'no bemi':>9}{'plain':>9}{'idle':>9}{'tracked':>9}  "
              f"{'no bemi':>8}{'idle':>8}{'tracked':>9}{'target':>8}  units")
    print(header)
    print("-" * (len(header) + 26))
    for name, (units, parts, target, how, _) in operations.items():
        per_op = {v: statistics.median(times[(name, v)]) * parts * 1000 for v in VARIANTS}
        ratio = {v: statistics.median(ratios[(name, v)]) for v in VARIANTS}
        print(f"{name:28}{per_op['no bemi']:9.1f}{per_op['plain']:9.1f}{per_op['idle']:9.1f}"
              f"{per_op['tracked']:9.1f}  {ratio['no bemi']:8.3f}{ratio['idle']:8.3f}{ratio['tracked']:9.3f}"
              f"{target:8.2f}  {how}")
    print()
    header = (f"{'operation':28}{'WAL plain':>11}{'WAL tracked':>12}{'stmts':>7}{'msgs':>6}"
              f"{'ctx JSON B':>11}{'msg record B':>13}{'WAL+/stmt':>10}{'limit':>7}")
    print(header)
    print("-" * len(header))
    for name, (units, parts, _, _, _) in operations.items():
        w = {v: int(statistics.median(wal[(name, v)])) * parts for v in VARIANTS}
        stmts = len(sizes[name]) * parts
        ctx = statistics.mean(sizes[name]) if sizes[name] else 0
        msgs = message_sizes[name]
        per_round = len(msgs) * parts // (args.rounds * len(units))
        record = statistics.mean(msgs) if msgs else 0
        added = (w["tracked"] - w["plain"]) / stmts if stmts else 0
        print(f"{name:28}{w['plain']:11,d}{w['tracked']:12,d}{stmts:7d}{per_round:6d}{ctx:11.0f}"
              f"{record:13.0f}{added:10.0f}{ctx + 150:7.0f}")
    breakdown = cost_breakdown(connection, Item, bemi)
    print()
    print("where a tracked single-row create() spends its extra time (median of 2,000 interleaved calls, us):")
    base = next(iter(breakdown.values()))
    for label, value in breakdown.items():
        print(f"  {label:62} {value:7.1f} us  {value - base:+7.1f}")
    print()
    print("WAL plain/tracked: WAL bytes of one operation (median per unit x units per operation,")
    print("pg_current_wal_lsn before/after); stmts, msgs: write statements and messages per operation.")
    print("msg record B: mean size of the LogicalMessage WAL records (pg_walinspect, 8-byte aligned);")
    print("WAL+/stmt: (WAL tracked - WAL plain) / statements, noisy for single big statements;")
    print("limit: context JSON bytes + 150 (target: msg record B and WAL+/stmt <= limit).")
    print()
    one_query_string(monitor, args.rounds, bool(triggers))


def one_query_string(monitor, rounds: int, triggers: bool) -> None:
    """N INSERTs in one query string, bemi's statement trigger on and off (interleaved), N = 5,000 and 20,000."""
    if not triggers:
        print("one query string: no bemi statement trigger installed (--no-migration), nothing to compare")
        return
    monitor.execute("CREATE TABLE IF NOT EXISTS bench_one_string (id serial PRIMARY KEY, a int)")
    monitor.execute("CALL public._bemi_create_triggers()")
    marker = ' /*Bemi {"user_id": 187234, "path": "/import"} Bemi*/'
    cases = [(n, m) for n in (5_000, 20_000) for m in ("", marker)]
    times: dict[tuple[int, str, bool], list[float]] = defaultdict(list)
    ratios: dict[tuple[int, str], list[float]] = defaultdict(list)
    rng = random.Random(7)
    for _ in range(rounds):
        for n, m in cases:
            text = "".join(f"INSERT INTO bench_one_string (a) VALUES ({i}){m};" for i in range(n))
            run = {}
            for enabled in rng.sample([True, False], 2):
                monitor.execute(f"ALTER TABLE bench_one_string {'ENABLE' if enabled else 'DISABLE'} TRIGGER USER")
                start = time.perf_counter()
                monitor.execute(text)
                run[enabled] = time.perf_counter() - start
                times[(n, m, enabled)].append(run[enabled])
                monitor.execute("TRUNCATE bench_one_string")
            ratios[(n, m)].append(run[True] / run[False])
    monitor.execute("ALTER TABLE bench_one_string ENABLE TRIGGER USER")
    print(f"one query string of N INSERTs (psycopg, autocommit: one implicit transaction), {rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f}")
    header = f"{'N':>7}  {'marker':8}{'no trigger s':>13}{'trigger s':>11}{'ratio':>8}{'us/stmt added':>15}"
    print(header)
    print("-" * len(header))
    for n, m in cases:
        off, on = statistics.median(times[(n, m, False)]), statistics.median(times[(n, m, True)])
        print(f"{n:7,d}  {'yes' if m else 'no':8}{off:13.3f}{on:11.3f}{statistics.median(ratios[(n, m)]):8.2f}"
              f"{(on - off) / n * 1e6:15.1f}")
    print("ratio: median of the per-round ratios, trigger / no trigger (target <= 2 without a marker);")
    print("with a marker every statement also writes its message to the WAL (that is the point of the marker).")


if __name__ == "__main__":
    main()
