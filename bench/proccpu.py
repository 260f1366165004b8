"""CPU time of the worker's server processes during a run: which process bounds a drain.

The worker's own CPU time comes from ``wait4``; its walsender and the backend
that COPies into ``changes`` are the cluster's processes, so their CPU time is
read from ``/proc/<pid>/stat`` (Linux, a cluster on this machine) every 10 ms
while the worker runs. A process that is busy for nearly the whole drain is
the bottleneck: the others wait for it.
"""

from __future__ import annotations

import os
import threading
import time

import psycopg

__all__ = ["ServerCpu"]

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (None: it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


class ServerCpu:
    """``with ServerCpu(dsn) as cpu: <run the worker>``; then ``cpu.seconds``: CPU seconds of its
    ``walsender``, its ``destination`` backend (the one that COPies into ``changes``) and its
    ``other`` connections; ``streaming``: seconds from the start until its walsender was seen
    streaming (its start-up, in this very run); ``first_copy``: to the first COPY seen (None: none
    seen). A process that exits between two samples loses up to 10 ms."""

    def __init__(self, dsn: str, application_name: str = "bemi-worker", interval: float = 0.01) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.interval = interval
        self._roles: dict[int, str] = {}
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-cpu", daemon=True)
        self._started = 0.0
        self.streaming: float | None = None
        self.first_copy: float | None = None

    def __enter__(self) -> "ServerCpu":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> dict[str, float]:
        totals = {"walsender": 0.0, "destination": 0.0, "other": 0.0}
        for pid, cpu in self._cpu.items():
            totals[self._roles.get(pid, "other")] += cpu
        return totals

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            tick = 0
            while not self._stop.is_set():
                # New processes, and what they run: every 10 ms until the first COPY (its time is
                # reported), then every 100 ms.
                if self.first_copy is None or tick % 10 == 0:
                    self._look(conn)
                tick += 1
                for pid in list(self._roles):
                    cpu = _cpu_seconds(pid)
                    if cpu is not None:
                        self._cpu[pid] = cpu
                self._stop.wait(self.interval)

    def _look(self, conn: psycopg.Connection) -> None:
        rows = conn.execute("SELECT pid, backend_type, coalesce(query, '') FROM pg_stat_activity "
                            "WHERE application_name = %s", [self.application_name]).fetchall()
        for pid, backend_type, query in rows:
            if backend_type == "walsender":
                self._roles[pid] = "walsender"
                if self.streaming is None and query.startswith("START_REPLICATION"):
                    self.streaming = time.monotonic() - self._started
            elif query.startswith("COPY bemi.changes"):
                self._roles[pid] = "destination"  # for good: it also runs the checkpoint and COMMIT
                if self.first_copy is None:
                    self.first_copy = time.monotonic() - self._started
            else:
                self._roles.setdefault(pid, "other")
