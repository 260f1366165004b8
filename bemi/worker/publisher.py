"""The reader's side of scale-out: publish stitched changes to JetStream instead of storing them (I/O).

``JetStreamSink`` takes the place of ``Sink`` in the worker loop (runner.py):
the loop reads, stitches, masks and batches exactly as in the direct mode, and
where the direct mode COPies rows and commits them with its checkpoint, this
publishes one message per change (bemi/worker/message.py) and, at a commit,
waits until JetStream acknowledged every one of them, then writes the reader's
checkpoint (commit position, chain head) to a key-value bucket of JetStream.
Only then does the loop confirm the slot.

Exactly once across restarts: commits at or before the checkpoint are skipped
(the slot may be behind it); those after it are published again with the same
message ids and the same bytes, so JetStream drops the copies it already has
(within the stream's duplicate window) and the ingesters' ``ON CONFLICT DO
NOTHING`` drops any later copy. The same bytes: the chain continues from the
checkpoint's head, and ``queued_at`` is, in this mode, the later of the commit
time and the time of the reader's previous checkpoint (kept in it). A reader
stopped between checkpoints (killed, or a fault) may have published changes
past its checkpoint under that checkpoint's time, and the next run may place
its checkpoints elsewhere: so at start it reads back what it published after
the checkpoint's stream sequence and gives those transactions the
``queued_at`` they were first published with. A change published again thus
carries the link it had the first time.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable

import psycopg

from bemi.chain import GENESIS, Chain, epoch_micros
from bemi.worker import message
from bemi.worker import pgoutput as po
from bemi.worker.jetstream import JetStream, StreamSettings
from bemi.worker.session import connect
from bemi.worker.shown import shown
from bemi.worker.sink import Checkpoint
from bemi.worker.stitch import ChangeRow

__all__ = ["JetStreamSink", "checkpoint_key"]

log = logging.getLogger("bemi.worker")
CHECKPOINT_VERSION = 1


def checkpoint_key(stream: str, source: str, slot: str) -> str:
    """The bucket key of a reader: its stream, source database (``sysid/oid``) and slot."""
    return ".".join((stream, source.replace("/", "."), slot))


class JetStreamSink:
    """What the worker loop needs of a sink, over JetStream (see Sink for the interface)."""

    stores_changes = False  # no ``changes`` here: no partitions, no takeover (the ingesters store)

    def __init__(self, settings: StreamSettings, source_dsn: str, slot: str, database: str, source: str,
                 chain: bool = True, window_bytes: int = 16 * 1024 * 1024, ack_timeout: float = 30.0,
                 stats: Any = None, max_message: int | None = None) -> None:
        self.settings = settings
        self.slot = slot
        self.database = database
        self.source = source
        self.key = checkpoint_key(settings.stream, source, slot)
        self.js = JetStream(settings, name=f"bemi-worker reader {database}", window_bytes=window_bytes,
                            ack_timeout=ack_timeout, stats=stats)
        # A session of the source database: bemi's own tables are registered there when an ingester
        # stores into this very database (runner.setup), never written here.
        try:
            self.conn = connect(source_dsn, "source")
        except BaseException:
            self.js.close()
            raise
        self.conn.autocommit = False
        self.in_transaction = False
        self.partitions = None
        self.pending: Counter[tuple[str, str]] = Counter()
        self.pending_dead = 0
        self.chain: Chain | None = None
        self._chained = chain
        self._committed_head = b""
        self._since: datetime | None = None  # time of the previous checkpoint (queued_at's floor)
        # queued_at of transactions (by commit position) published after the checkpoint by a run
        # that stopped before its next one, and the last of them
        self._replayed: dict[int, str] = {}
        self._replayed_through = 0
        self._doc_head = message.document_head(source, database)
        self._subjects: dict[tuple[str, str], str] = {}
        # Room for the subject and the headers: a change larger than this is published as a dead letter.
        self.max_message = min(self.js.max_payload, max_message or 1 << 62) - 4096
        self.published = 0  # messages handed to JetStream since start

    def describe(self) -> str:
        return f"NATS JetStream stream {self.settings.stream} at {self.settings.url}"

    def close(self) -> None:
        self.js.close()
        try:
            self.conn.close()
        except Exception:  # pragma: no cover
            pass

    def ensure_tables(self, before_commit: Callable[[psycopg.Connection], None] | None = None) -> None:
        self.js.ensure_stream()

    def checkpoint(self) -> Checkpoint | None:
        """The reader's checkpoint from the bucket, and the chain continued from its head."""
        value = self.js.read_checkpoint(self.key)
        head = GENESIS
        self._since = None
        found: Checkpoint | None = None
        if value is not None:
            if value.get("v") != CHECKPOINT_VERSION:
                raise ValueError(f"unknown checkpoint version in the NATS bucket: {value.get('v')!r}")
            found = Checkpoint(int(value["commit_lsn"]), int(value["end_lsn"]))
            if value.get("chain_head"):
                head = bytes.fromhex(value["chain_head"])
            self._since = datetime.fromisoformat(value["at"])
        self._replayed = {}
        if value is not None and isinstance(value.get("stream_seq"), int) and value["stream_seq"] > 0:
            self._replayed = self.js.queued_after(
                value["stream_seq"], f"{self.settings.prefix}.{message.subject_token(self.database)}.>", self.source)
            if self._replayed:
                log.info("%d transactions after the checkpoint were published before; published again as they were",
                         len(self._replayed))
        self._replayed_through = max(self._replayed, default=0)
        if self._chained:
            self.chain = Chain(head, self.database)
            self._committed_head = head
        return found

    def _subject(self, schema: str, table: str) -> str:
        subject = self._subjects.get((schema, table))
        if subject is None:
            if len(self._subjects) > 10_000:
                self._subjects.clear()
            subject = self._subjects[schema, table] = message.subject(
                self.settings.prefix, self.database, schema, table)
        return subject

    def write(self, rows: list[ChangeRow], queued_at: datetime) -> None:
        """Publish rows (acks are awaited at commit(); the window bounds the bytes in flight)."""
        if not rows:
            return
        self.in_transaction = True
        chain, since, source, head = self.chain, self._since, self.source, self._doc_head
        encode, subject_of, msg_id = message.encode, self._subject, message.message_id
        pending = self.pending
        out: list[tuple[str, bytes, str]] = []
        last_tx = -1
        queued_text, queued_us = "", 0
        limit = self.max_message
        replayed = self._replayed
        for r in rows:
            if r.commit_position != last_tx:  # (queued_at is per transaction)
                last_tx = r.commit_position
                first = replayed.get(r.commit_position) if replayed else None
                if first is not None:  # published before this run: the same queued_at
                    queued_text, queued_us = first, epoch_micros(datetime.fromisoformat(first))
                else:
                    queued = r.committed_at if since is None or since < r.committed_at else since
                    queued_text, queued_us = queued.isoformat(), epoch_micros(queued)
            mark = chain.head if chain is not None else b""
            link = None if chain is None else chain.append(
                r.schema, r.table, r.primary_key, r.operation, r.before, r.after, r.context, r.committed_at,
                queued_us, r.transaction_id, r.position, r.commit_position, r.change_index, r.canonical)
            data = encode(r, head, queued_text, link)
            if len(data) > limit:
                # Never stuck on a row any role could write: published as a dead letter (not chained).
                if chain is not None:
                    chain.reset(mark)
                log.error("dead letter: change %d of the transaction committed at %s (%s.%s) is %d bytes, more "
                          "than the NATS server takes (max_payload); published as a dead letter without its "
                          "values", r.change_index, po.int_to_lsn(r.commit_position), shown(r.schema),
                          shown(r.table), len(data))
                data = message.encode_too_large(r, head, queued_text, len(data), limit + 4096)
            out.append((subject_of(r.schema, r.table), data, msg_id(source, r.commit_position, r.change_index)))
            pending[r.table, r.operation] += 1
        self.js.publish(out)
        self.published += len(out)

    def write_careful(self, rows: list[ChangeRow], queued_at: datetime) -> list[tuple[ChangeRow, Exception]]:
        # JetStream rejects no change for its data (the ingesters keep the dead letters).
        self.write(rows, queued_at)
        return []

    def commit(self, last: po.Commit, xid: int | None, changes: int) -> Counter[tuple[str, str]]:
        """Wait for every ack, then store the checkpoint in the bucket (the slot is confirmed after)."""
        self.js.wait_acked()
        at = datetime.now(timezone.utc)
        head = self.chain.head if self.chain is not None else None
        self.js.write_checkpoint(self.key, {
            "v": CHECKPOINT_VERSION, "source": self.source, "slot": self.slot, "database": self.database,
            "commit_lsn": last.commit_lsn, "end_lsn": last.end_lsn, "transaction_id": xid,
            "committed_at": last.commit_time.isoformat(), "chain_head": head.hex() if head else None,
            "at": at.isoformat(), "stream_seq": self.js.acked_seq})
        self._since = at
        if self._replayed and last.commit_lsn >= self._replayed_through:
            self._replayed = {}
        if self.chain is not None:
            self._committed_head = self.chain.head
        self.in_transaction = False
        written, self.pending = self.pending, Counter()
        return written

    def rollback(self) -> None:
        self.js.forget_pending()
        self.in_transaction = False
        self.pending = Counter()
        if self.chain is not None:
            self.chain.reset(self._committed_head)
        try:
            self.conn.rollback()
        except psycopg.Error:
            pass
