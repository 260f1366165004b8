"""Scale-out benchmark: the NATS JetStream path against the direct mode, in one run (docs/scale-out.md).

    python bench/nats.py                    # 200,000 changes, 5 runs each, 20 s of steady load (about 4 minutes)
    python bench/nats.py --rows 50000 --duration 5 --repeats 3

Starts its own nats-server and two PostgreSQL clusters (bemi_devtools): the
source, and the destination of ``changes`` (so that storing writes no WAL the
next configuration's slot must read past). One
workload (transactions of --tx-rows rows, each with a context message, as the
Django wrapper sends) is written once; copies of one replication slot at the
same position let every configuration read the same WAL:

* direct: ``bemi-worker --once`` (decode, stitch, store, chain) into ``changes``;
* reader alone: ``bemi-worker --once --publish`` (decode, stitch, chain, publish);
* 1 and 2 ingesters: ``bemi-worker ingest --once`` storing the whole stream;
* pipeline, 1 and 2 ingesters: the reader and the ingesters at the same time,
  from start to the last change visible in ``changes``;
* latency: a steady --rate tx/s (one row each) with a reader and one ingester
  running: commit-to-visible p50/p99 (source commit timestamp to destination
  commit timestamp, both from track_commit_timestamp on the same server).

Ratios are against the direct mode of the same run; the direct mode and the
ingesters are run --repeats times, alternated, and their medians compared. Each
wall time includes the process's start-up (an empty run's is printed, to judge
it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psycopg  # noqa: E402

from bemi_devtools.natsserver import NatsServer  # noqa: E402
from bemi_devtools.pgcluster import Cluster  # noqa: E402
from ingest import CONTEXT, p50_p99, steady_writes  # noqa: E402  (bench/ingest.py: the same context and load)

class Bench:
    def __init__(self, cluster: Cluster, destination: Cluster, nats: NatsServer) -> None:
        self.cluster = cluster
        self.nats = nats
        self.dsn = cluster.dsn()
        self.dest_dsn = destination.dsn()
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        self.dest = psycopg.connect(self.dest_dsn, autocommit=True)

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "bemi.cli", *args]

    def reader(self, slot: str, stream: str, once: bool = True) -> list[str]:
        return self.cli("--dsn", self.dsn, "--slot", slot, "--publication", "bemi", "--verbosity", "0",
                        "--destination-dsn", self.dest_dsn, "--publish", self.nats.url, "--stream", stream, "--subject-prefix", stream.lower(),
                        *(["--once"] if once else []))

    def ingester(self, stream: str, consumer: str, once: bool = True) -> list[str]:
        return self.cli("ingest", "--from", self.nats.url, "--dsn", self.dest_dsn, "--stream", stream,
                        "--subject-prefix", stream.lower(), "--consumer", consumer, "--verbosity", "0",
                        *(["--once"] if once else []))

    def count(self) -> int:
        return self.dest.execute("SELECT count(*) FROM bemi.changes").fetchone()[0]

    def timed(self, *commands: list[str]) -> float:
        started = time.perf_counter()
        procs = [subprocess.Popen(c, cwd=ROOT) for c in commands]
        for p in procs:
            assert p.wait() == 0, p.args
        return time.perf_counter() - started

    def prepare(self, rows: int, tx_rows: int, slots: list[str]) -> None:
        c = self.conn
        c.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text NOT NULL, is_completed bool NOT NULL)")
        c.execute("ALTER TABLE todo REPLICA IDENTITY FULL")
        subprocess.run(self.direct(slots[0]), check=True, cwd=ROOT)
        for slot in slots[1:]:
            c.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", [slots[0], slot])
        cur = c.cursor()
        for start in range(0, rows, tx_rows):
            n = min(tx_rows, rows - start)
            cur.execute("BEGIN; " + CONTEXT + f"; INSERT INTO todo (task, is_completed) SELECT 'task ' || g, "
                        f"g % 2 = 0 FROM generate_series({start + 1}, {start + n}) g; COMMIT")
        c.execute("CHECKPOINT")

    def direct(self, slot: str) -> list[str]:
        return self.cli("--dsn", self.dsn, "--destination-dsn", self.dest_dsn, "--slot", slot, "--publication",
                        "bemi", "--once", "--verbosity", "0")

    def truncate(self) -> None:
        self.dest.execute("TRUNCATE bemi.changes")
        self.dest.execute("TRUNCATE bemi._bemi_chain_cuts")

    def wait_count(self, target: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.count()} of {target} changes arrived")
            time.sleep(0.02)

    def pipeline(self, slot: str, stream: str, ingesters: int, rows: int) -> float:
        self.truncate()
        started = time.perf_counter()
        procs = [subprocess.Popen(self.reader(slot, stream), cwd=ROOT)]
        procs += [subprocess.Popen(self.ingester(stream, "pipe", once=False), cwd=ROOT) for _ in range(ingesters)]
        self.wait_count(rows)
        elapsed = time.perf_counter() - started
        for p in procs:
            p.terminate()
            p.wait(120)
        assert self.count() == rows
        return elapsed

    def steady(self, slot: str, stream: str, rate: int, seconds: float) -> tuple[int, float, float, float, float]:
        self.truncate()
        self.conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
        procs = [subprocess.Popen(self.reader(slot, stream, once=False), cwd=ROOT),
                 subprocess.Popen(self.ingester(stream, "steady", once=False), cwd=ROOT)]
        time.sleep(2.0)  # both set up
        before = self.count()
        sent, achieved = steady_writes(self.dsn, rate, seconds, "s")
        self.wait_count(before + sent, timeout=120)
        for p in procs:
            p.terminate()
            p.wait(60)
        # Both clusters run on this machine: one clock.
        latencies = sorted(r[0] for r in self.dest.execute(
            "SELECT EXTRACT(epoch FROM pg_xact_commit_timestamp(xmin) - committed_at)::float8 * 1000 "
            "FROM bemi.changes WHERE after->>'task' LIKE 's%'").fetchall())
        p50, p99 = p50_p99(latencies)
        return sent, achieved, p50, p99, latencies[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="changes of the throughput workload")
    parser.add_argument("--tx-rows", type=int, default=100, help="rows per transaction (default 100)")
    parser.add_argument("--rate", type=int, default=500, help="transactions/s of the latency run (default 500)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of the latency run (0: skip)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the direct mode and of the ingesters "
                        "(median; default 5)")
    options = parser.parse_args()

    cluster = Cluster(settings={"track_commit_timestamp": "on", "max_wal_size": "4GB"}).start_throwaway()
    destination = Cluster(settings={"track_commit_timestamp": "on", "max_wal_size": "4GB"}).start_throwaway()
    nats = NatsServer().start()
    try:
        bench = Bench(cluster, destination, nats)
        print(f"PostgreSQL {bench.conn.execute('SHOW server_version').fetchone()[0]}, {os.cpu_count()} CPUs, "
              f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
              f"{subprocess.run([nats.binary, '--version'], capture_output=True, text=True).stdout.strip()}",
              flush=True)
        repeats = max(1, options.repeats)
        slots = ["direct0", "reader", "pipe1", "pipe2"] + [f"direct{i}" for i in range(1, repeats)]
        bench.prepare(options.rows, options.tx_rows, slots)
        rows = options.rows

        bench.conn.execute("SELECT pg_create_logical_replication_slot('empty', 'pgoutput')")
        t_empty_reader = bench.timed(bench.reader("empty", "EMPTY"))
        t_reader = bench.timed(bench.reader("reader", "READER"))
        # Alternated, each the median of --repeats runs (the machine is noisy; one run says little).
        runs: dict[str, list[float]] = {"direct": [], "one": [], "two": []}
        for i in range(repeats):
            bench.truncate()
            runs["direct"].append(bench.timed(bench.direct(f"direct{i}")))
            assert bench.count() == rows
            bench.truncate()
            runs["one"].append(bench.timed(bench.ingester("READER", f"one{i}")))
            assert bench.count() == rows
            bench.truncate()
            runs["two"].append(bench.timed(bench.ingester("READER", f"two{i}"), bench.ingester("READER", f"two{i}")))
            assert bench.count() == rows
        t_direct, t_ing1, t_ing2 = (statistics.median(runs[k]) for k in ("direct", "one", "two"))
        t_pipe1 = bench.pipeline("pipe1", "PIPE1", 1, rows)
        t_pipe2 = bench.pipeline("pipe2", "PIPE2", 2, rows)
        t_empty_ingest = bench.timed(bench.ingester("READER", "one0"))  # (drained)

        direct = rows / t_direct
        table = [("direct (bemi-worker --once)", t_direct),
                 ("reader alone (--publish --once)", t_reader),
                 ("1 ingester (ingest --once)", t_ing1),
                 ("2 ingesters (ingest --once x2)", t_ing2),
                 ("pipeline: reader + 1 ingester", t_pipe1),
                 ("pipeline: reader + 2 ingesters", t_pipe2)]
        print(f"\n{rows:,} changes ({options.tx_rows} rows per transaction); direct and ingesters: median of "
              f"{repeats} runs (direct {', '.join(f'{t:.2f}' for t in runs['direct'])} s; 1 ingester "
              f"{', '.join(f'{t:.2f}' for t in runs['one'])} s); start-up of an empty run: reader "
              f"{t_empty_reader:.2f} s, ingester {t_empty_ingest:.2f} s")
        print(f"| {'configuration':<34} | {'seconds':>7} | {'changes/s':>9} | {'vs direct':>9} |")
        print(f"| {'-' * 34} | {'-' * 7}:| {'-' * 9}:| {'-' * 9}:|")
        for name, seconds in table:
            print(f"| {name:<34} | {seconds:7.2f} | {rows / seconds:9,.0f} | {rows / seconds / direct:8.2f}x |")
        if options.duration:
            sent, achieved, p50, p99, top = bench.steady("steady", "STEADY", options.rate, options.duration)
            print(f"\nsteady through NATS (reader + 1 ingester): {sent} transactions in {options.duration:.0f} s "
                  f"({achieved:.0f} tx/s achieved); commit-to-visible p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
                  f"max {top:.0f} ms")
        print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    finally:
        nats.destroy()  # (the cluster is removed at exit: start_throwaway)


if __name__ == "__main__":
    main()
