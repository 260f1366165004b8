"""The source side: the replication stream of one slot, and the catalog lookups decoding needs (I/O).

Two connections to the source database:

* ``control``, an ordinary session: privileges, who holds the slot,
  the publication, slot state, primary keys and types from the catalog;
* the stream, a ``replication=database`` connection (a walsender): it creates
  the slot (``CREATE_REPLICATION_SLOT ... LOGICAL pgoutput``) and reads it with
  ``START_REPLICATION SLOT ... LOGICAL``. CopyData messages are read as they
  arrive through libpq (psycopg >= 3.3 gives the COPY_BOTH result back;
  ``psycopg.pq``'s ``get_copy_data``/``put_copy_data``/``flush`` do the rest).
  The worker answers keepalives and sends standby status updates whose flush
  position is the end of the last source transaction stored in the destination.

Every connection pins ``search_path = pg_catalog, pg_temp`` before anything
else, and the queries qualify catalog functions and cast their parameters to
the exact types, so no function planted in another schema can be called.
"""

from __future__ import annotations

import logging
import re
import select
import struct
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import psycopg
from psycopg import errors, pq

from bemi.worker import pgoutput as po
from bemi.worker.errors import WorkerError
from bemi.worker.publication import MANAGED_PUBLICATION_COMMENT, Publication
from bemi.worker.session import SESSION_SETTINGS, connect, decoding_memory, one_row
from bemi.worker.slot import SlotHolder, SlotState, check_slot
from bemi.worker.stats import WorkerStats
from bemi.worker.unstream import STREAM_KINDS, StreamError, Unstreamer
from bemi.worker.values import BUILTIN_TYPES, TypeSpec

__all__ = ["Source", "Stream", "SlotInUse", "WorkerError", "SESSION_SETTINGS", "MANAGED_PUBLICATION_COMMENT",
           "ConnectionLost", "KEEPALIVE", "MIN_PSYCOPG", "STATUS_PEEK_WAIT", "connect"]

log = logging.getLogger("bemi.worker")

#: The psycopg release whose ``execute()`` accepts START_REPLICATION (COPY_BOTH).
MIN_PSYCOPG = (3, 3)

#: Seconds a starting worker waits for ``bemi-worker status`` to release the slot it peeks at.
STATUS_PEEK_WAIT = 15.0
SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}\Z")  # what PostgreSQL accepts as a slot name

_XLOGDATA = struct.Struct(">QQq")  # 'w': data start, WAL end, send time
_KEEPALIVE_MSG = struct.Struct(">QqB")  # 'k': WAL end, send time, reply requested
_STATUS = struct.Struct(">cQQQqB")  # 'r': written, flushed, applied, clock, reply requested
PG_EPOCH_US = 946_684_800 * 1_000_000

#: What ``Stream.messages()`` yields after a keepalive (its WAL end is ``Stream.keepalive_end``).
KEEPALIVE = object()


class ConnectionLost(psycopg.OperationalError):
    """The replication stream ended or broke: reconnect and resume from the checkpoint."""


class SlotInUse(Exception):
    """START_REPLICATION found the slot held by another process (another worker, a status peek)."""


def _now_pg() -> int:
    return int(time.time() * 1_000_000) - PG_EPOCH_US


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _repl_string(value: str) -> str:
    """A string literal of the replication command grammar (no E'' escapes there)."""
    return "'" + value.replace("'", "''") + "'"


class Source:
    """The source database's control session; ``open_stream()`` opens the replication stream."""

    def __init__(self, dsn: str, slot: str, publication: str, decoding_memory_kb: int = 0) -> None:
        if not SLOT_NAME.match(slot):
            raise WorkerError(f"invalid slot name {slot!r}: use lower-case letters, digits and underscores "
                              "(at most 63)")
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.decoding_memory_kb = decoding_memory_kb  # the walsender's logical_decoding_work_mem (0: the server's)
        self.control = connect(dsn, "source")
        row = one_row(self.control.execute(
            "SELECT pg_catalog.current_database()::text, CURRENT_USER::text, r.rolsuper, r.rolreplication, "
            "pg_catalog.current_setting('wal_level'), pg_catalog.current_setting('server_encoding'), "
            "d.oid::int8 "
            "FROM pg_catalog.pg_roles r, pg_catalog.pg_database d "
            "WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER "
            "AND d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()"
        ))
        self.database, self.user, self.superuser, self.replication, wal_level, self.encoding, self.db_oid = row
        if wal_level != "logical":
            raise WorkerError(
                f"wal_level is {wal_level!r} on the source: run ALTER SYSTEM SET wal_level = logical; "
                "and restart PostgreSQL"
            )
        self._pk_cache: dict[tuple, list[str]] = {}
        self.publisher = Publication(self.control, publication, self.user, self.database, self.superuser)
        self.system_id: str | None = None
        self.stream: Stream | None = None

    @property
    def identity(self) -> str:
        """What is unique to this source database: the cluster's system identifier and the database oid."""
        if self.system_id is None:
            raise RuntimeError("identify() has not run")
        return f"{self.system_id}/{self.db_oid}"

    def close(self) -> None:
        """Close the stream, wait (briefly) until its walsender has released the slot, close the rest."""
        if self.stream is not None:
            pid = self.stream.conn.info.backend_pid
            self.stream.close()
            self.stream = None
            deadline = time.monotonic() + 10
            try:
                while time.monotonic() < deadline and self.control.execute(
                        "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name OPERATOR(pg_catalog.=) "
                        "%s::name AND active_pid OPERATOR(pg_catalog.=) %s::int4", [self.slot, pid]).fetchone():
                    time.sleep(0.01)
            except psycopg.Error:
                pass
        try:
            self.control.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass

    # -- one worker per slot ---------------------------------------------------------------

    def slot_holder(self) -> SlotHolder | None:
        """Who holds the slot now (an active walsender, or a session decoding it), or None.

        Only a role with REPLICATION (or a superuser) can hold a slot: this, not a lock any role
        could take, is what keeps two workers from reading one slot."""
        row = self.control.execute(
            "SELECT s.active_pid, a.application_name::text, a.backend_start "
            "FROM pg_catalog.pg_replication_slots s "
            "LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) s.active_pid "
            "WHERE s.slot_name OPERATOR(pg_catalog.=) %s::name AND s.active", [self.slot],
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return SlotHolder(int(row[0]), row[1] or "", row[2])

    # -- privileges, publication, slot ------------------------------------------------------

    @property
    def all_tables(self) -> bool:
        return self.publisher.all_tables

    def ensure_publication(self) -> None:
        self.publisher.ensure_publication()

    def refresh_tables(self) -> list[str]:
        return self.publisher.refresh_tables()

    def check_privileges(self) -> None:
        if not (self.superuser or self.replication):
            raise WorkerError(
                f"role {self.user!r} cannot read replication slots: it needs the REPLICATION attribute. "
                f"As a superuser run: ALTER ROLE {_quote_ident(self.user)} REPLICATION;"
            )

    def slot_state(self) -> SlotState | None:
        row = self.control.execute(
            "SELECT plugin::text, database::text, wal_status, "
            "(confirmed_flush_lsn OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::int8 "
            "FROM pg_catalog.pg_replication_slots WHERE slot_name OPERATOR(pg_catalog.=) %s::name", [self.slot],
        ).fetchone()
        return SlotState(*row) if row else None

    def open_stream(self, stats: WorkerStats | None = None) -> Stream:
        """The replication connection (not streaming yet); learns the system identifier."""
        if self.stream is not None:
            try:
                self.stream.conn.close()
            except Exception:  # pragma: no cover
                pass
        memory = decoding_memory(self.decoding_memory_kb) if self.decoding_memory_kb > 0 else None
        conn = connect(self.dsn, "source", memory, replication="database")
        row = one_row(conn.execute("IDENTIFY_SYSTEM"))
        self.system_id = str(row[0])
        self.stream = Stream(conn, self.slot, self.publication, stats or WorkerStats())
        return self.stream

    def ensure_slot(self, checkpoint_lsn: int | None) -> SlotState:
        """The slot, created when missing; never recreated once changes were written from it."""
        state = self.slot_state()
        if state is None:
            if checkpoint_lsn is not None:
                raise WorkerError(
                    f"replication slot {self.slot!r} is missing, but changes up to {po.int_to_lsn(checkpoint_lsn)} "
                    "were already written from it: changes since then may be lost and a new slot would hide "
                    "that. If you accept the gap, delete the checkpoint row in _bemi_worker_checkpoints "
                    f"(slot = {_repl_string(self.slot)}, database = {_repl_string(self.database)}) and start again."
                )
            if self.stream is None:
                raise RuntimeError("open_stream() first")
            try:
                self.stream.conn.execute(f'CREATE_REPLICATION_SLOT "{self.slot}" LOGICAL pgoutput NOEXPORT_SNAPSHOT')
            except errors.DuplicateObject:  # another worker, starting at the same moment, made it first
                self.stream.conn.rollback()
                state = self.slot_state()
                if state is None:
                    raise WorkerError(f"replication slot {self.slot!r} was dropped right after another worker "
                                      "created it") from None
                check_slot(state, self.slot, self.database)
                return state
            except errors.InsufficientPrivilege as exc:
                raise WorkerError(
                    f"cannot create replication slot {self.slot!r}: role {self.user!r} needs the REPLICATION "
                    f"attribute (ALTER ROLE {_quote_ident(self.user)} REPLICATION;): {exc}"
                ) from exc
            log.info("created replication slot %s (pgoutput) on database %s", self.slot, self.database)
            state = self.slot_state()
            if state is None:  # dropped by someone else in between
                raise WorkerError(f"replication slot {self.slot!r} was dropped right after the worker created it")
        check_slot(state, self.slot, self.database)
        return state

    def current_wal_lsn(self) -> int:
        return one_row(self.control.execute(
            "SELECT (pg_catalog.pg_current_wal_flush_lsn() OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::int8"
        ))[0]

    def retained_wal_bytes(self) -> int:
        row = self.control.execute(
            "SELECT (pg_catalog.pg_current_wal_lsn() OPERATOR(pg_catalog.-) restart_lsn)::int8 "
            "FROM pg_catalog.pg_replication_slots WHERE slot_name OPERATOR(pg_catalog.=) %s::name", [self.slot],
        ).fetchone()
        return int(row[0] or 0) if row else 0

    def lag_bytes(self, lsn: int) -> int:
        return one_row(self.control.execute(
            "SELECT (pg_catalog.pg_current_wal_lsn() OPERATOR(pg_catalog.-) %s::pg_catalog.pg_lsn)::int8",
            [po.int_to_lsn(lsn)],
        ))[0]

    # -- catalog ----------------------------------------------------------------------------

    def forget_catalog(self) -> None:
        self._pk_cache.clear()

    def primary_key(self, rel: po.Relation) -> list[str]:
        """Primary key column names of a relation (from the catalog, cached per relation shape)."""
        key = (rel.relid, tuple(c.name for c in rel.columns))
        names = self._pk_cache.get(key)
        if names is None:
            names = [r[0] for r in self.control.execute(
                "SELECT a.attname::text FROM pg_catalog.pg_index i "
                "CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
                "JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid "
                "AND a.attnum OPERATOR(pg_catalog.=) k.attnum "
                "WHERE i.indrelid OPERATOR(pg_catalog.=) %s::oid AND i.indisprimary ORDER BY k.ord", [rel.relid],
            ).fetchall()]
            self._pk_cache[key] = names
        return names

    def type_spec(self, oid: int) -> TypeSpec | None:
        """How to_jsonb shapes a type that is not built in (domains, enums, arrays...)."""
        row = self.control.execute(
            "SELECT t.typtype, t.typbasetype::int8, t.typelem::int8, e.typdelim, "
            "t.typsubscript OPERATOR(pg_catalog.=) 'pg_catalog.array_subscript_handler'::pg_catalog.regproc "
            "FROM pg_catalog.pg_type t LEFT JOIN pg_catalog.pg_type e ON e.oid OPERATOR(pg_catalog.=) t.typelem "
            "WHERE t.oid OPERATOR(pg_catalog.=) %s::oid", [oid],
        ).fetchone()
        if row is None:
            return None
        typtype, base, elem, delim, is_array = row
        if typtype == "d":
            return BUILTIN_TYPES.get(base) or self.type_spec(base)
        if is_array and elem:
            return TypeSpec("array", elem, delim or ",")
        if typtype == "c":
            fields = self.control.execute(
                "SELECT a.attname::text, a.atttypid::int8 FROM pg_catalog.pg_type t "
                "JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) t.typrelid "
                "WHERE t.oid OPERATOR(pg_catalog.=) %s::oid AND a.attnum OPERATOR(pg_catalog.>) 0 "
                "AND NOT a.attisdropped ORDER BY a.attnum", [oid],
            ).fetchall()
            return TypeSpec("composite", fields=tuple((name, int(typ)) for name, typ in fields))
        return TypeSpec("string")


class Stream:
    """One ``START_REPLICATION`` of the slot over a replication connection."""

    def __init__(self, conn: psycopg.Connection, slot: str, publication: str, stats: WorkerStats) -> None:
        self.conn = conn
        self.slot = slot
        self.publication = publication
        self.stats = stats
        self.pgconn = conn.pgconn
        self.received = 0  # WAL position read so far (the "written" position of status updates)
        self.flushed = 0  # end of the last source transaction stored (the "flush" position)
        self.keepalive_end = 0  # WAL end of the last keepalive
        self.last_status = 0.0
        self.status_dirty = False
        self.unstreamer = Unstreamer()  # transactions streamed before their commit (protocol version 2)

    def start(self, start_lsn: int) -> None:
        publications = _repl_string(_quote_ident(self.publication))
        self.flushed = self.received = start_lsn
        try:
            cur = self.conn.execute(
                f'START_REPLICATION SLOT "{self.slot}" LOGICAL {po.int_to_lsn(start_lsn)} '
                f"(proto_version '2', streaming 'on', publication_names {publications}, messages 'true')"
            )
        except errors.UndefinedObject as exc:
            raise WorkerError(f"replication slot {self.slot!r} was dropped; the worker will not recreate it "
                              f"({exc})".strip()) from exc
        except errors.ObjectInUse as exc:
            raise SlotInUse(str(exc).strip()) from exc
        if cur.pgresult is None or cur.pgresult.status != pq.ExecStatus.COPY_BOTH:
            raise ConnectionLost("START_REPLICATION did not start a COPY_BOTH stream")
        self.stats.streaming = True

    def messages(self, idle_timeout: float) -> Iterator[tuple[int, bytes | memoryview] | object | None]:
        """(LSN, pgoutput message) pairs as they arrive; ``None`` when nothing is buffered (idle),
        after at most ``idle_timeout`` seconds of waiting; ``KEEPALIVE`` after a keepalive.

        A logical message (``M``) is handed over as a ``memoryview`` of libpq's buffer (so a large
        one is not copied); everything else as ``bytes``.
        """
        pg = self.pgconn
        get = pg.get_copy_data
        stats = self.stats
        unpack_w = _XLOGDATA.unpack_from
        fileno = pg.socket
        monotonic = time.monotonic
        unstreamer = self.unstreamer
        while True:
            try:
                nbytes, buf = get(1)
            except psycopg.OperationalError as exc:
                raise ConnectionLost(f"the replication connection broke: {exc}".strip()) from exc
            if nbytes > 0:
                kind = buf[0]
                if kind == 0x77:  # 'w' XLogData
                    start, wal_end, _sent = unpack_w(buf, 1)
                    if wal_end > stats.server_wal_end:
                        stats.server_wal_end = wal_end
                    if start > self.received:
                        self.received = start
                    stats.last_message_at = monotonic()
                    payload = buf[25:]
                    if unstreamer.current is not None or payload[0] in STREAM_KINDS:
                        if unstreamer.keep(start, payload):  # a change of a transaction still running
                            continue
                        try:
                            yield from unstreamer.take(start, payload)
                        except StreamError as exc:  # the server streams it again from its start
                            raise ConnectionLost(f"the replication stream is out of step: {exc}") from exc
                        continue
                    yield start, (payload if payload[0] == 0x4D else bytes(payload))
                elif kind == 0x6B:  # 'k' primary keepalive
                    wal_end, _sent, reply = _KEEPALIVE_MSG.unpack_from(buf, 1)
                    self.keepalive_end = wal_end
                    if wal_end > stats.server_wal_end:
                        stats.server_wal_end = wal_end
                    stats.last_message_at = time.monotonic()
                    if reply:
                        self.send_status()
                    yield KEEPALIVE
                continue
            if nbytes == 0:
                # A millisecond of grace: a backlog arrives with tiny gaps, which should not
                # end a batch; a lone transaction waits that much longer for its commit.
                if not _readable(fileno, 0.001):
                    yield None  # idle: the loop commits what it holds, sends status...
                    if not _readable(fileno, idle_timeout):
                        continue
                try:
                    pg.consume_input()
                except psycopg.OperationalError as exc:
                    raise ConnectionLost(f"the replication connection broke: {exc}".strip()) from exc
                continue
            # -1: the server ended the COPY (shutdown, or a terminated walsender); -2: error
            res = pg.get_result()
            message = ""
            if res is not None and res.error_message:
                message = res.error_message.decode("utf-8", "replace").strip()
            else:
                message = pg.error_message.decode("utf-8", "replace").strip()
            raise ConnectionLost(f"the replication stream ended: {message or 'end of stream'}")

    def confirm(self, lsn: int) -> None:
        """Everything before ``lsn`` is stored: say so at the next status update."""
        if lsn > self.flushed:
            self.flushed = lsn
            if lsn > self.received:
                self.received = lsn
            self.status_dirty = True

    def send_status(self, reply: bool = False) -> None:
        msg = _STATUS.pack(b"r", self.received, self.flushed, self.flushed, _now_pg(), 1 if reply else 0)
        pg = self.pgconn
        try:
            if pg.put_copy_data(msg) != 1:
                raise ConnectionLost("cannot send a status update to the server")
            while pg.flush() == 1:
                select.select([], [pg.socket], [], 1.0)
        except psycopg.OperationalError as exc:
            raise ConnectionLost(f"the replication connection broke: {exc}".strip()) from exc
        self.last_status = time.monotonic()
        self.status_dirty = False

    def close(self) -> None:
        self.stats.streaming = False
        self.unstreamer.close()
        try:
            self.conn.close()
        except Exception:  # pragma: no cover
            pass


def _readable(fileno: int, timeout: float) -> bool:
    try:
        return bool(select.select([fileno], [], [], timeout)[0])
    except (OSError, ValueError):
        return True  # let libpq report what is wrong with the socket


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
