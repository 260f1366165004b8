"""Worker ingest benchmark: the bemi worker end to end against pg_recvlogical.

    python bench/ingest.py                 # full run (about 5 minutes)
    python bench/ingest.py --duration 10   # quick run: 10 s of steady load

Starts its own PostgreSQL cluster. For each bulk workload, two pgoutput slots
are created at the same WAL position on the same publication, the workload
runs, then:

* ``pg_recvlogical`` decodes its slot to /dev/null (the floor: decoding only; protocol
  version 2 with streaming, as the worker asks);
* the worker drains its slot: decode, stitch with the context, write into
  ``changes`` with all its indexes, checkpoint, advance.

Workloads: 100,000 rows in one transaction; 20,000 single-row transactions
(each with a context message, as the Django wrapper sends); a steady 500
transactions/s for --duration seconds with the worker running, measuring
commit-to-visible latency (source commit timestamp to destination commit
timestamp, both from track_commit_timestamp on the same server); single-row
writes right after a 300,000-row transaction, with the worker running
(commit-to-visible of each); the peak RSS of the worker process while it ingests
one 1,000,000-row transaction; and a fault run: steady load while the worker's
walsender and its other connections are killed and the server is restarted,
reporting changes lost and doubled (both must be 0) and the longest gap.

For the bulk workloads it also reports the CPU time of the worker, its
walsender and the destination backend during the drain (bench/proccpu.py):
the busiest of them, or all three shared out over the machine's cores, is the
least time the drain can take, so ceiling / that is the most the worker could
reach without one of them using less CPU. And when the destination began to
COPY: that time after the start-up plus the destination's CPU is what the
drain would take if the destination never waited for the worker.

"Without the start-up" takes off each run's own start-up: the time until its
walsender was seen streaming. The start-up of an empty ``--once`` (the median
of three, measured apart) is reported too: that is the start-up target, but
apart it once measured 1.2 s against 0.3 s in the runs, which made a net
figure of a 1 s drain meaningless.
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

from bemi.worker.sink import COPY_CHANGES  # noqa: E402
from bemi_devtools.pgcluster import Cluster  # noqa: E402
from proccpu import ServerCpu  # noqa: E402

CONTEXT = ("SELECT pg_logical_emit_message(true, '_bemi', "
           "'{\"user_id\": 187234, \"endpoint\": \"/todo\", \"method\": \"POST\", "
           "\"SQL\": \"INSERT INTO \\\"todo\\\" (\\\"task\\\", \\\"is_completed\\\") VALUES (%s, %s)\"}')")


#: The columns the worker COPies, in its order.
COPY_COLUMNS = COPY_CHANGES[COPY_CHANGES.index("(") + 1:COPY_CHANGES.rindex(")")]


def worker_cmd(dsn: str, slot: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "bemi.cli", "--dsn", dsn, "--slot", slot, "--publication", "bemi",
            "--verbosity", "0", *args]


def worker_env(root: str) -> dict[str, str]:
    """The environment of a worker run from the checkout ``root`` (its ``bemi`` package first)."""
    return {**os.environ, "PYTHONPATH": root}


def steady_writes(dsn: str, rate: int, seconds: float, tag: str) -> tuple[int, float]:
    """One-row transactions, each with a context, at ``rate`` per second for ``seconds`` (tasks ``<tag><n>``):
    (transactions sent, rate achieved)."""
    sent = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        started = time.perf_counter()
        interval = 1.0 / rate
        while True:
            now = time.perf_counter()
            if now - started >= seconds:
                break
            due = started + sent * interval
            if now < due:
                time.sleep(due - now)
            cur.execute("BEGIN; " + CONTEXT + f"; INSERT INTO todo (task, is_completed) VALUES ('{tag}{sent}', false); "
                        "COMMIT")
            sent += 1
        return sent, sent / (time.perf_counter() - started)


def without_startup(total_s: float, startup_s: float) -> float | None:
    """``total_s`` less the start-up, or None when the start-up takes nine tenths of it or more: no
    figure rather than a wild one (a start-up measured apart once took 1.2 s against 0.3 s in the runs)."""
    net = total_s - startup_s
    return net if net >= 0.1 * total_s else None


def times(ratio: float | None) -> str:
    return "not measurable" if ratio is None else f"{ratio:.2f}x"


def p50_p99(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Bench:
    def __init__(self, cluster: Cluster, baseline: str | None = None) -> None:
        self.cluster = cluster
        self.baseline = baseline  # another checkout whose worker drains a third slot (same WAL)
        self.dsn = cluster.dsn()
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        self.n = 0

    def reset(self) -> None:
        c = self.conn
        for (slot,) in c.execute("SELECT slot_name FROM pg_replication_slots").fetchall():
            c.execute("SELECT pg_drop_replication_slot(%s)", [slot])
        c.execute("DROP TABLE IF EXISTS todo, bemi.changes, bemi._bemi_worker_checkpoints, bemi._bemi_worker_failures, "
                  "changes_stage, changes_ceiling, bemi._bemi_chain_cuts, bemi._bemi_pruned")
        c.execute("DROP PUBLICATION IF EXISTS bemi")
        c.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text NOT NULL, is_completed bool NOT NULL)")
        c.execute("ALTER TABLE todo REPLICA IDENTITY FULL")
        c.execute("CHECKPOINT")

    def setup_slots(self) -> tuple[str, str]:
        """The worker's slot (created by a first --once run) and pg_recvlogical's, at the same position
        (and the baseline worker's, a copy of the worker's, with --baseline)."""
        self.n += 1
        slot, recv = f"bemi{self.n}", f"recv{self.n}"
        subprocess.run(worker_cmd(self.dsn, slot, "--once"), check=True, cwd=ROOT)
        self.conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [recv])
        if self.baseline:
            self.conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", [slot, f"base{self.n}"])
        return slot, recv

    def recvlogical(self, slot: str) -> float:
        end = self.conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        args = [os.path.join(self.cluster.bindir, "pg_recvlogical"), "-h", self.cluster.host,
                "-p", str(self.cluster.port), "-U", self.cluster.user, "-d", "postgres", "--slot", slot,
                "--start", "--endpos", end, "--no-loop", "-f", "/dev/null",
                "-o", "proto_version=2", "-o", "streaming=on", "-o", "publication_names=bemi", "-o", "messages=true"]
        started = time.perf_counter()
        subprocess.run(args, check=True)
        return time.perf_counter() - started

    def worker_once(self, slot: str, root: str = ROOT) -> tuple[float, int, int, float]:
        """Wall time, changes written, peak RSS (kB) and CPU time (user + system, s) of one
        `bemi-worker --once` process."""
        before = self.conn.execute("SELECT count(*) FROM bemi.changes").fetchone()[0]
        started = time.perf_counter()
        proc = subprocess.Popen(worker_cmd(self.dsn, slot, "--once"), cwd=root, env=worker_env(root))
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, proc.returncode
        after = self.conn.execute("SELECT count(*) FROM bemi.changes").fetchone()[0]
        return elapsed, after - before, usage.ru_maxrss, usage.ru_utime + usage.ru_stime

    def bulk(self, name: str, load, repeats: int = 1) -> dict:
        """One workload ``repeats`` times (from a fresh table and slots each time): each run's worker
        against its own ceiling and pg_recvlogical, the medians reported (one run varies by 20 % here)."""
        runs = [self._bulk_once(load) for _ in range(max(1, repeats))]
        startup_s, startup_cpu = self.startup(runs[-1]["slot"])
        median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        (written, worker_s, recv_s, ceiling_s, cpu_s, copy_s, walsender_cpu, destination_cpu,
         first_copy_s) = (median(k) for k in ("written", "worker_s", "recv_s", "ceiling_s", "cpu_s", "copy_s",
                                              "walsender_cpu_s", "destination_cpu_s", "first_copy_s"))
        rss = max(r["rss"] for r in runs)
        ratio = statistics.median(r["ceiling_s"] / r["worker_s"] for r in runs)
        # Each run's own start-up (until its walsender streamed); the empty --once if it was not seen.
        startups = [startup_s if r["streaming_s"] is None else r["streaming_s"] for r in runs]
        run_startup_s = statistics.median(startups)
        nets = [without_startup(r["worker_s"], up) for r, up in zip(runs, startups)]
        ratio_net = statistics.median(r["ceiling_s"] / n for r, n in zip(runs, nets)) if None not in nets else None
        net_s = without_startup(worker_s, run_startup_s)
        base: dict = {}
        if self.baseline:
            base_s, base_cpu = median("base_s"), median("base_cpu")
            base_startup_s, base_startup_cpu = self.startup(runs[-1]["base_slot"], self.baseline)
            base_net_s = without_startup(base_s, base_startup_s)
            base_ratio_net = ceiling_s / base_net_s if base_net_s else None
            base_net_cpu, net_cpu = without_startup(base_cpu, base_startup_cpu), without_startup(cpu_s, startup_cpu)
            print(f"{name}: baseline worker ({self.baseline}) {base_s:.2f} s, CPU {base_cpu:.2f} s, start-up "
                  f"{base_startup_s:.2f} s (CPU {base_startup_cpu:.2f} s); vs the ceiling {ceiling_s / base_s:.2f}x "
                  f"({times(base_ratio_net)} without the start-up); this worker vs the baseline "
                  f"{base_s / worker_s:.2f}x ({times(base_net_s / net_s if base_net_s and net_s else None)} "
                  "without the start-up; by CPU time "
                  f"{base_cpu / cpu_s:.2f}x, {times(base_net_cpu / net_cpu if base_net_cpu and net_cpu else None)} "
                  "without the start-up; it drains second, so its walsender also decodes this worker's write of "
                  "the rows, and spills it past its logical_decoding_work_mem: biased against the baseline)", flush=True)
            base = {"base_ceiling_ratio": ceiling_s / base_s, "base_ceiling_ratio_net": base_ratio_net,
                    "base_startup_s": base_startup_s, "base_cpu_s": base_cpu}
        result = {**base,
            "workload": name, "changes": written, "pg_recvlogical_s": recv_s, "worker_s": worker_s,
            "ceiling_ratio": ratio, "ceiling_ratio_net": ratio_net,
            "pg_recvlogical_rate": written / recv_s, "worker_rate": written / worker_s,
            "ratio": recv_s / worker_s, "worker_rss_mb": rss / 1024, "insert_ceiling_s": ceiling_s,
            "startup_s": startup_s, "cpu_s": cpu_s, "startup_cpu_s": startup_cpu, "copy_floor_s": copy_s,
            "walsender_cpu_s": walsender_cpu, "destination_cpu_s": destination_cpu,
        }
        runs_text = "; ".join(f"{r['worker_s']:.2f} / {r['ceiling_s']:.2f}" for r in runs)
        print(f"{name}: {written:,} changes; median of {len(runs)} run(s) (worker / ceiling s: {runs_text}): "
              f"pg_recvlogical {recv_s:.2f} s ({written / recv_s:,.0f}/s); "
              f"worker {worker_s:.2f} s ({written / worker_s:,.0f}/s); ratio {recv_s / worker_s:.2f}x; "
              f"worker peak RSS {rss / 1024:.0f} MB; server-side INSERT of the same rows into an indexed "
              f"copy of changes alone {ceiling_s:.2f} s ({written / ceiling_s:,.0f}/s); worker start-up "
              f"(an empty --once) {startup_s:.2f} s, in these runs (until its walsender streamed) "
              f"{run_startup_s:.2f} s; worker vs that ceiling {ratio:.2f}x "
              f"({times(ratio_net)} without each run's start-up); worker CPU {cpu_s:.2f} s (start-up {startup_cpu:.2f} s); "
              f"PostgreSQL alone COPYing the same rows from a server-side file {copy_s:.2f} s "
              f"(the ceiling / that: {ceiling_s / copy_s:.2f}x, the most a COPYing worker can reach)",
              flush=True)
        worker_cpu = max(cpu_s - startup_cpu, 0.0)  # the start-up's CPU is measured apart: a tiny drain may go below
        busy = (worker_cpu, walsender_cpu, destination_cpu)
        bound_s = max(*busy, sum(busy) / (os.cpu_count() or 1))
        before_copy_s = max(first_copy_s - run_startup_s, 0.0)  # decoding until rows could be stored
        bound_ratio = ceiling_s / bound_s if bound_s > 0 else None
        result.update(cpu_bound_ratio=bound_ratio, run_startup_s=run_startup_s)
        if net_s is None:
            print(f"{name}: the start-up ({run_startup_s:.2f} s) took about as long as the drain ({worker_s:.2f} s): "
                  "where the time went is not measurable in this run", flush=True)
            return result
        print(f"{name}: where the {net_s:.2f} s without the start-up went (CPU seconds, medians): the worker "
              f"{worker_cpu:.2f} s ({worker_cpu / net_s:.0%}), its walsender {walsender_cpu:.2f} s "
              f"({walsender_cpu / net_s:.0%}), the destination's backend {destination_cpu:.2f} s "
              f"({destination_cpu / net_s:.0%}); {bound_s:.2f} s at least on {os.cpu_count()} cores (the busiest "
              f"of them, or all three shared out): the ceiling / that = {times(bound_ratio)}, the most "
              "this worker could reach without using less CPU in one of them", flush=True)
        print(f"{name}: the destination began to COPY {first_copy_s:.2f} s after the worker started ({before_copy_s:.2f} s "
              f"after its start-up): with the destination's CPU after that, {before_copy_s + destination_cpu:.2f} s "
              f"of the {net_s:.2f} s drain ({(before_copy_s + destination_cpu) / net_s:.0%})", flush=True)
        return result

    def _bulk_once(self, load) -> dict:
        self.reset()
        slot, recv = self.setup_slots()
        load()
        changes = self.conn.execute("SELECT count(*) FROM todo").fetchone()[0]
        recv_s = self.recvlogical(recv)
        with ServerCpu(self.dsn) as server:
            worker_s, written, rss, cpu_s = self.worker_once(slot)
        assert written == changes, (written, changes)
        ceiling_s = self.insert_ceiling()
        copy_s = self.copy_floor()
        run = {"slot": slot, "written": written, "worker_s": worker_s, "rss": rss, "cpu_s": cpu_s,
               "recv_s": recv_s, "ceiling_s": ceiling_s, "copy_s": copy_s,
               "walsender_cpu_s": server.seconds["walsender"], "destination_cpu_s": server.seconds["destination"],
               "first_copy_s": server.first_copy if server.first_copy is not None else worker_s,
               "streaming_s": server.streaming}
        if self.baseline:
            self.conn.execute("TRUNCATE bemi.changes")  # its rows again (same identities)
            base_s, base_written, _rss, base_cpu = self.worker_once(f"base{self.n}", self.baseline)
            assert base_written == changes, (base_written, changes)
            run.update(base_s=base_s, base_cpu=base_cpu, base_slot=f"base{self.n}")
        return run

    def wait_streaming(self, timeout: float = 60) -> None:
        """Until the worker's walsender streams (the worker is set up)."""
        deadline = time.monotonic() + timeout
        while not self.conn.execute("SELECT 1 FROM pg_stat_replication WHERE application_name = 'bemi-worker' "
                                    "AND state = 'streaming'").fetchone():
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not start streaming")
            time.sleep(0.05)

    def startup(self, slot: str, root: str = ROOT) -> tuple[float, float]:
        """Median wall and CPU time of `bemi-worker --once` on an empty slot: the process start-up and setup."""
        times, cpu = [], []
        for _ in range(3):
            started = time.perf_counter()
            proc = subprocess.Popen(worker_cmd(self.dsn, slot, "--once"), cwd=root, env=worker_env(root))
            _, status, usage = os.wait4(proc.pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
            times.append(time.perf_counter() - started)
            cpu.append(usage.ru_utime + usage.ru_stime)
        return statistics.median(times), statistics.median(cpu)

    def copy_floor(self) -> float:
        """Seconds PostgreSQL alone needs to COPY (text, from a server-side file) the rows the worker wrote
        into a `changes` with the same indexes: what any worker that COPies them waits for at least (the
        jsonb, timestamps and numbers parsed from text, which the INSERT ... SELECT ceiling does not)."""
        c = self.conn
        path = f"/tmp/bemi_bench_{os.getpid()}.copy"
        c.execute("DROP TABLE IF EXISTS changes_floor")
        c.execute(f"COPY (SELECT {COPY_COLUMNS} FROM bemi.changes) TO '{path}'")
        c.execute("CREATE TABLE changes_floor (LIKE bemi.changes INCLUDING ALL)")
        started = time.perf_counter()
        c.execute(f"COPY changes_floor ({COPY_COLUMNS}) FROM '{path}'")
        elapsed = time.perf_counter() - started
        c.execute("DROP TABLE changes_floor")
        os.unlink(path)
        return elapsed

    def insert_ceiling(self) -> float:
        """Seconds PostgreSQL alone needs to insert the rows the worker wrote into a `changes` with the same
        indexes (INSERT ... SELECT on the server): the bound on any worker that writes this table."""
        c = self.conn
        c.execute("DROP TABLE IF EXISTS changes_stage, changes_ceiling")
        c.execute("CREATE TABLE changes_stage AS SELECT * FROM bemi.changes")
        c.execute("CREATE TABLE changes_ceiling (LIKE bemi.changes INCLUDING ALL)")
        started = time.perf_counter()
        c.execute("INSERT INTO changes_ceiling SELECT * FROM changes_stage")
        elapsed = time.perf_counter() - started
        c.execute("DROP TABLE changes_stage, changes_ceiling")
        return elapsed

    # -- workloads ---------------------------------------------------------------------------

    def one_big_transaction(self, rows: int):
        def load():
            with self.conn.transaction():
                self.conn.execute(CONTEXT)
                self.conn.execute("INSERT INTO todo (task, is_completed) "
                                  "SELECT 'task ' || g, g %% 2 = 0 FROM generate_series(1, %s) g", [rows])
        return load

    def single_row_transactions(self, count: int):
        def load():
            cur = self.conn.cursor()
            for i in range(count):  # one round trip per transaction: context message + row
                cur.execute("BEGIN; " + CONTEXT + f"; INSERT INTO todo (task, is_completed) "
                            f"VALUES ('task {i}', false); COMMIT")
        return load

    def steady(self, rate: int, seconds: float) -> dict:
        self.reset()
        slot, recv = self.setup_slots()
        self.conn.execute("SELECT pg_drop_replication_slot(%s)", [recv])
        worker = subprocess.Popen(worker_cmd(self.dsn, slot), cwd=ROOT)
        self.wait_streaming()
        sent, achieved = steady_writes(self.dsn, rate, seconds, "t")
        deadline = time.monotonic() + 60
        while self.conn.execute("SELECT count(*) FROM bemi.changes").fetchone()[0] < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        worker.terminate()
        worker.wait(60)
        latencies = [r[0] for r in self.conn.execute(
            "SELECT EXTRACT(epoch FROM pg_xact_commit_timestamp(xmin) - committed_at)::float8 * 1000 FROM bemi.changes"
        ).fetchall()]
        p50, p99 = p50_p99(latencies)
        latencies.sort()
        print(f"steady: {sent} transactions in {seconds:.0f} s ({achieved:.0f} tx/s achieved); commit-to-visible "
              f"latency p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {latencies[-1]:.0f} ms", flush=True)
        return {"workload": "steady", "sent": sent, "rate": achieved, "p50_ms": p50, "p99_ms": p99,
                "max_ms": latencies[-1]}


    def after_big_transaction(self, big_rows: int, singles: int = 40, interval: float = 0.05,
                              root: str = ROOT) -> dict:
        """With the worker (of checkout ``root``) running: one big transaction, then single-row writes
        right after it."""
        self.reset()
        slot, recv = self.setup_slots()
        self.conn.execute("SELECT pg_drop_replication_slot(%s)", [recv])
        worker = subprocess.Popen(worker_cmd(self.dsn, slot), cwd=root, env=worker_env(root))
        self.wait_streaming()
        self.one_big_transaction(big_rows)()
        big_done = time.perf_counter()
        while self.conn.execute("SELECT count(*) FROM bemi.changes").fetchone()[0] < big_rows:
            time.sleep(0.05)
        big_stored = time.perf_counter() - big_done
        cur = self.conn.cursor()
        for i in range(singles):
            cur.execute("BEGIN; " + CONTEXT + f"; INSERT INTO todo (task, is_completed) VALUES ('single {i}', true); "
                        "COMMIT")
            time.sleep(interval)
        deadline = time.monotonic() + 300
        while (self.conn.execute("SELECT count(*) FROM bemi.changes").fetchone()[0] < big_rows + singles
               and time.monotonic() - deadline < 0):
            time.sleep(0.1)
        all_visible = time.perf_counter() - big_done
        worker.terminate()
        worker.wait(60)
        in_order = [r[0] for r in self.conn.execute(
            "SELECT EXTRACT(epoch FROM pg_xact_commit_timestamp(xmin) - committed_at)::float8 * 1000 FROM bemi.changes "
            "WHERE after->>'task' LIKE 'single %' ORDER BY commit_position").fetchall()]
        latencies = sorted(in_order)
        who = "" if root == ROOT else f" (baseline worker {root})"
        print(f"single writes after a {big_rows:,}-row transaction{who} (worker running): {len(latencies)} one-row "
              f"transactions every {interval * 1000:.0f} ms; commit-to-visible of the first {in_order[0]:.0f} ms, "
              f"p50 {statistics.median(latencies):.0f} ms, max {latencies[-1]:.0f} ms (the big one stored "
              f"{big_stored:.1f} s after its commit; then the singles; all visible {all_visible:.1f} s after the "
              "big commit)", flush=True)
        return {"workload": "after_big", "first_ms": in_order[0], "p50_ms": statistics.median(latencies),
                "max_ms": latencies[-1]}

    def faults(self, rate: int = 200, seconds: float = 12.0) -> dict:
        """Steady load while the walsender and the worker's other connections are killed and the server
        restarts; every committed row must appear exactly once."""
        import threading

        self.reset()
        slot, recv = self.setup_slots()
        self.conn.execute("SELECT pg_drop_replication_slot(%s)", [recv])
        worker = subprocess.Popen(worker_cmd(self.dsn, slot), cwd=ROOT)
        self.wait_streaming()
        stop, done = threading.Event(), []

        def writer():
            conn, n = None, 1
            while not stop.is_set():
                try:
                    if conn is None:
                        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                        if conn.execute("SELECT 1 FROM todo WHERE task = %s", [f"f{n}"]).fetchone():
                            done.append(n)
                            n += 1
                    conn.execute("INSERT INTO todo (task, is_completed) VALUES (%s, false)", [f"f{n}"])
                    done.append(n)
                    n += 1
                    time.sleep(1 / rate)
                except psycopg.Error:
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(0.05)

        thread = threading.Thread(target=writer)
        thread.start()
        step = seconds / 4
        time.sleep(step)
        with psycopg.connect(self.dsn, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'bemi-worker' "
                      "AND backend_type = 'walsender'")
        time.sleep(step)
        with psycopg.connect(self.dsn, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'bemi-worker' "
                      "AND backend_type = 'client backend'")
        time.sleep(step)
        self.conn.close()
        self.cluster.stop("fast")
        self.cluster.start()
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        time.sleep(step)
        stop.set()
        thread.join()
        deadline = time.monotonic() + 120
        while (self.conn.execute("SELECT count(*) FROM bemi.changes").fetchone()[0] < len(done)
               and time.monotonic() < deadline):
            time.sleep(0.2)
        time.sleep(1.0)
        alive = worker.poll() is None
        worker.terminate()
        worker.wait(60)
        stored = [r[0] for r in self.conn.execute("SELECT after->>'task' FROM bemi.changes").fetchall()]
        expected = {f"f{i}" for i in done}
        lost = len(expected - set(stored))
        doubled = len(stored) - len(set(stored))
        gap = self.conn.execute(
            "SELECT max(EXTRACT(epoch FROM pg_xact_commit_timestamp(xmin) - committed_at))::float8 FROM bemi.changes"
        ).fetchone()[0]
        print(f"faults (walsender killed, destination/control connections killed, server restarted, under "
              f"{rate} tx/s): {len(done)} rows committed, {len(stored)} changes stored, lost {lost}, doubled "
              f"{doubled}; longest commit-to-visible {gap:.1f} s; same worker process still running: {alive}",
              flush=True)
        return {"workload": "faults", "lost": lost, "doubled": doubled, "longest_gap_s": gap, "alive": alive}
def masking(bench: Bench, rows: int, repeats: int) -> None:
    """Masked columns cost (docs/tracking.md): the same WAL drained by three workers, each on its own slot
    created at the same position: nothing masked; `todo.task` masked (a keyed digest per row); `todo.task`
    masked and `todo.is_completed` ignored. Median of `repeats` runs, drain order rotated."""
    variants = {
        "plain": ["--schemas", "public"],
        "masked": ["--schemas", "public", "--masked-columns", "todo.task", "--masking-key", "bench"],
        "masked+ignored": ["--schemas", "public", "--masked-columns", "todo.task", "--masking-key", "bench",
                           "--ignored-columns", "todo.is_completed"],
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        bench.reset()
        slots = {}
        for name, flags in variants.items():
            bench.n += 1
            slots[name] = f"mask{bench.n}"
            subprocess.run(worker_cmd(bench.dsn, slots[name], "--once", *flags), check=True, cwd=ROOT)
        bench.one_big_transaction(rows)()
        bench.conn.execute("UPDATE todo SET task = task || '!' WHERE id % 2 = 0")  # a masked column changes
        order = list(variants)[repeat % 3:] + list(variants)[:repeat % 3]
        for name in order:
            bench.conn.execute("TRUNCATE bemi.changes")
            started = time.perf_counter()
            subprocess.run(worker_cmd(bench.dsn, slots[name], "--once", *variants[name]), check=True, cwd=ROOT)
            times[name].append(time.perf_counter() - started)
            written = bench.conn.execute("SELECT count(*) FROM bemi.changes").fetchone()[0]
            assert written == rows + rows // 2, (name, written)
    base = statistics.median(times["plain"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"masking: {name}: {rows + rows // 2:,} changes ({rows:,} inserts, {rows // 2:,} updates) in "
              f"{median:.2f} s median of {repeats} ({(rows + rows // 2) / median:,.0f}/s); "
              f"ratio to plain {median / base:.3f}", flush=True)


def chain(bench: Bench, rows: int, small_tx: int, repeats: int, verify_rows: int) -> None:
    """The chain's cost (docs/security.md): the same WAL drained by two workers, each on its own slot created
    at the same position, with and without the chain (--no-chain, for this comparison only); median of
    `repeats` runs, drain order alternated. Both store into a database of their own: stored in the source,
    the first drain's write would be decoded again by the second (a bias of 150,000 rows). Then
    `bemi-worker verify` over `verify_rows` chained changes."""
    variants = {"chain": ["--schemas", "public"], "no chain": ["--schemas", "public", "--no-chain"]}
    workloads = {f"{rows:,} inserts + {rows // 2:,} updates in two transactions": bench.one_big_transaction(rows),
                 f"{small_tx:,} single-row transactions": bench.single_row_transactions(small_tx)}
    if not bench.conn.execute("SELECT 1 FROM pg_database WHERE datname = 'chain_destination'").fetchone():
        bench.conn.execute("CREATE DATABASE chain_destination")
    dest_dsn = bench.cluster.dsn("chain_destination")
    dest = psycopg.connect(dest_dsn, autocommit=True)
    dest.execute("DROP SCHEMA IF EXISTS bemi CASCADE")
    variants = {name: [*flags, "--destination-dsn", dest_dsn] for name, flags in variants.items()}
    for workload, load in workloads.items():
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}  # the worker's user + system time
        for repeat in range(repeats):
            bench.reset()
            slots = {}
            for name, flags in variants.items():
                bench.n += 1
                slots[name] = f"chain{bench.n}"
                subprocess.run(worker_cmd(bench.dsn, slots[name], "--once", *flags), check=True, cwd=ROOT)
            load()
            if "updates" in workload:
                bench.conn.execute("UPDATE todo SET task = task || '!' WHERE id % 2 = 0")
            expected = bench.conn.execute("SELECT count(*) FROM todo").fetchone()[0]
            expected += expected // 2 if "updates" in workload else 0
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                dest.execute("TRUNCATE bemi.changes")
                started = time.perf_counter()
                proc = subprocess.Popen(worker_cmd(bench.dsn, slots[name], "--once", *variants[name]), cwd=ROOT)
                _, status, usage = os.wait4(proc.pid, 0)
                times[name].append(time.perf_counter() - started)
                cpu[name].append(usage.ru_utime + usage.ru_stime)
                assert os.waitstatus_to_exitcode(status) == 0, status
                written = dest.execute("SELECT count(*) FROM bemi.changes").fetchone()[0]
                assert written == expected, (name, written, expected)
        base, base_cpu = statistics.median(times["no chain"]), statistics.median(cpu["no chain"])
        for name, values in times.items():
            median, median_cpu = statistics.median(values), statistics.median(cpu[name])
            print(f"chain: {workload}: {name}: {expected:,} changes in {median:.2f} s median of {repeats} "
                  f"({expected / median:,.0f}/s), worker CPU {median_cpu:.2f} s; throughput ratio to no chain "
                  f"{base / median:.3f}x (by the worker's CPU time {base_cpu / median_cpu:.3f}x)", flush=True)
    if verify_rows:
        bench.reset()
        slot, _recv = bench.setup_slots()
        bench.one_big_transaction(verify_rows)()
        _s, written, _rss, _cpu = bench.worker_once(slot)
        cmd = [sys.executable, "-m", "bemi.cli", "verify", "--dsn", bench.dsn]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        elapsed = time.perf_counter() - started
        assert proc.returncode == 0, proc.stdout + proc.stderr
        print(f"chain: bemi-worker verify over {written:,} changes: {elapsed:.1f} s ({written / elapsed:,.0f} "
              f"changes/s), exit {proc.returncode}: {proc.stdout.strip()[:120]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of steady load (default 60)")
    parser.add_argument("--rate", type=int, default=500, help="transactions/s of steady load (default 500)")
    parser.add_argument("--big-rows", type=int, default=100_000, help="rows of the one-transaction workload")
    parser.add_argument("--small-tx", type=int, default=20_000, help="single-row transactions")
    parser.add_argument("--bulk-repeats", type=int, default=3,
                        help="runs of the 100,000-row and single-row workloads, each against its own ceiling "
                             "(median; default 3)")
    parser.add_argument("--rss-rows", type=int, default=1_000_000, help="rows of the RSS workload (0: skip)")
    parser.add_argument("--after-big-rows", type=int, default=300_000,
                        help="rows of the big transaction before single writes (0: skip)")
    parser.add_argument("--faults", type=float, default=12.0, help="seconds of the fault run (0: skip)")
    parser.add_argument("--masking", action="store_true",
                        help="only the masked-columns comparison (plain / masked / masked+ignored, same WAL)")
    parser.add_argument("--masking-rows", type=int, default=100_000, help="rows of the masking comparison")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the masking comparison (median)")
    parser.add_argument("--baseline", metavar="CHECKOUT", default=None,
                        help="another checkout (e.g. `git worktree add /tmp/base main`) whose worker also drains "
                             "the bulk workloads, on a copy of the slot: before/after ratios in one run")
    parser.add_argument("--chain", action="store_true",
                        help="only the chain's cost (with / without, same WAL) and the speed of bemi-worker verify")
    parser.add_argument("--chain-rows", type=int, default=100_000, help="rows of the chain comparison")
    parser.add_argument("--verify-rows", type=int, default=1_000_000, help="changes verified (0: skip)")
    options = parser.parse_args()

    for root in filter(None, (ROOT, options.baseline)):
        # As installed: byte-compiled (with PYTHONDONTWRITEBYTECODE set, every start would compile bemi again).
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(root, "bemi")], check=True,
                       stdout=subprocess.DEVNULL)
    cluster = Cluster(settings={"track_commit_timestamp": "on", "max_wal_size": "4GB",
                                "synchronous_commit": "on"}).start_throwaway()
    bench = Bench(cluster, options.baseline and os.path.abspath(options.baseline))
    print(f"PostgreSQL {bench.conn.execute('SHOW server_version').fetchone()[0]}, {os.cpu_count()} CPUs; "
          f"python {sys.version.split()[0]}; psycopg {psycopg.__version__} ({psycopg.pq.__impl__})", flush=True)
    if options.masking:
        masking(bench, options.masking_rows, options.repeats)
        return
    if options.chain:
        chain(bench, options.chain_rows, options.small_tx, options.repeats, options.verify_rows)
        return
    loads = [os.getloadavg()[0]]
    big = bench.bulk(f"{options.big_rows:,} rows in one transaction", bench.one_big_transaction(options.big_rows),
                     options.bulk_repeats)
    small = bench.bulk(f"{options.small_tx:,} single-row transactions",
                       bench.single_row_transactions(options.small_tx), options.bulk_repeats)
    loads.append(os.getloadavg()[0])
    steady = bench.steady(options.rate, options.duration)
    loads.append(os.getloadavg()[0])
    after = base_after = None
    if options.after_big_rows:
        after = bench.after_big_transaction(options.after_big_rows)
        if bench.baseline:
            base_after = bench.after_big_transaction(options.after_big_rows, root=bench.baseline)
    faults = bench.faults(seconds=options.faults) if options.faults else None
    huge = None
    if options.rss_rows:
        huge = bench.bulk(f"{options.rss_rows:,} rows in one transaction (RSS)",
                          bench.one_big_transaction(options.rss_rows))
    loads.append(os.getloadavg()[0])
    summary(options, big, small, steady, after, base_after, faults, huge, loads)


def summary(options, big: dict, small: dict, steady: dict, after: dict | None, base_after: dict | None,
            faults: dict | None, huge: dict | None, loads: list[float]) -> None:
    """Issue 20's figures in one table (this run), against its targets; with --baseline, the baseline's too."""
    def bulk_text(r: dict, base: bool = False) -> str:
        k = "base_" if base else ""
        if k + "ceiling_ratio" not in r:
            return ""
        if base:
            details = f"the start-up of {r['base_startup_s']:.2f} s"
        else:  # each run's own start-up; the target is on the empty --once
            details = (f"each run's start-up, median {r['run_startup_s']:.2f} s; an empty --once "
                       f"{r['startup_s']:.2f} s; PostgreSQL's own COPY of the rows reaches "
                       f"{r['insert_ceiling_s'] / r['copy_floor_s']:.2f}x; the CPU the three processes used "
                       f"allows at most {times(r['cpu_bound_ratio'])}")
        return f"{r[k + 'ceiling_ratio']:.2f}x ({times(r[k + 'ceiling_ratio_net'])} without {details})"

    rows = [
        (f"{options.big_rows:,} rows, one transaction: worker / ceiling", bulk_text(big), bulk_text(big, True),
         ">= 0.7x without start-up; start-up <= 0.3 s"),
        (f"{options.small_tx:,} one-row transactions: worker / ceiling", bulk_text(small), bulk_text(small, True),
         ">= 0.5x without start-up"),
        (f"steady {options.rate} tx/s: commit to visible", f"p50 {steady['p50_ms']:.0f} ms, p99 "
         f"{steady['p99_ms']:.0f} ms", "", "p50 <= 3 ms, p99 <= 25 ms"),
    ]
    if after:
        rows.append((f"first single write after a {options.after_big_rows:,}-row transaction",
                     f"{after['first_ms']:.0f} ms (p50 of 40: {after['p50_ms']:.0f} ms)",
                     f"{base_after['first_ms']:.0f} ms (p50 {base_after['p50_ms']:.0f} ms)" if base_after else "",
                     "<= 100 ms"))
    if huge:
        rows.append((f"{options.rss_rows:,} rows, one transaction: worker / ceiling, peak RSS",
                     f"{huge['ceiling_ratio']:.2f}x ({times(huge['ceiling_ratio_net'])} without start-up), "
                     f"{huge['worker_rss_mb']:.0f} MB", bulk_text(huge, True), ">= 0.8x, <= 150 MB"))
    if faults:
        rows.append(("faults: lost / doubled", f"{faults['lost']} / {faults['doubled']}", "", "0 / 0"))
    print(f"\nSummary (load average {' -> '.join(f'{x:.1f}' for x in loads)} during the run):", flush=True)
    print("| figure | this worker | baseline | target |\n| --- | --- | --- | --- |")
    for figure, value, base, target in rows:
        print(f"| {figure} | {value} | {base or '-'} | {target} |")


if __name__ == "__main__":
    main()
