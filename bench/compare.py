#!/usr/bin/env python3
"""Benchmark bemi-django side by side with the alternatives, on the same model and operations.

    python3 bench/compare.py            # full run (writes docs/compare.md and docs/compare.png)
    python3 bench/compare.py --quick    # small sizes, few rounds: checks the harness works

Alternatives: no tracking; this repository's bemi-django; the published
bemi-django 0.1.3; django-pghistory; django-simple-history. Each one gets its
own virtual environment under .bench/venvs/ and its own database in one private
PostgreSQL cluster (bemi_devtools/pgcluster.py) started for this run, and is driven by
bench/compare_project/runner.py running inside its venv (JSON lines in/out).

Timings are medians over rounds; each round runs every alternative once, in a
rotating order, so that noise from the (shared, 2-core) machine spreads over
all of them instead of landing on one. Standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROJECT = os.path.join(HERE, "compare_project")
VENVS = os.path.join(REPO, ".bench", "venvs")
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from bemi_devtools.pgcluster import Cluster  # noqa: E402

COMMON = ["Django==5.2.*", "psycopg[binary]==3.3.*"]


@dataclass
class Alternative:
    key: str
    label: str
    requirements: list[str]
    runner: subprocess.Popen | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def python(self) -> str:
        return os.path.join(VENVS, self.key, "bin", "python")


ALTERNATIVES = [
    Alternative("none", "no tracking", []),
    Alternative("bemi", "bemi-django (this repo)", ["-e", REPO]),
    Alternative("bemi013", "bemi-django 0.1.3", ["bemi-django==0.1.3"]),
    Alternative("pghistory", "django-pghistory", ["django-pghistory==3.9.2"]),
    Alternative("simplehistory", "django-simple-history", ["django-simple-history==3.13.0"]),
]
PLOT_REQUIREMENTS = ["matplotlib==3.10.*"]
OPS = ["create", "save", "bulk_create", "update", "delete"]
CAPTURE_OPS = OPS + ["raw_insert", "raw_update", "raw_delete"]

FULL = dict(rounds=11, k=100, n_bulk=10_000, n_delete=1_000, children=2)
QUICK = dict(rounds=3, k=20, n_bulk=2_000, n_delete=200, children=2)


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- virtual environments ------------------------------------------------------------
def ensure_venv(key: str, requirements: list[str]) -> str:
    """Create .bench/venvs/KEY with REQUIREMENTS, once per change of the requirement list."""
    path = os.path.join(VENVS, key)
    python = os.path.join(path, "bin", "python")
    stamp = os.path.join(path, ".bench-installed")
    key_text = json.dumps(requirements)
    for i, req in enumerate(requirements[:-1]):  # an editable source tree: reinstall when its deps change
        if req == "-e":
            pyproject = os.path.join(requirements[i + 1], "pyproject.toml")
            if os.path.exists(pyproject):
                key_text += open(pyproject).read()
    digest = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    if os.path.exists(stamp) and open(stamp).read() == digest:
        return python
    if not os.path.exists(python):
        log(f"creating venv {path}")
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
    log(f"installing into {key}: {' '.join(requirements)}")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        check=True, stdout=subprocess.DEVNULL,
    )
    with open(stamp, "w") as fh:
        fh.write(digest)
    return python


# -- talking to the runners ----------------------------------------------------------
def start_runner(alt: Alternative, cluster: Cluster) -> None:
    env = {
        **os.environ,
        "BENCH_ALT": alt.key,
        "BENCH_PGHOST": cluster.host,
        "BENCH_PGPORT": str(cluster.port),
        "BENCH_PGUSER": cluster.user,
        "BENCH_PGDATABASE": f"bench_{alt.key}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    alt.runner = subprocess.Popen(
        [alt.python, os.path.join(PROJECT, "runner.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=PROJECT,
    )


def call(alt: Alternative, cmd: str, **args: Any) -> Any:
    assert alt.runner and alt.runner.stdin and alt.runner.stdout
    alt.runner.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
    alt.runner.stdin.flush()
    line = alt.runner.stdout.readline()
    if not line:
        raise RuntimeError(f"{alt.key}: runner exited (see its stderr above)")
    answer = json.loads(line)
    if not answer["ok"]:
        raise RuntimeError(f"{alt.key}: {cmd} failed: {answer['error']}\n{answer['traceback']}")
    return answer["result"]


def stop_runner(alt: Alternative) -> None:
    if alt.runner and alt.runner.poll() is None:
        try:
            call(alt, "quit")
        except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
            pass
        alt.runner.wait(timeout=30)


# -- the run ---------------------------------------------------------------------------
def machine() -> dict[str, str]:
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
            mem = f"{kb / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"nproc": str(os.cpu_count()), "memory": mem, "cpu": cpu, "os": platform.platform(),
            "loadavg_at_start": load}


def run(sizes: dict[str, int], alts: list[Alternative]) -> dict[str, Any]:
    cluster = Cluster().start_throwaway()
    log(f"PostgreSQL cluster on port {cluster.port} ({cluster.bindir})")
    try:
        ready, skipped = [], []
        for alt in alts:
            cluster.psql(f"CREATE DATABASE bench_{alt.key}")
            start_runner(alt, cluster)
            try:
                alt.info["setup"] = call(alt, "setup")
                alt.info["versions"] = call(alt, "versions")
            except RuntimeError as exc:  # e.g. this repo's side not built yet: report, go on
                log(f"{alt.key}: SKIPPED, setup failed: {exc}")
                stop_runner(alt)
                skipped.append(f"{alt.label} (setup failed: {str(exc).splitlines()[0]})")
                continue
            ready.append(alt)
            log(f"{alt.key}: ready {alt.info['setup']}")
        alts = ready

        round_args = {k: sizes[k] for k in ("k", "n_bulk", "n_delete", "children")}
        log("warm-up round")
        for alt in list(alts):
            try:
                call(alt, "begin_round", **round_args)
                for op in OPS:
                    call(alt, "op", name=op)
            except RuntimeError as exc:
                log(f"{alt.key}: SKIPPED, warm-up failed: {exc}")
                stop_runner(alt)
                skipped.append(f"{alt.label} (failed: {str(exc).splitlines()[0]})")
                alts.remove(alt)

        # rounds[alt][op] = one {"time", "wal"} per round. Within a round the alternatives
        # take turns operation by operation, in an order rotated every round and operation,
        # so that each operation of each alternative runs at nearly the same moment.
        rounds: dict[str, dict[str, list[dict[str, float]]]] = {a.key: {op: [] for op in OPS} for a in alts}
        for r in range(sizes["rounds"]):
            log(f"round {r + 1}/{sizes['rounds']}")
            for alt in alts:
                call(alt, "begin_round", **round_args)
            for i, op in enumerate(OPS):
                shift = (r + i) % len(alts)
                for alt in alts[shift:] + alts[:shift]:
                    rounds[alt.key][op].append(call(alt, "op", name=op))

        capture_args = {"n_bulk": 100, "n_delete": 10, "children": 2}
        captures = {}
        for alt in alts:
            captures[alt.key] = call(alt, "capture", **capture_args)
            log(f"{alt.key}: capture checked")
        for alt in alts:
            stop_runner(alt)
    finally:
        for alt in alts:
            if alt.runner and alt.runner.poll() is None:
                alt.runner.kill()
        cluster.destroy()

    results: dict[str, Any] = {}
    base = rounds.get("none")
    for alt in alts:
        per = rounds[alt.key]
        results[alt.key] = {
            "label": alt.label,
            "times": {op: statistics.median(x["time"] for x in per[op]) for op in OPS},
            "times_spread": {op: [min(x["time"] for x in per[op]), max(x["time"] for x in per[op])] for op in OPS},
            "wal": {op: statistics.median(x["wal"] for x in per[op]) for op in OPS},
            "capture": captures[alt.key],
            **alt.info,
        }
        if base:
            # Median of the per-round ratios: each pairs measurements taken moments apart,
            # which cancels most of the load other processes put on the machine.
            results[alt.key]["time_ratio"] = {
                op: statistics.median(x["time"] / b["time"] for x, b in zip(per[op], base[op])) for op in OPS
            }
    return {"sizes": sizes, "capture_sizes": capture_args, "results": results, "skipped": skipped}


# -- reporting ---------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    if seconds < 0.1:
        return f"{seconds * 1000:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_capture(c: dict[str, Any]) -> str:
    got, expected, ctx = c["captured"], c["expected"], c.get("with_context")
    if got == 0:
        return "**no**"
    mark = "yes" if got >= expected else f"partly {got}/{expected}"
    if got > expected:
        mark = f"yes ({got} for {expected})"
    if ctx is not None and ctx < min(got, expected):
        mark += f", context on {ctx}"
    exact = c.get("context_exact")
    if exact is not None and ctx and exact < ctx:
        mark += ", context altered" if exact == 0 else f", context altered on {ctx - exact}"
    return mark


def op_titles(sizes: dict[str, int]) -> dict[str, str]:
    return {
        "create": "`create()` 1 row",
        "save": "`save()` 1 row",
        "bulk_create": f"`bulk_create` {sizes['n_bulk']:,} rows",
        "update": f"`update()` {sizes['n_bulk']:,} rows",
        "delete": f"cascading `delete()` {sizes['n_delete']:,}+{sizes['n_delete'] * sizes['children']:,} rows",
        "raw_insert": "raw INSERT", "raw_update": "raw UPDATE", "raw_delete": "raw DELETE",
    }


def tables_markdown(data: dict[str, Any]) -> str:
    sizes, res = data["sizes"], data["results"]
    titles = op_titles(sizes)
    base = res.get("none")

    def heading(title: str) -> list[str]:
        return [f"### {title}", "", "| alternative | " + " | ".join(titles[o] for o in OPS) + " |",
                "|---|" + "---:|" * len(OPS)]

    lines = heading("Time per operation (median; in brackets the median of the per-round ratios against no tracking)")
    for key, r in res.items():
        cells = []
        for op in OPS:
            t = r["times"][op]
            cell = fmt_time(t)
            if "time_ratio" in r and key != "none":
                cell += f" ({r['time_ratio'][op]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", *heading("Spread of the time: fastest and slowest round (the machine's noise)")]
    for key, r in res.items():
        cells = [f"{fmt_time(lo)} - {fmt_time(hi)}" for lo, hi in (r["times_spread"][op] for op in OPS)]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", *heading("WAL written per operation (median; ratio against no tracking)")]
    for key, r in res.items():
        cells = []
        for op in OPS:
            w = r["wal"][op]
            cell = fmt_bytes(w)
            if base and key != "none" and base["wal"][op]:
                cell += f" ({w / base['wal'][op]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    cs = data["capture_sizes"]
    ctitles = op_titles({**sizes, **cs})
    lines += ["", "### Captured? (rows recorded with their context / rows changed)", "",
              "| alternative | " + " | ".join(ctitles[o] for o in CAPTURE_OPS) + " |",
              "|---|" + "---|" * len(CAPTURE_OPS)]
    for key, r in res.items():
        if key == "none":
            continue
        cells = [fmt_capture(r["capture"][op]) for op in CAPTURE_OPS]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def versions_markdown(data: dict[str, Any]) -> str:
    lines = []
    for key, r in data["results"].items():
        v = dict(r["versions"])
        pg = v.pop("postgresql", "")
        lines.append(f"- {r['label']}: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    return "\n".join(lines) + f"\n- PostgreSQL {pg}\n"


def run_ingest(quick: bool) -> dict[str, Any] | None:
    """This project's worker benchmark (bench/ingest.py, built separately), run as is in
    this project's venv; its output goes into the doc verbatim."""
    script = os.path.join(HERE, "ingest.py")
    if not os.path.exists(script):
        log("bench/ingest.py is not in this checkout: no worker ingest rate in this run")
        return None
    # Its quick form when quick; never the 1,000,000-row memory workload (minutes of CPU on
    # a shared machine, and docs/benchmarks.md has it): the rates are what is compared here.
    args = ["--duration", "10", "--rss-rows", "0"] if quick else ["--rss-rows", "0"]
    command = "python3 bench/ingest.py " + " ".join(args)
    log(f"running {command}")
    python = os.path.join(VENVS, "bemi", "bin", "python")
    try:
        out = subprocess.run([python, script, *args], capture_output=True, text=True, timeout=900, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"command": command.strip(), "error": "timed out after 900 s"}
    if out.returncode:
        return {"command": command.strip(), "error": f"exit {out.returncode}: {out.stderr.strip()[-800:]}"}
    return {"command": command.strip(), "output": out.stdout}


def plot(data: dict[str, Any], path: str) -> None:
    python = ensure_venv("plot", PLOT_REQUIREMENTS)
    src = os.path.join(PROJECT, "plot.py")
    subprocess.run([python, src, path], input=json.dumps(data), text=True, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and 3 rounds (a smoke test)")
    parser.add_argument("--rounds", type=int, help="override the number of timed rounds")
    parser.add_argument("--only", help="comma-separated alternative keys (default: all)")
    parser.add_argument("--json", default=os.path.join(REPO, ".bench", "compare.json"), help="raw results")
    parser.add_argument("--doc", help="markdown to write (default docs/compare.md on full runs only)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--bemi-src", help="measure this project from another source tree (default: this checkout)")
    parser.add_argument("--no-ingest", action="store_true", help="skip this project's worker benchmark")
    parser.add_argument("--reuse", action="store_true",
                        help="no new measurements: re-render the doc and chart from --json (re-runs bench/ingest.py)")
    args = parser.parse_args()

    sizes = dict(QUICK if args.quick else FULL)
    if args.rounds:
        sizes["rounds"] = args.rounds
    alts = ALTERNATIVES
    if args.bemi_src:  # e.g. another checkout or branch of this project
        alts[1].requirements = ["-e", os.path.abspath(args.bemi_src)]
        alts[1].label += f" at {args.bemi_src}"
    if args.only:
        keys = args.only.split(",")
        alts = [a for a in ALTERNATIVES if a.key in keys]
    if args.reuse:  # re-render (and re-run bench/ingest.py) without measuring again
        with open(args.json) as fh:
            data = json.load(fh)
    else:
        for alt in alts:
            ensure_venv(alt.key, COMMON + alt.requirements)
        started = time.time()
        at_start = machine()
        data = run(sizes, alts)
        data["machine"] = {**at_start, "loadavg_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        data.update(
            command="python3 bench/compare.py" + (" --quick" if args.quick else "")
            + (f" --rounds {args.rounds}" if args.rounds else ""),
            seconds=round(time.time() - started),
            date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        )
    if "bemi" in data["results"] and not args.no_ingest:
        ensure_venv("bemi", COMMON + ALTERNATIVES[1].requirements)
        data["ingest"] = run_ingest("--quick" in data["command"])
        if data["ingest"]:
            data["ingest"]["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            print(data["ingest"].get("output") or data["ingest"].get("error"))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(data, fh, indent=1)
    print(tables_markdown(data))
    print(versions_markdown(data))
    log(f"raw results in {args.json}; the measurements took {data['seconds']} s")

    partial = "--quick" in data["command"] or args.only
    doc = args.doc or (None if partial else os.path.join(REPO, "docs", "compare.md"))
    if doc:
        os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
        image = os.path.join(os.path.dirname(doc), "compare.png")
        if not args.no_plot:
            plot(data, image)
        from compare_project.report import write_doc  # noqa: E402  (keeps this file about running)

        write_doc(doc, data, tables_markdown(data), versions_markdown(data))
        log(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
