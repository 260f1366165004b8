"""The source side: publication, replication slot, reading and advancing (I/O).

psycopg 3 has no replication-protocol API, so the slot is read with the SQL
function ``pg_logical_slot_peek_binary_changes`` through a server-side cursor
(fetched in chunks: a huge transaction never has to fit in memory), and moved
on with ``pg_replication_slot_advance`` only after the destination commit.
The SQL decoding functions only see WAL that is flushed to disk.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator

import psycopg
from psycopg import errors

from bemi.worker import pgoutput as po
from bemi.worker.errors import SlotState, WorkerError, check_slot, one_row
from bemi.worker.publication import MANAGED_PUBLICATION_COMMENT, Publication
from bemi.worker.values import BUILTIN_TYPES, TypeSpec

__all__ = ["Source", "SlotState", "WorkerError", "SESSION_SETTINGS", "check_slot", "one_row",
           "MANAGED_PUBLICATION_COMMENT"]

log = logging.getLogger("bemi.worker")

#: The decoding session's settings: type output functions run in our backend,
#: so values come out as in a UTC session with default styles (what to_jsonb shows).
SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lock_timeout": "5s",
}
LOCK_CLASS = 0x62656D69  # 'bemi'


def _connect(dsn: str, autocommit: bool) -> psycopg.Connection:
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, application_name="bemi-worker")
    except psycopg.OperationalError as exc:
        raise WorkerError(f"cannot connect to the source database: {exc}".strip()) from exc
    with conn.cursor() as cur:
        for name, value in SESSION_SETTINGS.items():
            cur.execute("SELECT set_config(%s, %s, false)", [name, value])
    if not autocommit:
        conn.commit()
    return conn


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Source:
    """The source database: one connection reads the slot, one runs everything else."""

    def __init__(self, dsn: str, slot: str, publication: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.control = _connect(dsn, autocommit=True)
        self.reader = _connect(dsn, autocommit=False)
        row = one_row(self.control.execute(
            "SELECT current_database(), current_user, r.rolsuper, r.rolreplication, "
            "current_setting('wal_level'), current_setting('server_encoding') "
            "FROM pg_roles r WHERE r.rolname = current_user"
        ))
        self.database, self.user, self.superuser, self.replication, wal_level, self.encoding = row
        if wal_level != "logical":
            raise WorkerError(
                f"wal_level is {wal_level!r} on the source: run ALTER SYSTEM SET wal_level = logical; "
                "and restart PostgreSQL"
            )
        self._pk_cache: dict[tuple, list[str]] = {}
        self.publisher = Publication(self.control, publication, self.user, self.database, self.superuser)

    def close(self) -> None:
        for conn in (self.reader, self.control):
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing a broken connection
                pass

    # -- one worker per slot ---------------------------------------------------------------

    @property
    def _lock_key(self) -> int:
        return zlib.crc32(f"{self.database}/{self.slot}".encode()) & 0x7FFFFFFF

    def lock(self) -> None:
        """Take the advisory lock of this slot, or explain who holds it."""
        got = one_row(self.control.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_CLASS, self._lock_key]))[0]
        if got:
            return
        holder = self.control.execute(
            "SELECT l.pid, a.client_addr::text, a.backend_start FROM pg_locks l "
            "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND l.granted",
            [LOCK_CLASS, self._lock_key],
        ).fetchone()
        who = f" (its connection is backend pid {holder[0]}, since {holder[2]:%Y-%m-%d %H:%M:%S})" if holder else ""
        raise WorkerError(
            f"another bemi worker is already reading slot {self.slot!r} of database {self.database!r}{who}; "
            "only one worker may run per slot. Stop it first, or use another --slot.",
            exit_code=3,
        )

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
            "SELECT plugin, database, wal_status, (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 "
            "FROM pg_replication_slots WHERE slot_name = %s", [self.slot],
        ).fetchone()
        return SlotState(*row) if row else None

    def ensure_slot(self, checkpoint_lsn: int | None) -> SlotState:
        """The slot, created when missing; never recreated once changes were written from it."""
        state = self.slot_state()
        if state is None:
            if checkpoint_lsn is not None:
                raise WorkerError(
                    f"replication slot {self.slot!r} is missing, but changes up to {po.int_to_lsn(checkpoint_lsn)} "
                    "were already written from it: changes since then may be lost and a new slot would hide "
                    "that. If you accept the gap, delete the checkpoint row in _bemi_worker_checkpoints "
                    f"(slot = '{self.slot}', database = '{self.database}') and start again."
                )
            try:
                self.control.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [self.slot])
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

    # -- reading and advancing ---------------------------------------------------------------

    def read(self, fetch_rows: int) -> Iterator[list[tuple[int, bytes]]]:
        """Everything the slot holds now, in chunks of (LSN, pgoutput message) pairs."""
        publications = _quote_ident(self.publication)
        cur = self.reader.cursor(name="bemi_slot", binary=True)
        try:
            cur.execute(
                "SELECT (lsn - '0/0'::pg_lsn)::int8, data FROM pg_logical_slot_peek_binary_changes("
                "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
                [self.slot, publications],
            )
            while True:
                try:
                    rows = cur.fetchmany(fetch_rows)
                except errors.UndefinedObject as exc:
                    raise WorkerError(f"replication slot {self.slot!r} disappeared while reading: {exc}") from exc
                except errors.ObjectInUse as exc:
                    raise WorkerError(f"replication slot {self.slot!r} is used by another process: {exc}",
                                      exit_code=3) from exc
                if not rows:
                    break
                yield rows
        finally:
            try:
                cur.close()
                self.reader.rollback()
            except psycopg.Error:
                pass

    def advance(self, lsn: int) -> None:
        """Confirm everything before ``lsn`` (never moves the slot backwards)."""
        self.control.execute(
            "SELECT pg_replication_slot_advance(slot_name, GREATEST(confirmed_flush_lsn, %s::pg_lsn)) "
            "FROM pg_replication_slots WHERE slot_name = %s",
            [po.int_to_lsn(lsn), self.slot],
        )

    def heartbeat(self) -> None:
        self.control.execute("SELECT pg_logical_emit_message(true, '_bemi_heartbeat', now()::text)")

    def lag_bytes(self, lsn: int) -> int:
        return one_row(self.control.execute(
            "SELECT (pg_current_wal_lsn() - %s::pg_lsn)::int8", [po.int_to_lsn(lsn)]
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
                "SELECT a.attname FROM pg_index i "
                "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord", [rel.relid],
            ).fetchall()]
            self._pk_cache[key] = names
        return names

    def type_spec(self, oid: int) -> TypeSpec | None:
        """How to_jsonb shapes a type that is not built in (domains, enums, arrays...)."""
        row = self.control.execute(
            "SELECT t.typtype, t.typbasetype, t.typelem, e.typdelim, "
            "t.typsubscript = 'array_subscript_handler'::regproc "
            "FROM pg_type t LEFT JOIN pg_type e ON e.oid = t.typelem WHERE t.oid = %s", [oid],
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
                "SELECT a.attname, a.atttypid FROM pg_type t JOIN pg_attribute a ON a.attrelid = t.typrelid "
                "WHERE t.oid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum", [oid],
            ).fetchall()
            return TypeSpec("composite", fields=tuple((name, int(typ)) for name, typ in fields))
        return TypeSpec("string")
