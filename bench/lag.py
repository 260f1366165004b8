"""Replication lag during a load run, as an operator sees it: draws docs/operations-lag.png.

    .venv/bin/python bench/lag.py            # about 2 minutes; writes .bench/lag.json and docs/operations-lag.png
    .venv/bin/python bench/lag.py --no-plot  # numbers only

Starts its own PostgreSQL cluster (bemi_devtools/pgcluster.py) and a worker with
``--metrics-port``, then drives a scripted load through five phases:

1. steady: ``--rate`` single-row transactions per second, each with a context message;
2. burst: one 200,000-row transaction on top of the steady load (until the worker has stored it);
3. outage: the worker is stopped (SIGTERM) while the steady load goes on;
4. recovery: the worker is started again and catches up;
5. idle: no load.

Twice a second it scrapes ``/metrics`` (while the worker runs) and reads
``bemi.status.collect()`` (always): lag in bytes and seconds, WAL the slot
retains, changes stored per second. It prints the peak lag of each phase and
how long the restarted worker took to catch up. The chart is drawn by
``lag_plot.py`` in the bench-only ``plot`` venv (matplotlib), as for
docs/compare.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import psycopg  # noqa: E402

from bemi import status as bemi_status  # noqa: E402
from bemi_devtools.pgcluster import Cluster, free_port  # noqa: E402

CONTEXT = "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 1, \"path\": \"/todos/\"}')"
SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def log(msg: str) -> None:
    print(f"[lag {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def scrape(port: int) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            name = match[1]
            out[name] = out.get(name, 0.0) + float(match[3])  # sums the labelled counter
    return out


class Run:
    def __init__(self, cluster: Cluster, rate: int, port: int) -> None:
        self.dsn = cluster.dsn()
        self.rate = rate
        self.port = port
        self.worker: subprocess.Popen | None = None
        self.samples: list[dict] = []
        self.phases: list[tuple[str, float]] = []
        self.started = time.monotonic()
        self.stop_sampling = threading.Event()
        self.stop_load = threading.Event()

    def start_worker(self) -> None:
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "bemi.cli", "--dsn", self.dsn, "--metrics-port", str(self.port), "-v", "0"],
            cwd=ROOT)

    def stop_worker(self) -> None:
        assert self.worker is not None
        self.worker.terminate()
        self.worker.wait(120)
        self.worker = None

    def phase(self, name: str) -> None:
        log(name)
        self.phases.append((name, time.monotonic() - self.started))

    def sample_loop(self) -> None:
        conn = bemi_status.connect(self.dsn)
        try:
            while not self.stop_sampling.is_set():
                t = time.monotonic() - self.started
                s = bemi_status.collect(conn, max_retained_bytes=0)
                metrics = scrape(self.port) if self.worker is not None else None
                stored = conn.execute("SELECT coalesce(sum(changes), 0)::int8 FROM bemi._bemi_worker_checkpoints"
                                      ).fetchone()[0] if s.checkpoint else 0
                self.samples.append({
                    "t": round(t, 2),
                    "worker_up": metrics is not None,
                    "lag_bytes": s.lag_bytes,
                    # the worker's own gauge while it runs; the status' peek at the slot while it does not
                    "lag_seconds": metrics["bemi_replication_lag_seconds"] if metrics else s.lag_seconds,
                    "retained_wal_bytes": s.slot.retained_wal_bytes,
                    "stored": stored,
                })
                self.stop_sampling.wait(0.5)
        finally:
            conn.close()

    def load_loop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.cursor()
            sent, begun = 0, time.perf_counter()
            while not self.stop_load.is_set():
                due = begun + sent / self.rate
                now = time.perf_counter()
                if now < due:
                    time.sleep(due - now)
                cur.execute("BEGIN; " + CONTEXT + f"; INSERT INTO todo (task) VALUES ('t{sent}'); COMMIT")
                sent += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=200, help="steady transactions/s (default 200)")
    parser.add_argument("--burst-rows", type=int, default=200_000, help="rows of the burst transaction")
    parser.add_argument("--phase", type=float, default=20.0, help="seconds per phase (default 20)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "operations-lag.png"))
    parser.add_argument("--no-plot", action="store_true")
    options = parser.parse_args()

    cluster = Cluster(settings={"max_wal_size": "4GB", "synchronous_commit": "on"}).start_throwaway()
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text, done boolean DEFAULT false)")
        version = conn.execute("SHOW server_version").fetchone()[0]
    run = Run(cluster, options.rate, free_port())
    run.start_worker()
    time.sleep(2)  # first start: publication, slot, changes table
    sampler = threading.Thread(target=run.sample_loop, daemon=True)
    loader = threading.Thread(target=run.load_loop, daemon=True)
    p = options.phase

    run.phase("steady load")
    sampler.start()
    loader.start()
    time.sleep(p)
    run.phase("burst")
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"INSERT INTO todo (task) SELECT 'burst ' || g FROM generate_series(1, {options.burst_rows}) g")
    time.sleep(p / 2)
    deadline = time.monotonic() + 120  # let it store the burst first, so that the stop is immediate
    while time.monotonic() < deadline and not (run.samples and run.samples[-1]["worker_up"]
                                               and (run.samples[-1]["lag_bytes"] or 0) < 1024 ** 2):
        time.sleep(0.5)
    run.phase("worker stopped")
    run.stop_worker()
    time.sleep(p)
    run.phase("worker restarted")
    run.start_worker()
    time.sleep(p)
    run.phase("idle")
    run.stop_load.set()
    loader.join()
    time.sleep(p / 2)
    run.stop_sampling.set()
    sampler.join()
    run.stop_worker()

    bounds = [t for _, t in run.phases] + [run.samples[-1]["t"]]
    summary = []
    for (name, start), end in zip(run.phases, bounds[1:]):
        inside = [s for s in run.samples if start <= s["t"] < end]
        lag_s = max((s["lag_seconds"] or 0) for s in inside) if inside else 0
        lag_b = max((s["lag_bytes"] or 0) for s in inside) if inside else 0
        retained = max((s["retained_wal_bytes"] or 0) for s in inside) if inside else 0
        summary.append({"phase": name, "max_lag_seconds": lag_s, "max_lag_bytes": lag_b,
                        "max_retained_wal_bytes": retained})
        print(f"{name:18} max lag {lag_s:6.1f} s, {lag_b / 1e6:7.1f} MB; max retained WAL {retained / 1e6:7.1f} MB")
    restart = dict(run.phases)["worker restarted"]
    caught = next((s["t"] - restart for s in run.samples if s["t"] > restart and s["worker_up"]
                   and (s["lag_seconds"] or 0) < 1 and (s["lag_bytes"] or 0) < 1024 ** 2), None)
    print(f"restarted worker caught up (lag under 1 s and 1 MB) after {caught:.1f} s" if caught is not None
          else "restarted worker did not catch up within the phase")
    data = {"date": time.strftime("%Y-%m-%d"), "postgres": version, "nproc": os.cpu_count(), "rate": options.rate,
            "burst_rows": options.burst_rows, "phases": run.phases, "samples": run.samples, "summary": summary,
            "caught_up_after": caught}
    os.makedirs(os.path.join(ROOT, ".bench"), exist_ok=True)
    raw = os.path.join(ROOT, ".bench", "lag.json")
    with open(raw, "w") as fh:
        json.dump(data, fh)
    if not options.no_plot:
        from compare import PLOT_REQUIREMENTS, ensure_venv

        python = ensure_venv("plot", PLOT_REQUIREMENTS)
        with open(raw) as fh:
            subprocess.run([python, os.path.join(HERE, "lag_plot.py"), options.out], stdin=fh, check=True)
        log(f"wrote {options.out}")


if __name__ == "__main__":
    main()
