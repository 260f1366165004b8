"""What a running worker counts and knows, for logs, metrics and health checks.

Pure (no I/O). The worker loop updates one ``WorkerStats``; the metrics
endpoint and ``/healthz`` read it from another thread. Every field is a plain
value replaced or incremented under the GIL, so readers need no lock.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["WorkerStats"]


@dataclass
class WorkerStats:
    #: Changes stored in ``changes``, by (table, operation); incremented at each destination commit.
    written: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Changes the destination rejected, stored in ``_bemi_worker_failures`` instead.
    dead_letters: int = 0
    #: ``_bemi`` messages dropped as invalid or oversized (the change is stored with ``{}``).
    dropped_contexts: int = 0
    #: Logical messages too malformed to read (skipped; nothing of theirs is stored).
    skipped_messages: int = 0
    #: Values their type's format could not read, stored as their text (a JSON string) instead.
    values_as_text: int = 0
    #: Reconnections after a lost source or destination connection.
    reconnects: int = 0
    #: True while the replication stream is open and being read.
    streaming: bool = False
    #: Why the worker waits for an operator (what another role made under bemi's names); "" when it does not.
    blocked: str = ""
    #: Position (LSN as int) and commit time of the last source transaction stored.
    last_commit_lsn: int = 0
    last_commit_time: datetime | None = None
    #: The last keepalive that found the worker with nothing pending: its WAL position, and when.
    #: Everything before it is handled, so the lag metrics count from there (bemi/worker/metrics.py).
    caught_up_lsn: int = 0
    caught_up_at: datetime | None = None
    #: The server's WAL end as last reported by the walsender (keepalive or XLogData), as int.
    server_wal_end: int = 0
    #: WAL the slot retains (``pg_current_wal_lsn() - restart_lsn``), refreshed from time to time.
    slot_retained_wal_bytes: int = 0
    #: ``time.monotonic()`` of the last message received from the server.
    last_message_at: float = field(default_factory=time.monotonic)
    #: "direct" (reads and stores), "reader" (--publish: reads and publishes to NATS JetStream) or
    #: "ingest" (stores from NATS JetStream); the NATS counters below are shown in the last two only.
    mode: str = "direct"
    #: Reader: changes JetStream acknowledged as stored, and as duplicates of a message id it had.
    nats_published: int = 0
    nats_publish_duplicates: int = 0
    #: Ingester: changes delivered again that were already stored (skipped).
    nats_ingest_duplicates: int = 0
    #: Ingester: the consumer's messages not delivered yet, and delivered but not acknowledged (last look).
    nats_consumer_pending: int = 0
    nats_consumer_ack_pending: int = 0

    @property
    def written_total(self) -> int:
        return sum(self.written.values())

    @property
    def lag_bytes(self) -> int:
        """WAL the server has that is not stored yet (0 when caught up)."""
        if not self.server_wal_end or not self.last_commit_lsn:
            return 0
        return max(self.server_wal_end - self.last_commit_lsn, 0)
