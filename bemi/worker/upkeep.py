"""Partition upkeep and retention between destination transactions (I/O).

One policy for the two processes that store changes: the worker (direct mode,
runner.py) and the NATS ingesters (ingest.py). Every ``maintenance_interval``
the current and next partitions are made and stray rows of ``changes_default``
moved; retention runs at most once per ``retention_interval``. Never fails its
caller: a problem is logged and tried again at the next interval (several
processes take turns through partitions.py's lock).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Callable

import psycopg

from bemi.worker.partitions import Partitions
from bemi.words import counted

__all__ = ["Upkeep"]

log = logging.getLogger("bemi.worker")


class Upkeep:
    def __init__(self, interval: str, retention: timedelta | None, maintenance_interval: float,
                 retention_interval: float, clock: Callable[[], datetime] | None = None,
                 by: str = "bemi-worker --retention") -> None:
        self.interval = interval
        self.retention = retention
        self.maintenance_interval = maintenance_interval
        self.retention_interval = retention_interval
        self.clock = clock
        self.by = by  # who pruned, in _bemi_pruned
        self._last_maintenance = 0.0
        self._last_retention: float | None = None

    def run(self, conn: psycopg.Connection, partitions: Partitions | None, force: bool = False,
            warn_unpartitioned: bool = False) -> Partitions | None:
        """Upkeep on the idle destination connection ``conn`` when due (always with ``force``); returns
        the partitions of ``changes`` (``partitions``, or made now), None while it is not partitioned."""
        now = time.monotonic()
        if not force and now - self._last_maintenance < self.maintenance_interval:
            return partitions
        self._last_maintenance = now
        try:
            if partitions is None:
                made = (Partitions(conn, self.interval, clock=self.clock) if self.clock
                        else Partitions(conn, self.interval))
                if not made.is_partitioned():
                    if force and warn_unpartitioned:
                        log.warning("table changes is not partitioned (made by an earlier version or the published "
                                    "worker): no partitions, no retention. Convert it with python manage.py "
                                    "bemi_partition (docs/retention.md)")
                    return None
                partitions = made
            partitions.maintain()
            if self.retention and (self._last_retention is None
                                   or now - self._last_retention >= self.retention_interval):
                self._last_retention = now
                cutoff = partitions.clock() - self.retention
                result = partitions.prune(cutoff, by=self.by, whole_only=True)
                if result.rows or result.dropped:
                    log.info("retention %s: removed %s committed before %s (dropped %s)", self.retention,
                             counted(result.rows, "change"), result.cutoff.isoformat(),
                             ", ".join(p.name for p in result.dropped) or "no whole partition")
        except psycopg.Error as exc:
            try:
                conn.rollback()
            except psycopg.Error:
                pass
            log.warning("partition maintenance failed, will retry: %s", str(exc).strip())
        return partitions
