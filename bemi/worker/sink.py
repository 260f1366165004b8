"""The destination side: ``changes`` rows and the checkpoint, in one transaction (I/O).

Exactly once rests on this: the rows of whole source transactions and the
checkpoint (the commit position of the last of them) commit together, and the
slot is advanced only afterwards. A crash before the commit loses nothing (the
slot still holds those transactions); a crash after it duplicates nothing (the
checkpoint says they are stored and they are skipped).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Callable

import psycopg
from psycopg import errors, sql
from psycopg.pq import TransactionStatus

from bemi import chainstore, relocate, tables
from bemi import sql as bemi_sql
from bemi.chain import Chain, epoch_micros
from bemi.trust import BEMI_TABLES, untrusted_tables
from bemi.worker import pgoutput as po
from bemi.worker.errors import Blocked, WorkerError
from bemi.worker.partitions import Partitions
from bemi.worker.session import connect, one_row
from bemi.worker.shown import qualified, shown
from bemi.worker.stitch import ChangeRow

__all__ = ["Sink", "Checkpoint", "CheckpointMoved", "is_rejection"]

log = logging.getLogger("bemi.worker")

#: The columns in the order Sink.write() puts them (the texts that may need escapes last).
COPY_CHANGES = (
    'COPY bemi.changes ("database", "operation", "context", "committed_at", "queued_at", "transaction_id", '
    '"position", "commit_position", "change_index", "chain_link", "primary_key", "schema", "table", "before", '
    '"after") FROM STDIN'
)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]")


#: Errors that mean "the destination rejects this change" (data exception, integrity
#: constraint, program limit such as an index row too large): a dead letter, not a fault.
REJECTION_CLASSES = ("22", "23", "54")


def is_rejection(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.Error) and isinstance(state, str) and state[:2] in REJECTION_CLASSES


class CheckpointMoved(psycopg.OperationalError):
    """Another worker stored changes from the slot since this one read the checkpoint: a fault
    (roll back, reconnect, read the checkpoint again), never a reason to store anything twice."""


def copy_text(value: str) -> str:
    """A value in COPY's text format (backslash, tab, newline and carriage return escaped)."""
    return value.translate(_COPY_ESCAPES) if _NEEDS_ESCAPE.search(value) else value


class Checkpoint:
    def __init__(self, commit_lsn: int, end_lsn: int) -> None:
        self.commit_lsn = commit_lsn
        self.end_lsn = end_lsn


class Sink:
    stores_changes = True  # the destination's ``changes`` (JetStreamSink: False, the ingesters store)

    def __init__(self, dsn: str, slot: str, database: str, source: str = "", chain: bool = True) -> None:
        # write() encodes the COPY data as UTF-8 (set in the round trip of the session settings)
        self.conn = connect(dsn, "destination", sql.SQL("SET client_encoding TO 'UTF8'"))
        self.conn.autocommit = False
        self.slot = slot
        self.database = database
        self.source = source  # unique to the source database (Source.identity)
        self.in_transaction = False
        self._cursor: psycopg.Cursor | None = None
        self._copy_cm: AbstractContextManager[psycopg.Copy] | None = None
        self._copy: psycopg.Copy | None = None
        self._prefix = copy_text(database)
        self.pending: Counter[tuple[str, str]] = Counter()  # rows written, not committed, by (table, op)
        self.pending_dead = 0  # dead letters written, not committed
        self._stored: int | None = None  # end_lsn of the checkpoint as last read or written (None: no row)
        #: Set by the runner when `changes` is partitioned (bemi/worker/partitions.py).
        self.partitions: Partitions | None = None
        #: The chain of this source database (bemi/chain.py), set by checkpoint(); None: not chained.
        self.chain: Chain | None = None
        self._chained = chain
        self._committed_head = b""  # the chain's head as of the last destination commit

    def describe(self) -> str:
        """Where changes go, for the worker's log (JetStreamSink says its stream)."""
        return f"database {self.conn.info.dbname}"

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # pragma: no cover
            pass

    def ensure_tables(self, before_commit: Callable[[psycopg.Connection], None] | None = None) -> None:
        """Create bemi's schema, ``changes`` (+ indexes) and the worker's tables when missing (moving
        those of an earlier version out of schema public), and say so.

        ``before_commit(conn)`` runs in the transaction that created them (the
        runner registers them there as bemi's own: ``TrackedTables.claim_new_tables``).
        """
        conn = self.conn
        self._ensure_schema()
        self._refuse_untrusted_tables()
        self._move_legacy_tables()
        names = ("bemi.changes", "bemi._bemi_worker_checkpoints", "bemi.changes_identity_index",
                 "bemi._bemi_worker_failures", "bemi._bemi_pruned")
        found = one_row(conn.execute(
            "SELECT " + ", ".join(["pg_catalog.to_regclass(%s::text) IS NOT NULL"] * len(names)), names))
        existed = {name.split(".")[1]: bool(there) for name, there in zip(names, found)}
        keyed = existed["_bemi_worker_checkpoints"] and one_row(conn.execute(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute WHERE attrelid OPERATOR(pg_catalog.=) "
            "'bemi._bemi_worker_checkpoints'::pg_catalog.regclass AND attname OPERATOR(pg_catalog.=) 'source' "
            "AND NOT attisdropped)"))[0]
        chained = all(existed.values()) and not chainstore.needs_upgrade(conn)
        if all(existed.values()) and keyed and chained:
            # Nothing to create: no DDL (it would need CREATE on the schema and take table locks).
            conn.rollback()
            return
        try:
            if existed["changes"]:
                self._upgrade_published_table()
            # With the session's search_path (pg_catalog, pg_temp): both files qualify bemi's own
            # objects, and nothing of schema public may be picked up, not even by the defaults of
            # `changes` (they run on every row the worker writes). bemi's event triggers pin their own.
            if not (existed["changes"] and existed["changes_identity_index"]):
                conn.execute(bemi_sql.read("changes.sql"))
            if existed["_bemi_worker_checkpoints"] and not keyed:
                self._upgrade_checkpoints()
            conn.execute(bemi_sql.read("worker.sql"))
            chainstore.ensure(conn)
            if before_commit is not None:
                before_commit(conn)
            conn.commit()
        except psycopg.errors.UndefinedFunction as exc:
            conn.rollback()
            # The event trigger of the published bemi-django calls its functions without a schema.
            raise WorkerError(
                f"cannot create the worker's tables in the destination: an event trigger failed ({exc}). "
                "If the published bemi-django was installed there, run python manage.py migrate bemi first "
                "(docs/upgrading.md): it replaces that event trigger with one that does not depend on the "
                "search_path."
            ) from exc
        except psycopg.errors.InsufficientPrivilege as exc:
            conn.rollback()
            raise WorkerError(f"cannot create the changes table in schema {tables.SCHEMA} of the destination: "
                              f"{exc}".strip() + f". To fix, {self._grants_hint()}.") from exc
        if not existed["changes"]:
            log.info("created table changes and its indexes in schema %s of database %s", tables.SCHEMA, conn.info.dbname)
        if not existed["_bemi_worker_checkpoints"]:
            log.info("created table _bemi_worker_checkpoints (the worker's checkpoint) in schema %s of database %s",
                     tables.SCHEMA, conn.info.dbname)
        if not existed["_bemi_worker_failures"]:
            log.info("created table _bemi_worker_failures (changes the destination rejected) in schema %s of database %s",
                     tables.SCHEMA, conn.info.dbname)

    def _grants_hint(self) -> str:
        me = self.conn.info.user
        return (f"have a superuser run `python manage.py bemi_grants --app-role <the application's role> "
                f"--worker-role {sql.Identifier(me).as_string(self.conn)}` (docs/security.md)")

    def _ensure_schema(self) -> None:
        """bemi's schema (tables.SCHEMA), made by this role when missing."""
        conn = self.conn
        if relocate.schema_owner(conn) is None:
            try:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(tables.schema()))
                conn.commit()
            except psycopg.errors.InsufficientPrivilege as exc:
                conn.rollback()
                me = sql.Identifier(conn.info.user).as_string(conn)
                raise WorkerError(
                    f"cannot create schema {tables.SCHEMA} for the changes table in the destination: run "
                    f"GRANT CREATE ON DATABASE {sql.Identifier(conn.info.dbname).as_string(conn)} TO {me}; or "
                    f"{self._grants_hint()}: {exc}".strip()) from exc
            log.info("created schema %s (changes and the worker's tables) in database %s", tables.SCHEMA,
                     conn.info.dbname)
        conn.rollback()

    def _move_legacy_tables(self) -> None:
        """Move bemi's tables of an earlier version from schema public into bemi's schema.

        Only tables this role may move (owns, or is a superuser); one a superuser or another
        worker's role made stops the worker with what to run (its history must not be left
        behind); one another role made is not bemi's and is left alone."""
        conn = self.conn
        superuser = one_row(conn.execute(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) CURRENT_USER"))[0]
        legacy = relocate.legacy_tables(conn)
        conn.rollback()
        movable = [t for t in legacy if (t.mine or superuser) and t.kind in ("r", "p")]
        stuck = [t for t in legacy if t not in movable and t.trusted_owner]
        for t in legacy:
            if t not in movable and t not in stuck:
                log.warning("left %s alone: role %s made it, not a worker (bemi's tables live in schema %s)",
                            qualified(tables.LEGACY_SCHEMA, t.name), shown(t.owner), tables.SCHEMA)
        if stuck:
            listed = ", ".join(f"{qualified(tables.LEGACY_SCHEMA, t.name)} (owner {t.owner!r})" for t in stuck)
            raise WorkerError(
                f"bemi's tables of an earlier version are in schema {tables.LEGACY_SCHEMA} and this role may not "
                f"move them into schema {tables.SCHEMA}: {listed}. To move them, {self._grants_hint()}.")
        if not movable:
            return
        with conn.transaction():
            for statement in relocate.move_statements(movable):
                conn.execute(statement)
        conn.commit()
        log.warning("moved %s from schema %s into schema %s (owned by the worker's role: the application's role "
                    "cannot drop them there; docs/security.md)", ", ".join(shown(t.name) for t in movable),
                    tables.LEGACY_SCHEMA, tables.SCHEMA)

    def _refuse_untrusted_tables(self) -> None:
        """bemi's schema and tables must be owned by this role or a superuser.

        They are created with ``CREATE ... IF NOT EXISTS``: a role that could make one first could
        give it a trigger, a rule or a default that the worker would then run with its own
        privileges on every write (bemi/trust.py).
        """
        conn = self.conn
        rows = untrusted_tables(conn, BEMI_TABLES, strict=True)
        conn.rollback()
        if rows:
            me = conn.info.user
            listed = ", ".join(t.why for t in rows)
            raise Blocked(
                f"refusing to write to bemi's tables: {listed}. Their owner could run code with the worker's "
                f"privileges (role {me!r}) through a trigger, rule or default on them, or rewrite them. "
                f"Check them (\\dn+ and \\d+ in psql); to fix, {self._grants_hint()}: it sets aside what the "
                "worker may not trust, and makes the worker's role the owner of the rest."
            )

    def _upgrade_checkpoints(self) -> None:
        """A checkpoint table keyed by (slot, database name): key it by (source, slot) instead.

        Its rows get their ``source`` when their worker starts (``checkpoint()``
        adopts the row of its slot and database name)."""
        conn = self.conn
        conn.execute('ALTER TABLE bemi._bemi_worker_checkpoints ADD COLUMN IF NOT EXISTS "source" text')
        for (name,) in conn.execute(
            "SELECT conname::text FROM pg_catalog.pg_constraint WHERE conrelid OPERATOR(pg_catalog.=) "
            "'bemi._bemi_worker_checkpoints'::pg_catalog.regclass AND contype OPERATOR(pg_catalog.=) 'p'"
        ).fetchall():
            conn.execute(sql.SQL("ALTER TABLE bemi._bemi_worker_checkpoints DROP CONSTRAINT {}").format(
                sql.Identifier(name)))
        conn.execute('CREATE UNIQUE INDEX IF NOT EXISTS _bemi_worker_checkpoints_source_slot '
                     'ON bemi._bemi_worker_checkpoints ("source", "slot")')
        log.warning("upgraded _bemi_worker_checkpoints: keyed by the source's identity (system identifier "
                    "and database oid) instead of the database name")

    def _upgrade_published_table(self) -> None:
        """Adopt a `changes` table made by the published worker (drop-in replacement).

        It lacks our identity columns, and its unique index on (position, table,
        schema, database, operation) would reject all but the first row of a COPY
        (they share one position): add the columns, drop that index, and say so.
        """
        conn = self.conn
        columns = {r[0] for r in conn.execute(
            "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid OPERATOR(pg_catalog.=) "
            "'bemi.changes'::pg_catalog.regclass AND attnum OPERATOR(pg_catalog.>) 0 "
            "AND NOT attisdropped").fetchall()}
        missing = [c for c in ("commit_position", "change_index") if c not in columns]
        if missing:
            conn.execute('ALTER TABLE bemi.changes ADD COLUMN IF NOT EXISTS "commit_position" bigint, '
                         'ADD COLUMN IF NOT EXISTS "change_index" integer')
            log.warning("added columns %s to the existing changes table (they identify a change: "
                        "commit position and order in its transaction)", ", ".join(missing))
        for name, constraint in conn.execute(
            "SELECT ci.relname::text, c.conname::text FROM pg_catalog.pg_index i "
            "JOIN pg_catalog.pg_class ci ON ci.oid OPERATOR(pg_catalog.=) i.indexrelid "
            "LEFT JOIN pg_catalog.pg_constraint c ON c.conindid OPERATOR(pg_catalog.=) i.indexrelid "
            "AND c.conrelid OPERATOR(pg_catalog.=) i.indrelid "
            "WHERE i.indrelid OPERATOR(pg_catalog.=) 'bemi.changes'::pg_catalog.regclass AND i.indisunique "
            "AND NOT i.indisprimary "
            "AND (SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attname) FROM pg_catalog.pg_attribute a "
            "     WHERE a.attrelid OPERATOR(pg_catalog.=) i.indrelid "
            "     AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey)) "
            "    OPERATOR(pg_catalog.=) ARRAY['database', 'operation', 'position', 'schema', 'table']"
        ).fetchall():
            if constraint:
                conn.execute(sql.SQL("ALTER TABLE bemi.changes DROP CONSTRAINT {}").format(
                    sql.Identifier(constraint)))
            else:
                conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(tables.SCHEMA, name)))
            log.warning("dropped the unique index %s of the published changes table: every row written by one "
                        "COPY shares one position, so it would drop changes (ours is changes_identity_index)", name)

    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint of this (source, slot), and the chain continued from its head."""
        query = ("SELECT (commit_lsn OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::int8, "
                 "(end_lsn OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::int8, chain_head "
                 "FROM bemi._bemi_worker_checkpoints WHERE slot OPERATOR(pg_catalog.=) %s::text AND ")
        row = self.conn.execute(query + "source OPERATOR(pg_catalog.=) %s::text", [self.slot, self.source]).fetchone()
        if row is None:
            # A row written before checkpoints were keyed by the source's identity: adopt it.
            adopted = self.conn.execute(
                "UPDATE bemi._bemi_worker_checkpoints SET source = %s::text WHERE slot OPERATOR(pg_catalog.=) "
                "%s::text AND database OPERATOR(pg_catalog.=) %s::text AND source IS NULL",
                [self.source, self.slot, self.database])
            if adopted.rowcount:
                log.warning("adopted the checkpoint of slot %s, database %s (from before checkpoints were keyed "
                            "by the source's identity, %s)", self.slot, self.database, self.source)
                row = self.conn.execute(query + "source OPERATOR(pg_catalog.=) %s::text",
                                        [self.slot, self.source]).fetchone()
        self.conn.commit()
        self._stored = row[1] if row else None
        if self._chained:
            head = chainstore.start_head(self.conn, self.database, bytes(row[2]) if row and row[2] else None)
            self.conn.commit()
            self.chain = Chain(head, self.database)
            self._committed_head = head
        return Checkpoint(row[0], row[1]) if row else None

    def write(self, rows: list[ChangeRow], queued_at: datetime) -> None:
        """Stream rows into ``changes`` inside the open destination transaction (not committed).

        One COPY stays open until the commit, so the server inserts (and updates
        the indexes) while we decode the next rows: the only wait is at the commit.
        """
        if not rows:
            return
        if self.partitions is not None:
            self._cover(rows)
        if self._copy is None:
            self.in_transaction = True
            self._cursor = self.conn.cursor()
            self._copy_cm = self._cursor.copy(COPY_CHANGES)
            self._copy = self._copy_cm.__enter__()
        lines: list[str] = []
        append = lines.append
        prefix = self._prefix
        # The first row always sets the texts (its context and committed_at are never None).
        last_ctx: str | None = None
        last_at: datetime | None = None
        last_ctx_text = last_at_text = ""
        queued = queued_at.isoformat()
        chain = self.chain
        queued_us = epoch_micros(queued_at)
        search, escapes = _NEEDS_ESCAPE.search, _COPY_ESCAPES
        # Rows come in runs of one table and operation: count runs, not rows (the same str objects).
        run_table, run_op, run = "", "", 0
        pending = self.pending
        for r in rows:  # one line of COPY text per stored row, in the order of COPY_CHANGES
            table, op = r.table, r.operation
            if table is not run_table or op is not run_op:
                if run:
                    pending[run_table, run_op] += run
                run_table, run_op, run = table, op, 0
            run += 1
            if r.context is not last_ctx:
                last_ctx, last_ctx_text = r.context, copy_text(r.context)
            if r.committed_at is not last_at:
                last_at, last_at_text = r.committed_at, r.committed_at.isoformat()
            pk = r.primary_key
            if pk is None:
                pk = "\\N"
            elif search(pk):
                pk = pk.translate(escapes)
            # The other texts that may need COPY escapes, escaped in one pass; NUL (which no
            # PostgreSQL text holds) stands for their tabs until the whole batch is joined.
            texts = "\0".join((r.schema, table, r.before, r.after))
            if search(texts):
                texts = texts.translate(escapes)
            # The change's link of the chain (bemi/chain.py), as bytea hex (no escapes needed).
            link = "\\N" if chain is None else "\\\\x" + chain.append(
                r.schema, table, r.primary_key, op, r.before, r.after, r.context, r.committed_at, queued_us,
                r.transaction_id, r.position, r.commit_position, r.change_index, r.canonical).hex()
            append(f"{prefix}\t{op}\t{last_ctx_text}\t{last_at_text}\t{queued}\t{r.transaction_id}\t{r.position}\t"
                   f"{r.commit_position}\t{r.change_index}\t{link}\t{pk}\t{texts}")
        if run:
            pending[run_table, run_op] += run
        append("")
        self._copy.write("\n".join(lines).replace("\0", "\t").encode())

    # -- partitions (bemi/worker/partitions.py) ----------------------------------------------
    def _cover(self, rows: list[ChangeRow]) -> None:
        """Make the partitions these rows need, when it can be done outside the destination
        transaction; otherwise (one is open) the rows go to changes_default and their
        partitions are made, with those rows moved in, right after the commit."""
        partitions = self.partitions
        assert partitions is not None
        missing = partitions.uncovered(r.committed_at for r in rows)
        if not missing:
            return
        if self._copy is None and self.conn.info.transaction_status == TransactionStatus.IDLE:
            partitions.try_ensure(missing)
            missing = partitions.uncovered(r.committed_at for r in rows)
        partitions.pending |= missing

    def _after_commit(self) -> None:
        if self.partitions is not None and self.partitions.pending:
            pending, self.partitions.pending = self.partitions.pending, set()
            self.partitions.try_ensure(pending)

    def _end_copy(self, error: BaseException | None = None) -> None:
        cm, cursor = self._copy_cm, self._cursor
        if self._copy is None or cm is None or cursor is None:  # write() sets all three, _copy last
            return
        self._copy, self._copy_cm = None, None
        try:
            if error is None:
                cm.__exit__(None, None, None)
            else:
                cm.__exit__(type(error), error, None)
        finally:
            cursor.close()
            self._cursor = None

    def commit(self, last: po.Commit, xid: int | None, changes: int) -> Counter[tuple[str, str]]:
        """Store the checkpoint and commit it with the rows written since the last commit;
        returns the rows committed by (table, operation).

        The checkpoint moves only from where this worker last read or wrote it: if another worker
        stored anything meanwhile (it took the slot while this one had lost it), ``CheckpointMoved``
        is raised and nothing is committed, so the two never both store a transaction."""
        self._end_copy()
        head = self.chain.head if self.chain is not None else None  # committed with the rows
        values = [self.database, po.int_to_lsn(last.commit_lsn), po.int_to_lsn(last.end_lsn), xid,
                  last.commit_time]
        if self._stored is None:
            stored = self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (source, slot, database, commit_lsn, end_lsn, transaction_id, committed_at, "
                    "changes, updated_at, chain_head) VALUES (%s::text, %s::text, %s::text, %s::pg_catalog.pg_lsn, "
                    "%s::pg_catalog.pg_lsn, %s::int8, %s::timestamptz, %s::int8, pg_catalog.now(), %s::bytea) "
                    "ON CONFLICT (source, slot) DO NOTHING").format(tables.CHECKPOINTS),
                [self.source, self.slot, *values, changes, head]).rowcount
        else:
            stored = self.conn.execute(
                sql.SQL(
                    "UPDATE {} SET database = %s::text, commit_lsn = %s::pg_catalog.pg_lsn, "
                    "end_lsn = %s::pg_catalog.pg_lsn, transaction_id = %s::int8, committed_at = %s::timestamptz, "
                    "changes = changes OPERATOR(pg_catalog.+) %s::int8, updated_at = pg_catalog.now(), "
                    "chain_head = %s::bytea "
                    "WHERE source OPERATOR(pg_catalog.=) %s::text AND slot OPERATOR(pg_catalog.=) %s::text "
                    "AND end_lsn OPERATOR(pg_catalog.=) %s::pg_catalog.pg_lsn").format(tables.CHECKPOINTS),
                [*values, changes, head, self.source, self.slot, po.int_to_lsn(self._stored)]).rowcount
        if stored != 1:
            raise CheckpointMoved(
                f"the checkpoint of slot {self.slot!r} moved since this worker read it (another worker stored "
                "changes from the slot meanwhile); nothing of this batch was stored")
        self.conn.commit()
        self._stored = last.end_lsn
        if self.chain is not None:
            self._committed_head = self.chain.head
        self.in_transaction = False
        written, self.pending = self.pending, Counter()
        self.pending_dead = 0
        self._after_commit()
        return written

    # -- dead letters -------------------------------------------------------------------------

    def write_careful(self, rows: list[ChangeRow], queued_at: datetime) -> list[tuple[ChangeRow, Exception]]:
        """Like write(), but a row the destination rejects goes to ``_bemi_worker_failures``.

        The rows are COPied in a savepoint; if that fails, row by row, each in its
        own savepoint. Returns the rejected rows and their errors.
        """
        if not rows:
            return []
        self._end_copy()
        self.in_transaction = True
        conn = self.conn
        before = self.pending.copy()
        chain = self.chain
        mark = chain.mark() if chain is not None else b""
        conn.execute("SAVEPOINT bemi_chunk")
        try:
            self.write(rows, queued_at)
            self._end_copy()
            conn.execute("RELEASE SAVEPOINT bemi_chunk")
            return []
        except psycopg.Error as exc:
            self._abort_copy(exc)
            if not is_rejection(exc):
                raise
            conn.execute("ROLLBACK TO SAVEPOINT bemi_chunk")
            conn.execute("RELEASE SAVEPOINT bemi_chunk")
            self.pending = before
            if chain is not None:
                chain.reset(mark)
        failed: list[tuple[ChangeRow, Exception]] = []
        for row in rows:
            mark = chain.mark() if chain is not None else b""
            conn.execute("SAVEPOINT bemi_row")
            try:
                self.write([row], queued_at)
                self._end_copy()
                conn.execute("RELEASE SAVEPOINT bemi_row")
            except psycopg.Error as exc:
                self._abort_copy(exc)
                if not is_rejection(exc):
                    raise
                conn.execute("ROLLBACK TO SAVEPOINT bemi_row")
                conn.execute("RELEASE SAVEPOINT bemi_row")
                if chain is not None:
                    chain.reset(mark)  # a dead letter is not stored: not chained
                self.pending[row.table, row.operation] -= 1
                self._dead_letter(row, exc)
                failed.append((row, exc))
        return failed

    def _abort_copy(self, exc: BaseException) -> None:
        try:
            self._end_copy(exc)
        except psycopg.Error:
            pass

    def _dead_letter(self, row: ChangeRow, exc: Exception) -> None:
        change = ('{"schema":' + json.dumps(row.schema) + ',"table":' + json.dumps(row.table)
                  + ',"primary_key":' + json.dumps(row.primary_key) + ',"operation":' + json.dumps(row.operation)
                  + ',"before":' + row.before + ',"after":' + row.after + ',"context":' + row.context
                  + ',"committed_at":' + json.dumps(row.committed_at.isoformat())
                  + ',"transaction_id":' + str(row.transaction_id) + ',"position":' + str(row.position)
                  + ',"commit_position":' + str(row.commit_position) + ',"change_index":' + str(row.change_index)
                  + "}").encode("utf-8", "surrogatepass")
        texts = [self.source, self.slot, self.database, row.schema, row.table, row.operation, row.primary_key,
                 str(exc).strip()]
        query = ("INSERT INTO bemi._bemi_worker_failures (source, slot, database, schema, \"table\", operation, "
                 "primary_key, error, transaction_id, position, commit_position, change_index, committed_at, "
                 "change, sqlstate) VALUES (%s::text, %s::text, %s::text, %s::text, %s::text, %s::text, %s::text, "
                 "%s::text, %s::int8, %s::int8, %s::int8, %s::int4, %s::timestamptz, %s::bytea, %s::text)")
        rest = [row.transaction_id, row.position, row.commit_position, row.change_index, row.committed_at, change,
                getattr(exc, "sqlstate", None)]
        self.conn.execute("SAVEPOINT bemi_dead")
        try:
            self.conn.execute(query, texts + rest)
        except psycopg.Error as again:
            if not is_rejection(again):
                raise
            # The text itself cannot be stored (the destination's encoding): store it escaped.
            self.conn.execute("ROLLBACK TO SAVEPOINT bemi_dead")
            escaped = [None if t is None else t.encode("ascii", "backslashreplace").decode("ascii") for t in texts]
            self.conn.execute(query, escaped + rest)
        self.conn.execute("RELEASE SAVEPOINT bemi_dead")
        self.pending_dead += 1

    def rollback(self) -> None:
        try:
            self._end_copy(RuntimeError("rolled back"))
        except Exception:
            pass
        try:
            self.conn.rollback()
        except psycopg.Error:
            pass
        self.in_transaction = False
        self.pending = Counter()
        self.pending_dead = 0
        if self.chain is not None:
            self.chain.reset(self._committed_head)  # the rows rolled back are not chained
