"""Run the benchmark operations for ONE alternative, inside that alternative's venv.

bench/compare.py starts this script once per alternative with ``BENCH_ALT`` and
``BENCH_PG*`` set, then talks to it in JSON lines: one command per line on
stdin, one JSON answer per line on stdout (anything else goes to stderr).
Commands: ``setup``, ``round``, ``capture``, ``versions``, ``quit``.

Every write runs inside the alternative's own context scope, set the way its
documentation says (see ``CONTEXTS``), so the timings include attaching the
context, as they would in a request.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from collections import Counter
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from benchapp.models import Subtask, Todo  # noqa: E402

ALT = os.environ["BENCH_ALT"]
# The endpoint has a query string on purpose: the published package percent-encodes it.
CONTEXT = {"user_id": 187234, "endpoint": "/todo?list=1&sort=due", "method": "POST"}
TRACKED_TABLES = ("todo", "subtask")


# -- how each alternative attaches application context ---------------------------
def _no_context(**values: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@contextlib.contextmanager
def _bemi013_context(**values: Any) -> Iterator[None]:
    """What the published BemiMiddleware does for a request (it has no other API)."""
    from bemi.middleware import BemiDBWrapper, bemi_context_var

    token = bemi_context_var.set(values)
    try:
        with connection.execute_wrapper(BemiDBWrapper()):
            yield
    finally:
        bemi_context_var.reset(token)


def _bemi_context(**values: Any) -> contextlib.AbstractContextManager:
    import bemi

    return bemi.context(**values)


def _pghistory_context(**values: Any) -> contextlib.AbstractContextManager:
    import pghistory

    return pghistory.context(**values)


CONTEXTS: dict[str, Callable[..., contextlib.AbstractContextManager]] = {
    "none": _no_context,
    "bemi": _bemi_context,
    "bemi013": _bemi013_context,
    "pghistory": _pghistory_context,
    # simple-history takes only the request's user (HistoryRequestMiddleware); no free-form context.
    "simplehistory": _no_context,
}
ctx = CONTEXTS[ALT]


def wal_lsn() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
        return int(cur.fetchone()[0])


def truncate() -> None:
    """Start each round from empty tables (outside any context: TRUNCATE is not tracked)."""
    tables = list(TRACKED_TABLES) + history_tables()
    with connection.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE")


def history_tables() -> list[str]:
    if ALT == "pghistory":
        return ["benchapp_todoevent", "benchapp_subtaskevent", "pghistory_context"]
    if ALT == "simplehistory":
        return ["todo_history", "subtask_history"]
    return []


# -- the operations --------------------------------------------------------------
# Each takes the sizes and returns (callable doing the timed work, rows it changes).
def make_parents(n: int, children: int = 0, tag: str = "t") -> list[int]:
    todos = Todo.objects.bulk_create([Todo(task=f"{tag} {i}") for i in range(n)])
    if children:
        Subtask.objects.bulk_create(
            [Subtask(todo_id=t.pk, title=f"step {j}") for t in todos for j in range(children)]
        )
    return [t.pk for t in todos]


def timed(fn: Callable[[], Any], op: str) -> tuple[float, int]:
    w0 = wal_lsn()
    t0 = time.perf_counter()
    with ctx(**CONTEXT, op=op):
        fn()
    elapsed = time.perf_counter() - t0
    return elapsed, wal_lsn() - w0


class Round:
    """One repetition of the operations, one command per operation so that the
    coordinator can interleave the alternatives operation by operation."""

    def __init__(self, k: int, n_bulk: int, n_delete: int, children: int) -> None:
        self.k, self.n_bulk, self.n_delete, self.children = k, n_bulk, n_delete, children
        self.objs: list[Todo] = []
        self.bulk: list[Todo] = []
        truncate()

    def create(self) -> tuple[float, float]:
        """Median seconds and WAL bytes of one ``create()``."""
        single, single_wal = [], []
        for i in range(self.k):
            holder: list[Todo] = []
            t, w = timed(lambda: holder.append(Todo.objects.create(task=f"task {i}")), "create")
            single.append(t)
            single_wal.append(w)
            self.objs.extend(holder)
        return statistics.median(single), statistics.median(single_wal)

    def save(self) -> tuple[float, float]:
        single, single_wal = [], []
        for obj in self.objs:
            obj.is_completed = True
            t, w = timed(obj.save, "save")
            single.append(t)
            single_wal.append(w)
        return statistics.median(single), statistics.median(single_wal)

    def bulk_create(self) -> tuple[float, float]:
        self.bulk = [Todo(task=f"bulk {i}") for i in range(self.n_bulk)]
        return timed(lambda: Todo.objects.bulk_create(self.bulk), "bulk_create")

    def update(self) -> tuple[float, float]:
        lo, hi = self.bulk[0].pk, self.bulk[-1].pk
        return timed(lambda: Todo.objects.filter(pk__gte=lo, pk__lte=hi).update(is_completed=True), "update")

    def delete(self) -> tuple[float, float]:
        ids = make_parents(self.n_delete, self.children, "del")  # untimed setup
        return timed(lambda: Todo.objects.filter(pk__in=ids).delete(), "delete")


_round: Round | None = None


def begin_round(**sizes: int) -> None:
    global _round
    _round = Round(**sizes)


def run_op(name: str) -> dict[str, float]:
    assert _round is not None, "begin_round first"
    seconds, wal = getattr(_round, name)()
    return {"time": seconds, "wal": wal}


# -- was it captured? ----------------------------------------------------------------
def capture_ops(n_bulk: int, n_delete: int, children: int) -> list[tuple[str, Callable[[], Any], int]]:
    """(name, work, rows changed) for every operation, raw SQL included."""
    box: dict[str, Any] = {}

    def create() -> None:
        box["obj"] = Todo.objects.create(task="captured")

    def save() -> None:
        box["obj"].is_completed = True
        box["obj"].save()

    def bulk() -> None:
        box["bulk"] = [t.pk for t in Todo.objects.bulk_create([Todo(task=f"b{i}") for i in range(n_bulk)])]

    def update() -> None:
        Todo.objects.filter(pk__in=box["bulk"]).update(is_completed=True)

    def delete() -> None:
        Todo.objects.filter(pk__in=box["del"]).delete()

    def raw(sql: str) -> Callable[[], None]:
        def run() -> None:
            with connection.cursor() as cur:
                cur.execute(sql, [box["raw_id"]] if "%s" in sql else None)
                if sql.startswith("INSERT"):
                    box["raw_id"] = cur.fetchone()[0]
        return run

    def prepare_delete() -> None:
        box["del"] = make_parents(n_delete, children, "cap")

    return [
        ("create", create, 1),
        ("save", save, 1),
        ("bulk_create", bulk, n_bulk),
        ("update", update, n_bulk),
        ("__prepare_delete", prepare_delete, 0),
        ("delete", delete, n_delete * (1 + children)),
        ("raw_insert", raw("INSERT INTO todo (task, is_completed) VALUES ('raw', false) RETURNING id"), 1),
        ("raw_update", raw("UPDATE todo SET is_completed = true WHERE id = %s"), 1),
        ("raw_delete", raw("DELETE FROM todo WHERE id = %s"), 1),
    ]


def load_wal_reader() -> type:
    """bemi_devtools/wal.py's reader, loaded by path: putting the repository on sys.path
    would let this repo's ``bemi`` package shadow the alternative's own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_wal", os.path.join(REPO, "bemi_devtools", "wal.py"))
    module = importlib.util.module_from_spec(spec)
    assert spec.loader
    sys.modules["bench_wal"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.WalReader


def count_history() -> int:
    tables = [t for t in history_tables() if t != "pghistory_context"]
    if not tables:
        return 0
    with connection.cursor() as cur:
        cur.execute(" + ".join(f'(SELECT count(*) FROM "{t}")' for t in tables).join(["SELECT ", ""]))
        return int(cur.fetchone()[0])


def history_with_context(op: str, exact: bool = False) -> int | None:
    """pghistory events of this operation linked to a context row that holds our values
    (all of them, endpoint included, when ``exact``)."""
    if ALT != "pghistory":
        return None
    wanted = {"op": op, "user_id": CONTEXT["user_id"]}
    if exact:
        wanted["endpoint"] = CONTEXT["endpoint"]
    with connection.cursor() as cur:
        cur.execute(
            "SELECT (SELECT count(*) FROM benchapp_todoevent e JOIN pghistory_context c ON c.id = e.pgh_context_id"
            "        WHERE c.metadata @> %s::jsonb)"
            " + (SELECT count(*) FROM benchapp_subtaskevent e JOIN pghistory_context c ON c.id = e.pgh_context_id"
            "        WHERE c.metadata @> %s::jsonb)",
            [json.dumps(wanted)] * 2,
        )
        return int(cur.fetchone()[0])


def wal_capture(records: list[Any], op: str) -> dict[str, int]:
    """Rows changed in the tracked tables, and how many sit in a transaction whose
    ``_bemi`` message carries this operation's context."""
    rows_by_xid: Counter[int] = Counter()
    with_ctx: set[int] = set()
    exact: set[int] = set()
    messages = 0
    message_bytes = 0
    for r in records:
        if r.kind in ("INSERT", "UPDATE", "DELETE") and r.table.split(".")[-1] in TRACKED_TABLES:
            rows_by_xid[r.xid] += 1
        elif r.kind == "MESSAGE" and r.prefix == "_bemi":
            messages += 1
            message_bytes += len(r.content.encode())
            try:
                payload = json.loads(r.content)
            except ValueError:
                # the published package percent-encodes the JSON; decode to check it
                from urllib.parse import unquote

                try:
                    payload = json.loads(unquote(r.content))
                except ValueError:
                    continue
            if isinstance(payload, dict) and payload.get("op") == op and payload.get("user_id") == CONTEXT["user_id"]:
                with_ctx.add(r.xid)
                if payload.get("endpoint") == CONTEXT["endpoint"]:
                    exact.add(r.xid)
    return {
        "wal_rows": sum(rows_by_xid.values()),
        "with_context": sum(n for xid, n in rows_by_xid.items() if xid in with_ctx),
        "context_exact": sum(n for xid, n in rows_by_xid.items() if xid in exact),
        "messages": messages,
        "message_bytes": message_bytes,
    }


def run_capture(n_bulk: int, n_delete: int, children: int) -> dict[str, Any]:
    """Run every operation once, each in its own transaction(s), and report what was recorded."""
    truncate()
    reader = None
    if ALT in ("bemi", "bemi013"):
        WalReader = load_wal_reader()
        s = connection.settings_dict
        reader = WalReader(f"host={s['HOST']} port={s['PORT']} dbname={s['NAME']} user={s['USER']}")
    worker = ALT == "bemi" and has_worker()
    if worker:
        run_worker()  # first start creates the slot: only changes after it are decoded
    results: dict[str, Any] = {}
    try:
        for op, work, expected in capture_ops(n_bulk, n_delete, children):
            if reader:
                reader.read()
            before = count_history()
            if op.startswith("__"):
                work()
                continue
            with ctx(**CONTEXT, op=op):
                work()
            res: dict[str, Any] = {"expected": expected}
            if reader:
                res.update(wal_capture(reader.read(), op))
                res["captured"] = res["with_context"]
            elif ALT in ("pghistory", "simplehistory"):
                res["captured"] = count_history() - before
                res["with_context"] = history_with_context(op)
                res["context_exact"] = history_with_context(op, exact=True)
            else:
                res["captured"] = 0
                res["with_context"] = None
            results[op] = res
    finally:
        if reader:
            reader.close()
    if worker:
        run_worker()
        stored = worker_rows()
        for op, res in results.items():
            res["worker_rows"] = stored.get(op, 0)
            res["captured"] = min(res["captured"], res["worker_rows"])
    return results


def has_worker() -> bool:
    from django.core.management import get_commands

    return "bemi_worker" in get_commands()


def run_worker() -> None:
    """This project's worker, draining what the slot holds now (``--once``)."""
    call_command("bemi_worker", "--once")


def worker_rows() -> dict[str, int]:
    """``changes`` rows the worker stored for the tracked tables, by the operation in their context."""
    with connection.cursor() as cur:
        cur.execute(
            'SELECT context->>\'op\', count(*) FROM bemi.changes WHERE "table" = ANY(%s) GROUP BY 1',
            [list(TRACKED_TABLES)],
        )
        return {op or "": n for op, n in cur.fetchall()}


# -- setup and versions ----------------------------------------------------------------
def setup() -> dict[str, Any]:
    # As a user would: the app's tables exist (auth first, for simple-history's user FK),
    # then the rest of the migrations run, the alternative's own ones included.
    for app in ("contenttypes", "auth"):
        call_command("migrate", app, verbosity=0, interactive=False)
    call_command("migrate", run_syncdb=True, verbosity=0, interactive=False)
    notes = []
    if ALT == "pghistory":
        call_command("pgtrigger", "install", verbosity=0)
    if ALT == "bemi013":
        # The published docs: "To track both the before and after states ... ALTER TABLE
        # [YOUR_TABLE_NAME] REPLICA IDENTITY FULL" (its migration does not do it).
        with connection.cursor() as cur:
            for t in TRACKED_TABLES:
                cur.execute(f'ALTER TABLE "{t}" REPLICA IDENTITY FULL')
        notes.append("REPLICA IDENTITY FULL set by hand, as its docs say")
    with connection.cursor() as cur:
        cur.execute(
            "SELECT c.relname, c.relreplident, (SELECT count(*) FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal)"
            " FROM pg_class c WHERE c.relname = ANY(%s) ORDER BY 1",
            [list(TRACKED_TABLES)],
        )
        tables = {name: {"replica_identity": ident, "triggers": n} for name, ident, n in cur.fetchall()}
    return {"tables": tables, "notes": notes}


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "django": django.get_version()}
    dists = {"bemi": ["bemi-django-selfhosted"], "bemi013": ["bemi-django"], "pghistory": ["django-pghistory", "django-pgtrigger"],
             "simplehistory": ["django-simple-history"]}.get(ALT, [])
    for dist in [*dists, "psycopg"]:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    with connection.cursor() as cur:
        cur.execute("SHOW server_version")
        out["postgresql"] = cur.fetchone()[0]
    return out


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # keep stray prints (migrate, warnings) off the protocol channel
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            name = cmd.pop("cmd")
            if name == "quit":
                break
            handler = {"setup": setup, "begin_round": begin_round, "op": run_op, "capture": run_capture,
                       "versions": versions}[name]
            answer = {"ok": True, "result": handler(**cmd)}
        except Exception as exc:  # report, keep serving: the coordinator decides
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
