"""The admin's activity page on 1,000,000 changes: each filter's page time and PostgreSQL's plan.

    .venv/bin/python bench/activity.py [--rows 1000000] [--calls 20] [--plans]

Fills ``changes`` as bench/query.py does (1,000 tables, 100,000 records,
contexts with ``user_id`` (5,000 users), ``request_id`` and ``path``, one
change per second), then times one page of the activity page's query
(``bemi.admin_activity.activity`` and each change's diff as HTML, 100 changes) per
filter, against a baseline measured in the same run (a primary-key lookup of
one change), and prints the plan of each (``--plans``: the whole EXPLAIN).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bemi_devtools.pgcluster import Cluster  # noqa: E402
from query import BASE, fill, median_ms, setup_django  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--plans", action="store_true")
    args = parser.parse_args()

    cluster = Cluster().start_throwaway()
    cluster.psql("CREATE DATABASE bench")
    setup_django(cluster)
    fill(args.rows)

    from django.http import QueryDict

    from bemi.admin_activity import Filters, activity
    from bemi.admin_html import diff_table
    from bemi.models import BemiChange

    end = BASE + dt.timedelta(seconds=args.rows)
    day = (end - dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    week = (end - dt.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M")
    middle = BemiChange.objects.filter(committed_at__gte=BASE + dt.timedelta(seconds=args.rows // 2)).asc().first()
    keyset = f"{middle.committed_at.isoformat()}|{middle.commit_position}|{middle.change_index}"
    some_id = BemiChange.objects.values_list("id", flat=True).first()
    cases = [
        ("all, first page", ""),
        ("all, a page in the middle (keyset)", "after=" + keyset.replace("+", "%2B")),
        ("user_id=42 (200 changes)", "ctx.user_id=42"),
        ("user_id=42, the last day", f"ctx.user_id=42&since={day}"),
        ("request_id=req-4242 (3 changes)", "ctx=request_id%3Dreq-4242"),
        ("path=/todo/1 (one record's requests)", "ctx.path=/todo/1"),
        ("table=todo, the last week", f"table=todo&since={week}"),
        ("table=todo, operation=CREATE", "table=todo&operation=CREATE"),
        ("user_id=4999 and table=todo", "ctx.user_id=4999&table=todo"),
    ]

    def page(query: str) -> list:
        """The page's query and the diff of each change (its HTML), without the template and URLs."""
        return [diff_table(c) for c in activity(Filters.read(QueryDict(query), ["user_id", "path", "job"]))]

    base_ms = median_ms(lambda: BemiChange.objects.get(id=some_id), args.calls)
    print(f"\nmedian of {args.calls} pages of 100; PostgreSQL {cluster.psql('SHOW server_version')}; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'filter':40} {'page':>9} {'x base':>7} {'server':>9}  plan (nodes, indexes)")
    print(f"{'baseline: BemiChange.objects.get(id=...)':40} {base_ms:7.2f}ms {1:6.1f}x")
    plans = []
    for name, query in cases:
        ms = median_ms(lambda: page(query), args.calls)
        queryset = activity(Filters.read(QueryDict(query), ["user_id", "path", "job"]))
        plan = json.loads(queryset.explain(format="json", analyze=True))[0]
        print(f"{name:40} {ms:7.2f}ms {ms / base_ms:6.1f}x {plan['Execution Time']:7.2f}ms  {summary(plan['Plan'])}")
        plans.append((name, queryset.explain()))
    if args.plans:
        for name, text in plans:
            print(f"\n-- {name}\n{text}")


def summary(node: dict) -> str:
    """The plan's nodes, outermost first, with the index each one uses."""
    parts: list[str] = []

    def walk(n: dict) -> None:
        label = n["Node Type"]
        if "Index Name" in n:
            label += f" {n['Index Name']}"
        if label not in parts:
            parts.append(label)
        for child in n.get("Plans", []):
            walk(child)

    walk(node)
    return " > ".join(parts)


if __name__ == "__main__":
    main()
