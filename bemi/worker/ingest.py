"""An ingester: store changes from the JetStream stream into ``changes``, exactly once (I/O).

Any number of ingesters, on any machines, share one durable pull consumer; each
fetched batch (up to ``batch`` messages) is stored in one destination
transaction and acknowledged only after that transaction committed:

1. the fast path: each message read once in Python (message.read: the
   fields checked, ``before``/``after``/``context`` kept as their JSON text, so
   numbers keep every digit, which the chain needs), the batch COPied straight
   into ``changes`` in the sink's column order, as the direct mode writes;
2. when that fails (a message that is not a valid v1 change, or a change
   stored before: a redelivery after a kill, a copy published again by a
   restarted reader, which ``changes_identity_index`` refuses), the careful
   path: the messages as they came COPied into a temporary table of ``jsonb``,
   then one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``;
3. commit, then ack every message of the batch.

Killed before the commit: nothing stored, nothing acked, JetStream redelivers
after ``ack_wait``. Killed between commit and acks: redelivered, skipped by the
index. Messages are untrusted input: one that is not a valid v1 document (too
large, not UTF-8 or JSON, a wrong version, a field of the wrong type or too
long for its column) is found by storing the batch again message by message,
and becomes a dead letter in ``_bemi_worker_failures`` (the message itself in
``change``) and is acked: it never blocks the consumer.

The destination's tables are checked and made by ``Sink.ensure_tables`` (the
same trust rules as the direct mode), and its partitions kept by
bemi/worker/partitions.py (several ingesters take turns through its lock).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Iterator

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from bemi import tables
from bemi.worker.errors import WorkerError
from bemi.worker.jetstream import JetStream, JetStreamFault, PullConsumer, StreamSettings
from bemi.worker.lifecycle import run_process
from bemi.worker.partitions import DEFAULT_INTERVAL, Partitions
from bemi.worker.session import connect
from bemi.worker.message import read_copy_line
from bemi.worker.sink import COPY_CHANGES, Sink, copy_text, is_rejection
from bemi.worker.stats import WorkerStats
from bemi.worker.tracked import TrackedTables
from bemi.worker.upkeep import Upkeep
from bemi.words import counted

__all__ = ["IngestConfig", "Ingester", "main_loop"]

log = logging.getLogger("bemi.worker")

_INCOMING = sql.SQL("pg_temp._bemi_incoming")
_OPERATIONS = ("CREATE", "UPDATE", "DELETE", "TRUNCATE")
#: A valid v1 document (types; the casts in _INSERT check the values' forms).
_VALID = sql.SQL(
    "m OPERATOR(pg_catalog.->>) 'v' OPERATOR(pg_catalog.=) '1' AND NOT m OPERATOR(pg_catalog.?) 'error' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'database') OPERATOR(pg_catalog.=) 'string' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'schema') OPERATOR(pg_catalog.=) 'string' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'table') OPERATOR(pg_catalog.=) 'string' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'primary_key') OPERATOR(pg_catalog.=) ANY "
    "(ARRAY['string', 'null']) "
    "AND (m OPERATOR(pg_catalog.->>) 'operation') OPERATOR(pg_catalog.=) ANY (ARRAY['CREATE', 'UPDATE', 'DELETE', "
    "'TRUNCATE']) "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'before') OPERATOR(pg_catalog.=) 'object' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'after') OPERATOR(pg_catalog.=) 'object' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'context') OPERATOR(pg_catalog.=) 'object' "
    "AND (m OPERATOR(pg_catalog.->>) 'committed_at') OPERATOR(pg_catalog.~) {iso} "
    "AND (m OPERATOR(pg_catalog.->>) 'queued_at') OPERATOR(pg_catalog.~) {iso} "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'transaction_id') OPERATOR(pg_catalog.=) 'number' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'position') OPERATOR(pg_catalog.=) 'number' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'commit_position') OPERATOR(pg_catalog.=) 'number' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'change_index') OPERATOR(pg_catalog.=) 'number' "
    "AND pg_catalog.jsonb_typeof(m OPERATOR(pg_catalog.->) 'chain_link') OPERATOR(pg_catalog.=) ANY "
    "(ARRAY['string', 'null'])").format(
    iso=sql.Literal(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d{1,6})?([+-]\d\d(:?\d\d)?|Z)$"))
#: The batch as it came; ``valid`` computed once, as each message is COPied in.
_CREATE_INCOMING = sql.SQL(
    "CREATE TEMPORARY TABLE IF NOT EXISTS _bemi_incoming (n int4 NOT NULL, m jsonb NOT NULL, "
    "valid boolean GENERATED ALWAYS AS (COALESCE({valid}, false)) STORED) ON COMMIT DELETE ROWS").format(valid=_VALID)
_INSERT = sql.SQL(
    'WITH stored AS (INSERT INTO {changes} ("database", "schema", "table", "primary_key", "operation", "before", "after", "context", '
    '"committed_at", "queued_at", "transaction_id", "position", "commit_position", "change_index", "chain_link") '
    "SELECT m OPERATOR(pg_catalog.->>) 'database', m OPERATOR(pg_catalog.->>) 'schema', "
    "m OPERATOR(pg_catalog.->>) 'table', m OPERATOR(pg_catalog.->>) 'primary_key', "
    "m OPERATOR(pg_catalog.->>) 'operation', m OPERATOR(pg_catalog.->) 'before', m OPERATOR(pg_catalog.->) 'after', "
    "m OPERATOR(pg_catalog.->) 'context', (m OPERATOR(pg_catalog.->>) 'committed_at')::pg_catalog.timestamptz, "
    "(m OPERATOR(pg_catalog.->>) 'queued_at')::pg_catalog.timestamptz, "
    "(m OPERATOR(pg_catalog.->>) 'transaction_id')::pg_catalog.int8, "
    "(m OPERATOR(pg_catalog.->>) 'position')::pg_catalog.int8, "
    "(m OPERATOR(pg_catalog.->>) 'commit_position')::pg_catalog.int8, "
    "(m OPERATOR(pg_catalog.->>) 'change_index')::pg_catalog.int4, "
    "pg_catalog.decode(m OPERATOR(pg_catalog.->>) 'chain_link', 'hex') "
    'FROM {incoming} WHERE valid ON CONFLICT DO NOTHING RETURNING "table", "operation", "committed_at") '
    'SELECT "table", "operation", pg_catalog.count(*), pg_catalog.min(committed_at), pg_catalog.max(committed_at) '
    'FROM stored GROUP BY 1, 2')
_INVALID = sql.SQL("SELECT n, m OPERATOR(pg_catalog.->>) 'error' FROM {incoming} WHERE NOT valid")
_DEAD = sql.SQL(
    'INSERT INTO {failures} ("source", "slot", "database", "error", "sqlstate", "change") '
    "VALUES (%s::text, %s::text, %s::text, %s::text, %s::text, %s::bytea)")


#: Messages read, then COPied, at a time.
CHUNK = 1000
#: One chunk read: its COPY lines, its changes by (table, operation), its commit times.
ReadChunk = tuple[list[str], Counter[tuple[str, str]], set[str]]
_END = object()  # the end of a batch's chunks
_ABORT = object()  # the reading thread failed: store nothing


class _Unreadable(Exception):
    """A chunk that is not all valid v1 changes: the fast path gives way to the careful one."""


class _Aborted(Exception):
    """The thread reading the batch failed: the batch is not stored (nor acked: delivered again)."""


def _chunks(chunks: queue.SimpleQueue) -> Iterator[ReadChunk | None]:
    """The chunks of a batch as the reading thread hands them over, to the batch's end."""
    while True:
        item = chunks.get()
        if item is _END:
            return
        if item is _ABORT:
            raise _Aborted
        yield item


@dataclass
class IngestConfig:
    stream: StreamSettings
    destination_dsn: str
    consumer: str = "bemi_ingest"  # the durable consumer all ingesters of one destination share
    batch: int = 10_000  # messages per fetch, stored in one transaction (fewer, larger: less work per change)
    batch_bytes: int = 32 * 1024 * 1024  # ... and at most these bytes (or one message, when larger)
    fetch_timeout: float = 0.5  # seconds a fetch waits for the first messages
    ack_wait: float = 60.0  # seconds before JetStream redelivers what an ingester fetched and did not ack
    max_ack_pending: int = 50_000  # messages fetched and not acked yet, across all ingesters (2 batches each)
    max_message_bytes: int = 64 * 1024 * 1024  # a larger message is a dead letter
    once: bool = False  # stop when the consumer has nothing left to deliver
    partition_interval: str = DEFAULT_INTERVAL
    retention: timedelta | None = None
    maintenance_interval: float = 60.0
    retention_interval: float = 3600.0
    clock: Callable[[], datetime] | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


class Ingester:
    def __init__(self, config: IngestConfig) -> None:
        self.config = config
        self.stopping = threading.Event()
        self.stats = WorkerStats(mode="ingest")  # what /metrics shows (bemi/worker/metrics.py)
        self.stored = 0  # changes stored since start
        self.sink: Sink | None = None
        self.js: JetStream | None = None
        self._sub: Any = None
        self.partitions: Partitions | None = None
        self.upkeep = Upkeep(config.partition_interval, config.retention, config.maintenance_interval,
                             config.retention_interval, config.clock, by="bemi-worker ingest --retention")
        self._last_info = 0.0
        self._progress = 0
        self._ahead: Any = None  # the next batch, being fetched (a concurrent future)
        self._idle = False  # the last fetch found nothing
        self._pull: Any = None
        self._storing: list[tuple[Future, list[Any], float]] = []  # batches being stored, not acked yet
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="bemi-ingest-store")
        self._log_at = time.monotonic()
        self._log_changes = 0
        self._log_busy = 0.0

    # -- lifecycle --------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        source = f"nats:{cfg.stream.stream}"
        self.sink = sink = Sink(cfg.destination_dsn, cfg.consumer, "", source, chain=False)
        tracked = self._tracked(sink)
        sink.ensure_tables(before_commit=tracked.claim_new_tables if tracked else None)
        if tracked is not None:
            tracked.register_own_tables(sink.conn)
            tracked.control.close()
        sink.conn.execute(_CREATE_INCOMING)
        sink.conn.commit()
        self.js = js = JetStream(cfg.stream, name=f"bemi-worker ingest {cfg.consumer}")
        js.ensure_stream()
        self._sub = js.call(self._subscribe())
        self._pull = js.call(PullConsumer(js, cfg.stream.stream, cfg.consumer, cfg.batch_bytes).start())
        self._ahead = None
        self._maintain(force=True)
        self.stats.streaming = True
        log.info("ingesting from NATS JetStream stream %s (consumer %s) at %s into database %s",
                 cfg.stream.stream, cfg.consumer, cfg.stream.url, sink.conn.info.dbname)

    def _tracked(self, sink: Sink) -> TrackedTables | None:
        """When the destination is a source database too (bemi's tracking installed there), bemi's new
        tables are registered as its own, as the direct mode does (never tracked, never published)."""
        row = sink.conn.execute("SELECT pg_catalog.to_regclass('public._bemi_tracking') IS NOT NULL").fetchone()
        sink.conn.rollback()
        if not (row and row[0]):
            return None
        control = connect(self.config.destination_dsn, "destination")
        tracked = TrackedTables(control, control.info.user)
        try:
            tracked.ensure_rule()  # the trust checks of the settings table (it exists: nothing installed)
        except BaseException:
            control.close()
            raise
        return tracked

    async def _subscribe(self) -> Any:
        cfg = self.config
        assert self.js is not None
        api = self.js.nats.js.api
        consumer = api.ConsumerConfig(durable_name=cfg.consumer, ack_policy=api.AckPolicy.EXPLICIT,
                                      deliver_policy=api.DeliverPolicy.ALL, ack_wait=cfg.ack_wait,
                                      max_ack_pending=cfg.max_ack_pending, max_waiting=512,
                                      filter_subject=f"{cfg.stream.prefix}.>")
        return await self.js.js.pull_subscribe(f"{cfg.stream.prefix}.>", durable=cfg.consumer,
                                               stream=cfg.stream.stream, config=consumer)

    def close(self) -> None:
        self.stats.streaming = False
        # Batches being stored: let them end (committed or not); unacked, they are delivered again.
        for future, _msgs, _began in self._storing:
            try:
                future.result()
            except Exception:
                pass
        self._storing = []
        if self.js is not None:
            self.js.close()
        if self.sink is not None:
            self.sink.rollback()
            self.sink.close()
        self.js = self.sink = None
        self._sub = None
        self._ahead = None
        self.partitions = None

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> int:
        """Until stopped (or, with ``once``, until the consumer has nothing left); faults are waited out."""
        cfg = self.config
        failures = 0
        started = False
        try:
            while True:
                before = self._progress
                try:
                    self.setup()
                    started = True
                    while not self.stopping.is_set():
                        got = self.step()
                        if not got and cfg.once and self._drained():
                            return 0
                    self.finish_storing()
                    return 0
                except WorkerError as exc:
                    if not started or not str(exc).startswith("cannot connect to the"):
                        raise
                    log.warning("%s", exc)
                except (psycopg.Error, OSError) as exc:
                    if cfg.once and not started:
                        raise
                    log.warning("ingest: %s: %s", "NATS" if isinstance(exc, JetStreamFault) else "database error",
                                " ".join(str(exc).split()))
                self.close()
                if self.stopping.is_set():
                    return 0
                failures = 0 if self._progress > before else failures + 1
                delay = min(cfg.backoff_max, cfg.backoff_initial * 2 ** min(failures, 16)) * random.uniform(0.8, 1.2)
                self.stats.reconnects += 1
                log.warning("ingest: reconnecting in %.1f s (attempt %d)", delay, failures + 1)
                if self.stopping.wait(delay):
                    return 0
        finally:
            self.close()
            self._store_thread.shutdown(wait=True)

    def _drained(self) -> bool:
        info = self.consumer_info()
        return info is not None and info.num_pending == 0 and info.num_ack_pending == 0

    def consumer_info(self) -> Any:
        if self.js is None or self._sub is None:
            return None
        info = self.js.call(self._sub.consumer_info(), timeout=10)
        self.stats.nats_consumer_pending = int(info.num_pending or 0)
        self.stats.nats_consumer_ack_pending = int(info.num_ack_pending or 0)
        return info

    # -- one batch --------------------------------------------------------------------------

    def step(self) -> int:
        """Fetch one batch, store it, ack it; returns the number of messages handled."""
        cfg = self.config
        assert self.js is not None
        now = time.monotonic()
        if now - self._last_info >= 5.0:
            self._last_info = now
            self.consumer_info()
        # One batch ahead: the next is fetched, and read, while this one is stored (in another thread).
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            # With ``once``, the first empty answer is not waited for: the consumer may be drained.
            wait = cfg.fetch_timeout if self._idle or not cfg.once else 0.0
            msgs = self.js.call(self._pull.fetch(cfg.batch, wait), timeout=wait + 30)
        else:
            msgs = ahead.result(cfg.fetch_timeout + 30)
        self._idle = not msgs
        if msgs:
            self._ahead = asyncio.run_coroutine_threadsafe(self._pull.fetch(cfg.batch, 0), self.js._loop)
        if not msgs:
            self.finish_storing()
            self._maintain()
            self._log_stored()
            return 0
        # Read in chunks, each handed at once to the thread storing this batch: PostgreSQL stores a
        # chunk while the next is read (as the direct mode's COPY runs while it decodes).
        chunks: queue.SimpleQueue = queue.SimpleQueue()
        future = self._store_thread.submit(self.store, msgs, _chunks(chunks))
        self._storing.append((future, msgs, time.monotonic()))  # (close() waits for it, whatever happens)
        try:
            for start in range(0, len(msgs), CHUNK):
                read = self._read_batch([m.data for m in msgs[start:start + CHUNK]])
                chunks.put(read)
                if read is None:
                    break  # (the careful path takes the whole batch)
        except BaseException:
            chunks.put(_ABORT)
            raise
        finally:
            chunks.put(_END)
        self.finish_storing(keep=1)  # the batch before: committed, then acked
        return len(msgs)

    def finish_storing(self, keep: int = 0) -> None:
        """Wait for the batches being stored (all but the last ``keep``) to commit, then ack each
        (never before: exactly once)."""
        while len(self._storing) > keep:
            future, msgs, began = self._storing[0]
            stored = future.result()
            del self._storing[0]
            assert self.js is not None
            self.js.call(self._pull.ack(msgs))
            self._progress += 1
            self._log_busy += time.monotonic() - began
            self._log_changes += stored
            if time.monotonic() - self._log_at >= 1.0:
                self._log_stored()

    def _log_stored(self) -> None:
        """One line a second at most, as the direct worker's (the time is the time spent storing)."""
        self._log_at = time.monotonic()
        if not self._log_changes:
            return
        count, self._log_changes = self._log_changes, 0
        busy, self._log_busy = max(self._log_busy, 1e-6), 0.0
        log.info("stored %s in %.3f s (%.0f changes/s); consumer %s pending", counted(count, "change"), busy,
                 count / busy, self.stats.nats_consumer_pending)

    def store(self, msgs: list[Any], chunks: Iterable[ReadChunk | None]) -> int:
        """Store one batch in one destination transaction; a batch the destination rejects is stored
        message by message, each rejected one as a dead letter. ``chunks``: _read_batch() of the batch's
        messages in order, as they are read (None for a chunk that is not all valid v1 changes)."""
        sink = self.sink
        assert sink is not None
        self._maintain()  # (the destination's connection is idle only here)
        self._dead = []
        self._written = Counter()
        datas: list[bytes] = []
        try:
            if not self._copy_fast(sink.conn, chunks):
                datas = [m.data for m in msgs]
                self._insert(sink.conn, datas, list(range(len(datas))))
            sink.conn.commit()
        except _Aborted:
            sink.conn.rollback()
            return 0
        except psycopg.Error as exc:
            sink.conn.rollback()
            self._dead = []
            self._written = Counter()
            if not is_rejection(exc):
                raise
            datas = datas or [m.data for m in msgs]
            self._store_careful(sink.conn, datas)
            sink.conn.commit()
        cfg = self.config
        for error in self._dead:
            log.error("dead letter: a message of stream %s could not be stored (%s); stored in "
                      "_bemi_worker_failures", cfg.stream.stream, error[:500])
        dead = len(self._dead)
        stored = sum(self._written.values())
        self.stats.dead_letters += dead
        self.stats.written.update(self._written)
        self.stored += stored
        self.stats.nats_ingest_duplicates += max(len(msgs) - stored - dead, 0)
        if self.partitions is not None and self.partitions.pending:
            pending, self.partitions.pending = self.partitions.pending, set()
            self.partitions.try_ensure(pending)
        return stored

    _dead: list[str] = []  # dead letters of the open destination transaction (their errors)
    _written: Counter[tuple[str, str]] = Counter()  # changes it stored, by (table, operation)

    def _read_batch(self, datas: list[bytes]) -> ReadChunk | None:
        """Messages' COPY lines, changes by (table, operation) and commit times; None when a message
        is not a valid v1 change (the careful path then says which). Pure: runs while the batch
        before is being stored."""
        limit = self.config.max_message_bytes
        lines: list[str] = []
        written: Counter[tuple[str, str]] = Counter()
        moments: set[str] = set()
        for data in datas:
            if len(data) > limit:
                return None
            read = read_copy_line(data)
            if read is None:
                return None
            line, table, operation, committed_at = read
            lines.append(line)
            written[table, operation] += 1
            moments.add(committed_at)
        return lines, written, moments

    def _copy_fast(self, conn: psycopg.Connection, chunks: Iterable[ReadChunk | None]) -> bool:
        """COPY valid v1 changes straight into ``changes``, chunk by chunk as they come, in a transaction
        of its own; False (rolled back) when a chunk is not all valid v1 changes, or a change was
        stored before (the careful path then says which, or skips it)."""
        partitions = self.partitions
        remaining = iter(chunks)
        for first in remaining:
            break
        else:
            return True  # (no chunk: nothing to store)
        if first is None:
            return False
        if partitions is not None:
            missing = partitions.uncovered(datetime.fromisoformat(m) for m in sorted(first[2]))
            if missing:
                partitions.try_ensure(missing)  # before the transaction
        written: Counter[tuple[str, str]] = Counter()
        # The COPY is all this transaction holds: refused, it is rolled back whole (no savepoint: two
        # round trips fewer per batch) and the careful path starts another.
        try:
            with conn.cursor() as cur, cur.copy(COPY_CHANGES) as copy:
                for read in itertools.chain((first,), remaining):
                    if read is None:
                        raise _Unreadable
                    lines, counts, moments = read
                    if partitions is not None:
                        # Rows no partition covers go to changes_default, moved after the commit.
                        partitions.pending |= partitions.uncovered(
                            datetime.fromisoformat(m) for m in sorted(moments))
                    copy.write("".join(lines).encode("utf-8", "surrogatepass"))
                    written.update(counts)
        except _Unreadable:
            conn.rollback()
            return False
        except psycopg.Error as exc:
            if not is_rejection(exc):
                raise
            conn.rollback()
            return False
        self._written.update(written)
        return True

    def _insert(self, conn: psycopg.Connection, datas: list[bytes], numbers: list[int]) -> None:
        """COPY, dead-letter what is plainly not a v1 document, INSERT (counted in ``_written``)."""
        limit = self.config.max_message_bytes
        lines = []
        for n, data in zip(numbers, datas):
            if len(data) > limit:
                self._dead_letter(conn, data, f"message of {len(data)} bytes, more than {limit}")
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                self._dead_letter(conn, data, f"message not UTF-8: {exc}")
                continue
            lines.append(f"{n}\t{copy_text(text)}\n")
        if not lines:
            return
        with conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} (n, m) FROM STDIN").format(_INCOMING)) as copy:
                copy.write("".join(lines).encode("utf-8"))
            for n, error in cur.execute(_INVALID.format(incoming=_INCOMING)).fetchall():
                self._dead_letter(conn, datas[numbers.index(n)],
                                  error if isinstance(error, str) else "not a v1 change document (docs/scale-out.md)")
            moments = []
            for table, operation, count, first, last in cur.execute(
                    _INSERT.format(changes=tables.CHANGES, incoming=_INCOMING)).fetchall():
                self._written[table, operation] += count
                moments += [first, last]
            if self.partitions is not None:
                # Rows no partition covered went to changes_default; their partitions are made right
                # after the commit, with those rows moved in (as the direct mode's sink does).
                self.partitions.pending |= self.partitions.uncovered(moments)

    def _store_careful(self, conn: psycopg.Connection, datas: list[bytes]) -> None:
        """Each message in its own savepoint; one the destination rejects becomes a dead letter."""
        for n, data in enumerate(datas):
            dead = len(self._dead)
            written = self._written.copy()
            conn.execute("SAVEPOINT bemi_message")
            try:
                self._insert(conn, [data], [n])
                conn.execute("TRUNCATE pg_temp._bemi_incoming")
                conn.execute("RELEASE SAVEPOINT bemi_message")
            except psycopg.Error as exc:
                if not is_rejection(exc):
                    raise
                conn.execute("ROLLBACK TO SAVEPOINT bemi_message")
                conn.execute("RELEASE SAVEPOINT bemi_message")
                del self._dead[dead:]
                self._written = written
                self._dead_letter(conn, data, " ".join(str(exc).split()), getattr(exc, "sqlstate", None))

    def _dead_letter(self, conn: psycopg.Connection, data: bytes, error: str, sqlstate: str | None = None) -> None:
        cfg = self.config
        conn.execute(_DEAD.format(failures=tables.FAILURES),
                     [f"nats:{cfg.stream.stream}", cfg.consumer, "", error, sqlstate, data])
        self._dead.append(error)

    # -- partitions and retention ----------------------------------------------------------

    def _maintain(self, force: bool = False) -> None:
        """Partitions and retention as the direct mode's worker keeps them (bemi/worker/upkeep.py)."""
        sink = self.sink
        if sink is None or sink.conn.info.transaction_status != TransactionStatus.IDLE:
            return
        self.partitions = self.upkeep.run(sink.conn, self.partitions, force)


def main_loop(config: IngestConfig) -> int:
    """Run an ingester with signal handling (SIGINT/SIGTERM: finish the batch in hand, then exit; a
    second one: at once, what was not acked is delivered again)."""
    ingester = Ingester(config)
    return run_process(ingester, config.metrics_host, config.metrics_port,
                       stopped=lambda: (f"stopped; {counted(ingester.stored, 'change')} stored, "
                                        f"{ingester.stats.nats_ingest_duplicates} skipped as already stored, "
                                        f"{counted(ingester.stats.dead_letters, 'dead letter')}"),
                       aborted="aborted: the batches in hand were not acknowledged and will be delivered again")
