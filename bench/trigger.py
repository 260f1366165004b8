"""The statement trigger's cost on single-row writes: INSERTs with bemi's trigger disabled and enabled.

    python bench/trigger.py [--rounds 60] [--compare tests/data/sql_0007/row_trigger.sql]

Starts its own PostgreSQL, installs bemi's SQL (tracking.sql, install.sql) and
its statement trigger on one table, then sends one-row INSERTs through psycopg
(autocommit: one statement per transaction, as a `create()` sends) in blocks
of 200, the variants interleaved in a shuffled order each round: without the
trigger, with this version's, and, with ``--compare FILE``, with the
``_bemi_row_trigger_func()`` body in FILE (an earlier version's). The same
again with a ``/*Bemi ... Bemi*/`` marker ending each INSERT (a message per
statement). Prints medians per INSERT and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psycopg  # noqa: E402

from bemi import sql  # noqa: E402
from bemi_devtools.pgcluster import Cluster  # noqa: E402

BLOCK = 200
INSERT = "INSERT INTO public.item (name, qty) VALUES ('x', 1) RETURNING id"
MARKED = INSERT + ' /*Bemi {"user_id": 187234, "endpoint": "/todo"} Bemi*/'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--compare", metavar="FILE", help="another _bemi_row_trigger_func() body, for 'earlier'")
    options = parser.parse_args()

    cluster = Cluster(settings={"autovacuum": "off"}).start_throwaway()
    conn = psycopg.connect(cluster.dsn(), autocommit=True)
    conn.execute(sql.read("tracking.sql") + sql.read("install.sql"))
    conn.execute("CREATE TABLE public.item (id bigserial PRIMARY KEY, name text NOT NULL, qty int NOT NULL)")
    conn.execute("SELECT public._bemi_create_trigger('public.item'::regclass)")
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.item'::regclass "
                        "AND NOT tgisinternal").fetchone()[0] == 1
    current = conn.execute("SELECT pg_get_functiondef('public._bemi_row_trigger_func()'::regprocedure)").fetchone()[0]
    bodies = {"this version": current}
    if options.compare:
        with open(options.compare) as f:
            bodies["earlier"] = f.read()

    def use(variant: str) -> None:
        if variant == "no trigger":
            conn.execute("ALTER TABLE public.item DISABLE TRIGGER USER")
            return
        conn.execute("ALTER TABLE public.item ENABLE TRIGGER USER")
        conn.execute(bodies[variant])

    print(f"PostgreSQL {conn.execute('SHOW server_version').fetchone()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; {options.rounds} rounds of {BLOCK} INSERTs per variant")
    variants = ["no trigger", *bodies]
    rng = random.Random(7)
    for label, query in (("INSERT", INSERT), ("INSERT with a marker", MARKED)):
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(options.rounds):
            rng.shuffle(variants)
            for variant in variants:
                use(variant)
                for _ in range(20):  # warm the plan and the function's cache
                    conn.execute(query)
                started = time.perf_counter()
                for _ in range(BLOCK):
                    conn.execute(query)
                times[variant].append((time.perf_counter() - started) / BLOCK)
        base = times["no trigger"]
        print(f"\n{label}:")
        for variant in ["no trigger", *bodies]:
            per = statistics.median(times[variant]) * 1e6
            ratio = statistics.median(t / b for t, b in zip(times[variant], base))
            print(f"  {variant:14} {per:7.1f} us per INSERT   {ratio:.3f}x of no trigger "
                  f"(+{per - statistics.median(base) * 1e6:.1f} us)")
    conn.close()  # the cluster is removed at exit (start_throwaway)


if __name__ == "__main__":
    main()
