"""The worker loop: stream the slot, stitch, write, commit, confirm; faults, dead letters, standby, signals.

One process, one thread. A source transaction's rows are COPied into the open
destination transaction as they are decoded (the server inserts while the next
rows are decoded); the destination commits at a source transaction's end,
together with the checkpoint, when the stream has nothing more buffered (low
latency) or the batch is large or old enough (throughput). The stream's flush
position follows the stored checkpoint, never ahead of it.

Faults (a connection lost, a server restart, an error that is not the data's)
are logged, waited out with capped exponential back-off and survived: the
worker reconnects and resumes from its checkpoint. A change the destination
rejects becomes a dead letter in ``_bemi_worker_failures``. The worker exits
only for what an operator must fix (``WorkerError``).
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, cast

import psycopg
from psycopg.pq import TransactionStatus

from bemi.worker import pgoutput as po
from bemi.worker import takeover as takeover_mod
from bemi.worker.lifecycle import run_process
from bemi.worker.partitions import DEFAULT_INTERVAL
from bemi.worker.errors import Blocked, WorkerError
from bemi.worker.sink import Checkpoint, Sink, is_rejection
from bemi.worker.shown import shown
from bemi.worker.slot import check_slot
from bemi.worker.source import KEEPALIVE, MIN_PSYCOPG, STATUS_PEEK_WAIT, ConnectionLost, SlotInUse, Source, Stream
from bemi.worker.stats import WorkerStats
from bemi.worker.stitch import ChangeRow, Stitcher
from bemi.worker.tracked import TrackedTables
from bemi.worker.upkeep import Upkeep
from bemi.worker.values import JsonValues
from bemi.words import counted

__all__ = ["Config", "Worker", "WorkerError", "main_loop", "configure_logging", "check_psycopg"]

log = logging.getLogger("bemi.worker")


@dataclass
class Config:
    source_dsn: str
    destination_dsn: str | None = None  # None: the source database
    slot: str = "bemi"
    publication: str = "bemi"
    once: bool = False
    standby: bool = False  # wait while another process holds the slot, then take over
    batch_rows: int = 10_000  # commit the destination after this many changes (at a transaction end)
    batch_seconds: float = 1.0  # ... or when the batch is this old (at a transaction end)
    copy_rows: int = 2_000  # rows per COPY write
    copy_bytes: int = 4 * 1024 * 1024  # ... or this many bytes of rows, whichever first
    poll_interval: float = 0.1  # longest wait for the stream before the loop looks around
    heartbeat_interval: float = 10.0  # seconds between status updates to the server
    refresh_interval: float = 1.0  # seconds between checks for new tables
    stats_interval: float = 5.0  # seconds between refreshes of the slot's retained WAL
    backoff_initial: float = 0.5  # first wait after a fault (seconds), doubled each time...
    backoff_max: float = 30.0  # ... up to this
    standby_interval: float = 0.5  # how often a standby tries to take the slot
    takeover: bool = False  # skip what the published worker stored that the slot replays (worker/takeover.py)
    takeover_max_bytes: int = takeover_mod.DEFAULT_MAX_BYTES
    partition_interval: str = DEFAULT_INTERVAL  # day, week or month (bemi/worker/partitions.py)
    retention: timedelta | None = None  # drop partitions older than this (None: keep everything)
    maintenance_interval: float = 60.0  # seconds between partition maintenance passes
    retention_interval: float = 3600.0  # seconds between retention passes
    clock: Callable[[], datetime] | None = None  # "now" for partition management (tests move it)
    metrics_port: int | None = None  # serve /metrics and /healthz (bemi/worker/metrics.py)
    metrics_host: str = "127.0.0.1"
    tracking: Any = None  # bemi.tracking.Tracking from flags; None: the settings stored in the source database
    masking_key: str | None = None  # None: the random key kept in the source database
    # The walsender's logical_decoding_work_mem (MiB; 0: the server's): a transaction larger than it is
    # streamed to the worker before its commit (session.decoding_memory, bemi/worker/unstream.py).
    decoding_memory_mb: int = 16
    chain: bool = True  # give every stored change its link of the chain (bemi/chain.py); off only for bench/
    publish: Any = None  # bemi.worker.jetstream.StreamSettings: publish to NATS JetStream instead of storing
    publish_window_bytes: int = 16 * 1024 * 1024  # bytes published and not acked yet, at most
    publish_ack_timeout: float = 30.0  # seconds to wait for JetStream's acks before a reconnect
    publish_max_message: int | None = None  # bytes of a message at most (None: the server's max_payload)


@dataclass
class _Batch:
    """What the open destination transaction holds."""
    rows: list[ChangeRow] = field(default_factory=list)  # decoded, not yet COPied
    rows_bytes: int = 0
    counted: int = 0  # rows of ``rows`` whose bytes are counted
    pending: int = 0  # rows COPied into the open destination transaction
    unsaved: tuple[po.Commit, int | None] | None = None  # last commit fed, not stored yet
    started: float = 0.0


class _Poison(Exception):
    """The destination rejected a row of the open batch (data, not a fault)."""

    def __init__(self, through: int, error: psycopg.Error) -> None:
        super().__init__(str(error))
        self.through = through
        self.error = error


def check_psycopg() -> None:
    """The worker needs psycopg >= 3.3 (START_REPLICATION through ``execute()``)."""
    version = tuple(int(p) for p in psycopg.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_PSYCOPG:
        raise WorkerError(f"the bemi worker needs psycopg >= {'.'.join(map(str, MIN_PSYCOPG))} "
                          f"(installed: {psycopg.__version__}): pip install 'psycopg>=3.3'")


class Worker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.source: Source | None = None
        self.sink: Sink | None = None
        self.stream: Stream | None = None
        self.stopping = threading.Event()
        self.stats = WorkerStats()
        self.written = 0  # changes written since start
        self.checkpoint: Checkpoint | None = None
        self.source_identity = ""
        self._careful_through = 0  # rows at or before this LSN are written with dead-letter fallback
        self._started_once = False
        self._walsenders: set[int] = set()  # backend pids of this worker's replication connections
        self._commits = 0  # destination commits since start
        self._log_changes = 0  # changes written since the last log line
        self._log_busy = 0.0  # seconds spent writing them (COPY and commit; not the waits between)
        self._log_at = 0.0
        self._log_commit: po.Commit | None = None
        self._last_refresh = 0.0
        self._last_stats = 0.0
        self.row_filter: takeover_mod.RowFilter | None = None  # --takeover: drops what the published worker stored
        self.upkeep = Upkeep(config.partition_interval, config.retention, config.maintenance_interval,
                             config.retention_interval, config.clock)
        self._reserved_slot = False  # made the slot while blocked (Blocked), before reading any checkpoint

    # -- lifecycle --------------------------------------------------------------------------

    def setup(self) -> None:
        """Connect, check, create what is missing; leaves the stream ready to start."""
        cfg = self.config
        check_psycopg()
        self.source = source = Source(cfg.source_dsn, cfg.slot, cfg.publication, cfg.decoding_memory_mb * 1024)
        source.check_privileges()
        self._wait_for_slot(source)
        # What is tracked (bemi/tracking.py): the same rule as the triggers and the event trigger.
        self.tracked = tracked = TrackedTables(source.control, source.user)
        tracked.ensure_rule()
        tracked.load(cfg.tracking)
        source.ensure_publication()
        stream = source.open_stream(self.stats)
        self._walsenders.add(stream.conn.info.backend_pid)
        self.source_identity = source.identity
        self.sink = sink = self._open_sink(source)
        sink.ensure_tables(before_commit=tracked.claim_new_tables)
        tracked.register_own_tables(sink.conn)  # before its partitions are made: they are decided by it
        self._maintain_partitions(force=True)
        source.publisher.rules = tracked.rules()
        key = tracked.masking_key(cfg.masking_key) if tracked.tracking.masked_columns else b""
        self.checkpoint = checkpoint = sink.checkpoint()
        reserved, self._reserved_slot = self._reserved_slot, False
        if reserved and checkpoint is not None:
            # The slot was missing although changes were written from it: a new one would hide the gap.
            source.control.execute("SELECT pg_catalog.pg_drop_replication_slot(%s::pg_catalog.name)", [cfg.slot])
            source.ensure_slot(checkpoint.commit_lsn)  # raises, saying what to do
        if self.stats.blocked:
            log.warning("no longer blocked: %s", self.stats.blocked)
            self.stats.blocked = ""
        source.refresh_tables()
        self._last_refresh = time.monotonic()
        state = source.ensure_slot(checkpoint.commit_lsn if checkpoint else None)
        if cfg.takeover:
            self.row_filter = takeover_mod.start(source.control, cfg.slot, sink.conn, source.database,
                                                 cfg.takeover_max_bytes)
        elif checkpoint is None and sink.stores_changes:
            takeover_mod.warn_if_published_rows(sink.conn, source.database)
        takeover_mod.warn_about_leftovers(source.control, cfg.slot, cfg.publication)
        self.values = JsonValues(source.type_spec, _python_encoding(source.encoding))
        self.stitcher = Stitcher(self.values, source.primary_key,
                                 skip_through=checkpoint.commit_lsn if checkpoint else 0,
                                 tracking=tracked.tracking, own_tables=tracked.own_tables, masking_key=key,
                                 is_own=tracked.is_own)
        self.stitcher.bad_contexts = self.stats.dropped_contexts
        self.stitcher.skipped_messages = self.stats.skipped_messages
        self.stitcher.bad_values = self.stats.values_as_text
        start = max(state.confirmed_flush, checkpoint.end_lsn if checkpoint else 0)
        stream.start(start)
        self.stream = stream
        if checkpoint and checkpoint.end_lsn > state.confirmed_flush:
            # Stopped between the destination commit and the status update: catch the slot up.
            stream.confirm(checkpoint.end_lsn)
            stream.send_status()
        if checkpoint:
            self.stats.last_commit_lsn = max(self.stats.last_commit_lsn, checkpoint.end_lsn)
        self.stats.slot_retained_wal_bytes = source.retained_wal_bytes()
        self._last_stats = time.monotonic()
        self._started_once = True
        log.info("reading slot %s (publication %s) of database %s from %s over the replication protocol; "
                 "writing changes to %s", cfg.slot, cfg.publication, source.database, po.int_to_lsn(start),
                 sink.describe())

    def _open_sink(self, source: Source) -> Sink:
        """Where changes go: ``changes`` in the destination, or (``publish``) NATS JetStream."""
        cfg = self.config
        if cfg.publish is None:
            return Sink(cfg.destination_dsn or cfg.source_dsn, cfg.slot, source.database, source.identity,
                        chain=cfg.chain)
        from bemi.worker.publisher import JetStreamSink

        self.stats.mode = "reader"
        # The same interface as Sink (bemi/worker/publisher.py), not a subclass of it.
        return cast(Sink, JetStreamSink(cfg.publish, cfg.source_dsn, cfg.slot, source.database, source.identity,
                                        chain=cfg.chain, window_bytes=cfg.publish_window_bytes,
                                        ack_timeout=cfg.publish_ack_timeout, stats=self.stats,
                                        max_message=cfg.publish_max_message))

    def _wait_for_slot(self, source: Source) -> None:
        """Start only when no other process holds the slot (the only thing two workers cannot share).

        Held by ``bemi-worker status`` peeking at it, or by this worker's own walsender not released
        yet: wait for it. Held by anything else: exit with status 3, or, with ``--standby``, wait until
        it is free. Only a role with REPLICATION can hold a slot, so nothing another role does can make
        a worker exit or wait here. START_REPLICATION settles a race (``SlotInUse``)."""
        cfg = self.config
        deadline = time.monotonic() + STATUS_PEEK_WAIT
        waiting = False
        while True:
            holder = source.slot_holder()
            if holder is None:
                break
            passing = holder.application_name == "bemi-status" or holder.pid in self._walsenders
            if passing and time.monotonic() < deadline:
                pass
            elif not cfg.standby:
                raise WorkerError(
                    f"another bemi worker is already reading slot {cfg.slot!r} of database {source.database!r} "
                    f"(it holds the slot: {holder.describe()}); only one worker may run per slot. Stop it "
                    "first, use another --slot, or start this one with --standby to take over when the other "
                    "stops.", exit_code=3)
            elif not waiting:
                log.info("standby: another worker holds slot %s of database %s (%s); waiting to take over",
                         cfg.slot, source.database, holder.describe())
                waiting = True
            if self.stopping.wait(0.1 if passing else cfg.standby_interval):
                raise _Stopped
        if waiting:
            log.info("standby: the other worker is gone; taking over slot %s", cfg.slot)

    def _ready(self) -> tuple[Source, Sink, Stream]:
        if self.source is None or self.sink is None or self.stream is None:
            raise RuntimeError("Worker.setup() has not run")
        return self.source, self.sink, self.stream

    def close(self) -> None:
        self.stats.streaming = False
        if self.row_filter is not None:
            log.info("--takeover: skipped %d changes the published worker had stored",
                     getattr(self.row_filter, "skipped", 0))
        if self.sink:
            self.sink.rollback()
            self.sink.close()
        if self.source:
            self.source.close()
        self.source = self.sink = self.stream = None

    def stop(self) -> None:
        """Finish the source transaction in hand, commit, then return from run()."""
        self.stopping.set()

    def run(self) -> int:
        """Run until stopped (or, with ``once``, until caught up); returns the exit code.

        Faults are survived here: log, back off, reconnect, resume from the checkpoint.
        """
        cfg = self.config
        failures = 0
        try:
            while True:
                commits_before = self._commits
                try:
                    self.setup()
                    self.drain() if cfg.once else self._stream_loop()
                    return 0
                except _Stopped:
                    return 0
                except SlotInUse as exc:
                    # Taken between the look at the slot and START_REPLICATION: look again (exit 3, wait
                    # with --standby, or wait for a status peek), without counting a fault.
                    log.info("replication slot %s was taken just before this worker started reading it (%s)",
                             cfg.slot, _one_line(exc))
                    self.close()
                    if self.stopping.wait(cfg.standby_interval):
                        return 0
                    continue
                except _Poison as exc:
                    if self._commits > commits_before or exc.through > self._careful_through:
                        # Not a fault: read again from the checkpoint, with a dead-letter fallback this time.
                        self._careful_through = max(self._careful_through, exc.through)
                        log.warning("the destination rejected a change (%s); reading again from the checkpoint "
                                    "and storing what it rejects in _bemi_worker_failures", _one_line(exc.error))
                        self.close()
                        continue
                    # Rejected again where rows already had their fallback: not a row's fault; back off.
                    log.error("the destination rejected a commit, not a change: %s", _one_line(exc.error))
                except Blocked as exc:
                    if cfg.once:
                        raise
                    # Another role's doing (a schema bemi it made first): never an exit. Say it at every
                    # attempt, show it in bemi_worker_blocked and /healthz, go on once an operator fixed it.
                    self.stats.blocked = _one_line(exc)
                    self._keep_changes_while_blocked()
                    log.error("%s The worker waits and tries again; the slot keeps every change meanwhile.", exc)
                except WorkerError as exc:
                    if self._started_once and self._transient_setup_error():
                        log.warning("%s", exc)  # cannot connect while the server restarts: a fault to wait out
                    else:
                        raise
                except (psycopg.Error, OSError) as exc:
                    self._raise_if_slot_gone(exc)
                    if cfg.once and not self._started_once:
                        raise
                    exc_text = _one_line(exc)
                    log.warning("%s: %s", "connection lost" if _is_connection_error(exc) else "database error",
                                exc_text)
                self.close()
                if self.stopping.is_set():
                    return 0
                # The back-off grows while faults follow each other, and starts again after progress.
                failures = 0 if self._commits > commits_before else failures + 1
                delay = min(cfg.backoff_max, cfg.backoff_initial * 2 ** min(failures, 16))
                delay *= random.uniform(0.8, 1.2)
                self.stats.reconnects += 1
                log.warning("reconnecting in %.1f s (attempt %d); resuming from the checkpoint", delay, failures + 1)
                if self.stopping.wait(delay):
                    return 0
        finally:
            self.close()

    def _keep_changes_while_blocked(self) -> None:
        """Blocked at a first start: publish the tracked tables and make the slot now, so that every change
        from now on is kept until the worker can store it (the slot is dropped again by setup() if a
        checkpoint turns up: a slot made after changes were stored from another would hide a gap)."""
        source = self.source
        if source is None or source.stream is None:
            return
        try:
            source.refresh_tables()
            if not self._reserved_slot and source.slot_state() is None:
                source.ensure_slot(None)
                self._reserved_slot = True
        except (psycopg.Error, WorkerError) as exc:
            log.warning("could not prepare slot %s while blocked: %s", self.config.slot, _one_line(exc))

    def _transient_setup_error(self) -> bool:
        exc = sys.exc_info()[1]
        return isinstance(exc, WorkerError) and str(exc).startswith("cannot connect to the")

    # -- partitions and retention (bemi/worker/partitions.py) ---------------------------------

    def _maintain_partitions(self, force: bool = False) -> None:
        """Partitions and retention (bemi/worker/upkeep.py), between destination transactions."""
        sink = self.sink
        if sink is None or not sink.stores_changes:
            return  # publishing to NATS: the ingesters keep the partitions
        if sink.in_transaction or sink.conn.info.transaction_status != TransactionStatus.IDLE:
            return  # a destination transaction is open: next time
        sink.partitions = self.upkeep.run(sink.conn, sink.partitions, force, warn_unpartitioned=True)

    def _raise_if_slot_gone(self, exc: BaseException) -> None:
        """A slot dropped or invalidated while the worker ran is for the operator, not a fault."""
        source = self.source
        if source is None or self.stream is None:  # not streaming yet: the slot may not exist yet
            return
        try:
            state = source.slot_state()
        except psycopg.Error:
            return
        if state is None:
            raise WorkerError(f"replication slot {self.config.slot!r} was dropped while the worker was "
                              f"reading it; the worker will not recreate it ({_one_line(exc)})") from exc
        check_slot(state, self.config.slot, source.database)

    # -- the stream -------------------------------------------------------------------------

    def drain(self) -> int:
        """Read and store everything the server had written when called, then return
        (``--once``); returns the number of source transactions seen."""
        source, sink, _stream = self._ready()
        if not sink.stores_changes:
            # A reader writes nothing that would flush the WAL (the walsender sends only flushed WAL):
            # an empty transaction with an xid commits, and so flushes, everything before the target.
            source.control.execute("SELECT pg_catalog.txid_current()")
        target = source.current_wal_lsn()
        return self._stream_loop(until=target)

    def _stream_loop(self, until: int | None = None) -> int:
        cfg = self.config
        source, sink, stream = self._ready()
        stitcher = self.stitcher
        feed = stitcher.feed
        batch = _Batch(started=time.monotonic())
        self._batch = batch
        transactions = 0
        checked = 0
        solicited = 0.0
        last_keepalive, same_since = -1, 0.0
        flush_rows = self._flush_rows
        rows = batch.rows  # the same list throughout (flushed with clear())
        copy_rows, copy_bytes = cfg.copy_rows, cfg.copy_bytes
        try:
            for item in stream.messages(cfg.poll_interval):
                if item is None or item is KEEPALIVE:
                    # Nothing buffered (or a keepalive): store what is complete, look around.
                    if batch.unsaved is not None and not stitcher.in_transaction:
                        self._commit(batch)
                    if not stitcher.in_transaction and batch.unsaved is None and not batch.pending:
                        if item is KEEPALIVE:
                            # Everything the server sent before this is stored (or had nothing to
                            # store): the slot may move on to its WAL end.
                            stream.confirm(stream.keepalive_end)
                            self._caught_up(stream.keepalive_end)
                        if self.stopping.is_set():
                            break
                        if until is not None:
                            if item is KEEPALIVE:
                                # Done when the server has decoded up to ``until``; or, as a safety net,
                                # when it kept answering with one position for 10 s (caught up).
                                if stream.keepalive_end >= until:
                                    break
                                now = time.monotonic()
                                if stream.keepalive_end != last_keepalive:
                                    last_keepalive, same_since = stream.keepalive_end, now
                                elif now - same_since >= 10:
                                    log.warning("the server stayed at %s, before %s: stopping there",
                                                po.int_to_lsn(last_keepalive), po.int_to_lsn(until))
                                    break
                            now = time.monotonic()
                            if now - solicited >= 0.05:
                                solicited = now
                                stream.send_status(reply=True)  # asks the server for a keepalive
                                continue
                    if self._log_changes and time.monotonic() - self._log_at >= 1.0:
                        self._log_written()
                    self._look_around(source, stream)
                    continue
                lsn, data = cast("tuple[int, Any]", item)  # (LSN, message) when not None/KEEPALIVE
                commit = feed(lsn, data, rows)
                added = len(rows) - batch.counted
                if added:
                    # Bytes of the new rows (a message gives one row, a TRUNCATE several).
                    if added == 1:
                        r = rows[-1]
                        batch.rows_bytes += len(r.before) + len(r.after) + len(r.context) + 200
                    else:
                        for r in rows[batch.counted:]:
                            batch.rows_bytes += len(r.before) + len(r.after) + len(r.context) + 200
                    batch.counted += added
                    if batch.counted >= copy_rows or batch.rows_bytes >= copy_bytes:
                        flush_rows(batch)
                if commit is not None:
                    transactions += 1
                    batch.unsaved = (commit, stitcher.last_xid)
                    if (batch.pending + len(batch.rows) >= cfg.batch_rows
                            or time.monotonic() - batch.started >= cfg.batch_seconds):
                        self._commit(batch)
                    if self.stopping.is_set():
                        if batch.unsaved is not None:
                            self._commit(batch)
                        break
                checked += 1
                if checked >= 4096:
                    checked = 0
                    self._look_around(source, stream)
            if stitcher.in_transaction:
                raise WorkerError("the stream ended inside a transaction", exit_code=1)
            if batch.unsaved is not None:
                self._commit(batch)
            self._log_written()
            if stream.status_dirty or until is not None:
                self._final_status(stream)
        except BaseException:
            self._log_written()
            sink.rollback()
            stitcher.reset()
            raise
        return transactions

    def _caught_up(self, wal_end: int) -> None:
        """For the lag metrics: everything up to ``wal_end`` is handled, as of now."""
        stats = self.stats
        if wal_end > max(stats.last_commit_lsn, stats.caught_up_lsn):
            stats.caught_up_lsn, stats.caught_up_at = wal_end, datetime.now(timezone.utc)

    def _final_status(self, stream: Stream) -> None:
        """Send the flush position and wait until the server has taken it (its keepalive answer)."""
        stream.send_status(reply=True)
        deadline = time.monotonic() + 5
        for item in stream.messages(0.05):
            if item is KEEPALIVE or time.monotonic() > deadline:
                break

    def _look_around(self, source: Source, stream: Stream) -> None:
        """The periodic chores: status update, new tables, statistics, partitions (when idle)."""
        cfg = self.config
        now = time.monotonic()
        if stream.status_dirty or now - stream.last_status >= cfg.heartbeat_interval:
            stream.send_status()
        if now - self._last_refresh >= cfg.refresh_interval:
            self._last_refresh = now
            source.refresh_tables()
            source.forget_catalog()
        if now - self._last_stats >= cfg.stats_interval:
            self._last_stats = now
            self.stats.slot_retained_wal_bytes = source.retained_wal_bytes()
        self._maintain_partitions()
        self._count_skips()

    def _count_skips(self) -> None:
        """What the stitcher skipped or stored as text, for the metrics (it counts across reconnects)."""
        stats, stitcher = self.stats, self.stitcher
        stats.dropped_contexts = stitcher.bad_contexts
        stats.skipped_messages = stitcher.skipped_messages
        stats.values_as_text = stitcher.bad_values

    def _flush_rows(self, batch: _Batch) -> None:
        """COPY the decoded rows into the open destination transaction."""
        rows = batch.rows
        if rows and self.row_filter is not None:
            rows[:] = self.row_filter(rows)
        if not rows:
            batch.rows_bytes = batch.counted = 0
            return
        _source, sink, _stream = self._ready()
        queued_at = datetime.now(timezone.utc)
        began = time.monotonic()
        try:
            self._write_rows(sink, rows, queued_at)
        finally:
            self._log_busy += time.monotonic() - began
        batch.pending += len(rows)
        rows.clear()
        batch.rows_bytes = batch.counted = 0

    def _write_rows(self, sink: Sink, rows: list, queued_at: datetime) -> None:
        if self._careful_through and rows[0].position <= self._careful_through:
            failed = sink.write_careful(rows, queued_at)
            for row, error in failed:
                log.error("dead letter: change %d of the transaction committed at %s (%s.%s %s, primary key %s) "
                          "was rejected by the destination: %s; stored in _bemi_worker_failures",
                          row.change_index, po.int_to_lsn(row.commit_position), shown(row.schema), shown(row.table),
                          row.operation, shown(row.primary_key), _one_line(error))
        else:
            try:
                sink.write(rows, queued_at)
            except psycopg.Error as exc:
                if is_rejection(exc):
                    raise _Poison(rows[-1].position, exc) from exc
                raise

    def _commit(self, batch: _Batch) -> None:
        source, sink, stream = self._ready()
        if batch.unsaved is None:
            return
        commit, xid = batch.unsaved
        self._flush_rows(batch)
        if batch.pending or sink.pending_dead:
            dead = sink.pending_dead
            began = time.monotonic()
            try:
                written = sink.commit(commit, xid, batch.pending)
            except psycopg.Error as exc:
                if is_rejection(exc):
                    raise _Poison(commit.commit_lsn, exc) from exc
                raise
            stats = self.stats
            stats.written.update(written)
            stats.dead_letters += dead
            count = batch.pending
            self.written += count
            self.stitcher.skip_through = commit.commit_lsn
            self._log_busy += time.monotonic() - began
            self._log_changes += count
            if time.monotonic() - self._log_at >= 1.0:
                self._log_written(commit)
        if commit.end_lsn >= self._careful_through:
            self._careful_through = 0
        self._log_commit = commit
        stats = self.stats
        self._count_skips()
        stats.last_commit_lsn = commit.end_lsn
        stats.last_commit_time = commit.commit_time
        stream.confirm(commit.end_lsn)
        stream.send_status()  # no round trip: the server may recycle WAL at once
        self._commits += 1
        batch.pending = 0
        batch.unsaved = None
        batch.started = time.monotonic()


    def _log_written(self, commit: po.Commit | None = None) -> None:
        """One log line for the commits since the last one (at most one a second).

        The time is the time spent writing them (COPY and commit), not the
        time since the last line: an idle worker that stores one change after
        ten quiet seconds wrote it in milliseconds, not at 0 changes/s.
        """
        commit = commit or self._log_commit
        self._log_at = time.monotonic()
        if not self._log_changes or commit is None:
            return
        count, self._log_changes = self._log_changes, 0
        busy, self._log_busy = max(self._log_busy, 1e-6), 0.0
        lag_seconds = (datetime.now(timezone.utc) - commit.commit_time).total_seconds()
        lag_bytes = max(self.stats.server_wal_end - commit.end_lsn, 0)
        chain = self.sink.chain if self.sink is not None else None
        head = f"; chain head {chain.head.hex()}" if chain is not None else ""
        log.info("wrote %s in %.3f s (%.0f changes/s); up to %s; lag %d bytes, %.1f s%s",
                 counted(count, "change"), busy, count / busy, po.int_to_lsn(commit.end_lsn),
                 lag_bytes, max(lag_seconds, 0.0), head)


class _Stopped(Exception):
    pass


def _one_line(exc: BaseException) -> str:
    return shown(" ".join(str(exc).split()) or type(exc).__name__)


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionLost, psycopg.OperationalError, psycopg.InterfaceError, OSError))


def _python_encoding(pg_encoding: str) -> str:
    from psycopg._encodings import pg2pyenc

    try:
        return pg2pyenc(pg_encoding.encode())
    except Exception:
        return "utf-8"


def configure_logging(verbosity: int = 1) -> None:
    """Log lines of the worker to stderr (unless the application configured a handler)."""
    logger = logging.getLogger("bemi.worker")
    logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s bemi-worker %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def main_loop(config: Config) -> int:
    """Run a worker with signal handling: the first SIGINT/SIGTERM stops after the transaction in hand,
    a second one aborts at once (the open destination transaction is rolled back: nothing is lost)."""
    worker = Worker(config)
    return run_process(worker, config.metrics_host, config.metrics_port,
                       stopped=lambda: f"stopped; {worker.written} changes written",
                       aborted="aborted: the batch in hand was rolled back and will be read again")
