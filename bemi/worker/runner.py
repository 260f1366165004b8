"""The worker loop: read the slot, stitch, write, commit, advance; heartbeat; signals; logs."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg

from bemi.worker import pgoutput as po
from bemi.worker.sink import Sink
from bemi.worker.errors import WorkerError, check_slot
from bemi.worker.slot import Source
from bemi.worker.stitch import ChangeRow, Stitcher
from bemi.worker.values import JsonValues

__all__ = ["Config", "Worker", "WorkerError", "main_loop", "configure_logging"]

log = logging.getLogger("bemi.worker")


@dataclass
class Config:
    source_dsn: str
    destination_dsn: str | None = None  # None: the source database
    slot: str = "bemi"
    publication: str = "bemi"
    once: bool = False
    batch_rows: int = 10_000  # commit the destination after this many changes (at a transaction end)
    copy_rows: int = 2_000  # rows per COPY (and per fetch from the slot)
    poll_interval: float = 0.1  # seconds between reads of an idle slot
    heartbeat_interval: float = 10.0  # idle seconds before a heartbeat message
    refresh_interval: float = 1.0  # seconds between checks for new tables


class Worker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.source: Source | None = None
        self.sink: Sink | None = None
        self.stopping = threading.Event()
        self.written = 0  # changes written since start
        self._last_refresh = 0.0
        self._last_activity = time.monotonic()

    # -- lifecycle --------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        self.source = source = Source(cfg.source_dsn, cfg.slot, cfg.publication)
        source.check_privileges()
        source.lock()
        source.ensure_publication()
        self.sink = sink = Sink(cfg.destination_dsn or cfg.source_dsn, cfg.slot, source.database)
        sink.ensure_tables()
        checkpoint = sink.checkpoint()
        source.refresh_tables()
        self._last_refresh = time.monotonic()
        state = source.ensure_slot(checkpoint.commit_lsn if checkpoint else None)
        if checkpoint and checkpoint.end_lsn > state.confirmed_flush:
            # Stopped between the destination commit and the slot advance: catch the slot up.
            source.advance(checkpoint.end_lsn)
        self.values = JsonValues(source.type_spec, _python_encoding(source.encoding))
        self.stitcher = Stitcher(self.values, source.primary_key,
                                 skip_through=checkpoint.commit_lsn if checkpoint else 0)
        log.info("reading slot %s (publication %s) of database %s; writing changes to database %s",
                 cfg.slot, cfg.publication, source.database, sink.conn.info.dbname)

    def _ready(self) -> tuple[Source, Sink]:
        """The source and the sink, which setup() opened."""
        if self.source is None or self.sink is None:
            raise RuntimeError("Worker.setup() has not run")
        return self.source, self.sink

    def close(self) -> None:
        if self.sink:
            self.sink.rollback()
            self.sink.close()
        if self.source:
            self.source.close()

    def stop(self) -> None:
        """Finish the source transaction in hand, commit, then return from run()."""
        self.stopping.set()

    def run(self) -> int:
        """Run until stopped (or once); returns the exit code."""
        try:
            self.setup()
            if self.config.once:
                self._drain_checked()
                return 0
            source, _sink = self._ready()
            while not self.stopping.is_set():
                now = time.monotonic()
                if now - self._last_refresh >= self.config.refresh_interval:
                    source.refresh_tables()
                    self._last_refresh = now
                started = time.monotonic()
                if self._drain_checked():
                    self._last_activity = time.monotonic()
                    continue
                if time.monotonic() - self._last_activity >= self.config.heartbeat_interval:
                    source.heartbeat()
                    self._last_activity = time.monotonic()
                    continue
                # An empty pass that took long was re-decoding old WAL (see docs/worker.md):
                # wait as long before the next one instead of keeping a server core busy.
                empty_pass = time.monotonic() - started
                self.stopping.wait(max(self.config.poll_interval, min(empty_pass, 5.0)))
            return 0
        finally:
            self.close()

    # -- one pass over the slot -------------------------------------------------------------

    def _drain_checked(self) -> int:
        """drain(), turning a slot that vanished or was invalidated meanwhile into a clear error."""
        try:
            return self.drain()
        except psycopg.Error as exc:
            source, _sink = self._ready()
            try:
                state = source.slot_state()
            except psycopg.Error:
                raise exc from None
            if state is None:
                raise WorkerError(f"replication slot {self.config.slot!r} was dropped while the worker was "
                                  f"reading it; the worker will not recreate it ({exc})") from exc
            check_slot(state, self.config.slot, source.database)
            raise

    def drain(self) -> int:
        """Read what the slot holds now and store it; returns the number of transactions seen.

        Rows are COPied into the open destination transaction in chunks (a huge
        source transaction never sits in memory); the destination commits only
        at the end of a source transaction, together with the checkpoint.
        """
        cfg = self.config
        source, sink = self._ready()
        stitcher = self.stitcher
        source.forget_catalog()
        rows: list[ChangeRow] = []
        pending = 0  # rows COPied into the open destination transaction
        unsaved: tuple[po.Commit, int | None] | None = None  # last commit not yet stored + advanced
        transactions = 0
        batch_started = time.monotonic()
        feed = stitcher.feed
        try:
            for chunk in source.read(cfg.copy_rows):
                queued_at = datetime.now(timezone.utc)
                for lsn, data in chunk:
                    commit = feed(lsn, data, rows)
                    if commit is None:
                        continue
                    transactions += 1
                    unsaved = (commit, stitcher.last_xid)
                    if pending + len(rows) >= cfg.batch_rows:
                        sink.write(rows, queued_at)
                        pending += len(rows)
                        rows.clear()
                        self._commit(commit, stitcher.last_xid, pending, batch_started)
                        pending, unsaved = 0, None
                        batch_started = time.monotonic()
                if len(rows) >= cfg.copy_rows:
                    sink.write(rows, queued_at)
                    pending += len(rows)
                    rows.clear()
                if self.stopping.is_set() and not stitcher.in_transaction:
                    break
            if stitcher.in_transaction:
                # Ended inside a source transaction (pgoutput never does that): store nothing
                # of this pass; the slot was not advanced past it, so it is read again.
                raise WorkerError("the slot's output ended inside a transaction", exit_code=1)
            if unsaved is not None:
                commit, xid = unsaved
                if rows:
                    sink.write(rows, datetime.now(timezone.utc))
                    pending += len(rows)
                    rows.clear()
                if pending:
                    self._commit(commit, xid, pending, batch_started)
                else:  # nothing to store (heartbeats, skipped or empty transactions)
                    source.advance(commit.end_lsn)
        except BaseException:
            sink.rollback()
            stitcher.reset()
            raise
        return transactions

    def _commit(self, commit: po.Commit, xid: int | None, count: int, started: float) -> None:
        source, sink = self._ready()
        sink.commit(commit, xid, count)
        self.stitcher.skip_through = commit.commit_lsn
        source.advance(commit.end_lsn)
        self.written += count
        elapsed = max(time.monotonic() - started, 1e-6)
        lag_seconds = (datetime.now(timezone.utc) - commit.commit_time).total_seconds()
        log.info("wrote %d changes in %.3f s (%.0f changes/s); up to %s; lag %d bytes, %.1f s",
                 count, elapsed, count / elapsed, po.int_to_lsn(commit.end_lsn),
                 source.lag_bytes(commit.end_lsn), max(lag_seconds, 0.0))


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
    """Run a worker with signal handling: the first SIGINT/SIGTERM stops after the batch in hand,
    a second one aborts at once (the open destination transaction is rolled back: nothing is lost)."""
    worker = Worker(config)

    def on_signal(signum, frame):
        if worker.stopping.is_set():
            raise KeyboardInterrupt
        log.info("received %s: finishing the batch in hand, then exiting", signal.Signals(signum).name)
        worker.stop()

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals can only be handled there
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = worker.run()
        log.info("stopped; %d changes written", worker.written)
        return code
    except WorkerError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.warning("aborted: the batch in hand was rolled back and will be read again")
        return 130
    except psycopg.Error as exc:
        log.error("database error: %s", exc)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
