"""The destination side: ``changes`` rows and the checkpoint, in one transaction (I/O).

Exactly once rests on this: the rows of whole source transactions and the
checkpoint (the commit position of the last of them) commit together, and the
slot is advanced only afterwards. A crash before the commit loses nothing (the
slot still holds those transactions); a crash after it duplicates nothing (the
checkpoint says they are stored and they are skipped).
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractContextManager
from datetime import datetime

import psycopg
from psycopg import sql

from bemi import sql as bemi_sql
from bemi.worker import pgoutput as po
from bemi.worker.errors import WorkerError, one_row
from bemi.worker.stitch import ChangeRow

__all__ = ["Sink", "Checkpoint"]

log = logging.getLogger("bemi.worker")

COPY_CHANGES = (
    'COPY changes ("database", "schema", "table", "primary_key", "operation", "before", "after", '
    '"context", "committed_at", "queued_at", "transaction_id", "position", "commit_position", '
    '"change_index") FROM STDIN'
)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]")


def _copy_text(value: str) -> str:
    """A value in COPY's text format (backslash, tab, newline and carriage return escaped)."""
    return value.translate(_COPY_ESCAPES) if _NEEDS_ESCAPE.search(value) else value


class Checkpoint:
    def __init__(self, commit_lsn: int, end_lsn: int) -> None:
        self.commit_lsn = commit_lsn
        self.end_lsn = end_lsn


class Sink:
    def __init__(self, dsn: str, slot: str, database: str) -> None:
        try:
            self.conn = psycopg.connect(dsn, autocommit=False, application_name="bemi-worker")
        except psycopg.OperationalError as exc:
            raise WorkerError(f"cannot connect to the destination database: {exc}".strip()) from exc
        self.conn.execute("SET client_encoding TO 'UTF8'")  # write() encodes the COPY data as UTF-8
        self.conn.commit()
        self.slot = slot
        self.database = database
        self.in_transaction = False
        self._cursor: psycopg.Cursor | None = None
        self._copy_cm: AbstractContextManager[psycopg.Copy] | None = None
        self._copy: psycopg.Copy | None = None
        self._prefix = _copy_text(database)

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # pragma: no cover
            pass

    def ensure_tables(self) -> None:
        """Create ``changes`` (+ indexes) and the checkpoint table when missing, and say so."""
        conn = self.conn
        existed = {
            name: one_row(conn.execute("SELECT to_regclass(%s) IS NOT NULL", [name]))[0]
            for name in ("changes", "_bemi_worker_checkpoints", "changes_identity_index")
        }
        if all(existed.values()):
            # Nothing to create: no DDL (it would need CREATE on the schema and take table locks).
            conn.rollback()
            return
        try:
            if existed["changes"]:
                self._upgrade_published_table()
            conn.execute(bemi_sql.read("changes.sql"))
            conn.execute(bemi_sql.read("worker.sql"))
            conn.commit()
        except psycopg.errors.InsufficientPrivilege as exc:
            conn.rollback()
            user = conn.info.user
            raise WorkerError(
                f"cannot create the changes table in the destination: role {user!r} needs CREATE on schema "
                f"public (GRANT CREATE ON SCHEMA public TO \"{user}\";): {exc}"
            ) from exc
        if not existed["changes"]:
            log.info("created table changes and its indexes in database %s", conn.info.dbname)
        if not existed["_bemi_worker_checkpoints"]:
            log.info("created table _bemi_worker_checkpoints (the worker's checkpoint) in database %s",
                     conn.info.dbname)

    def _upgrade_published_table(self) -> None:
        """Adopt a `changes` table made by the published worker (drop-in replacement).

        It lacks our identity columns, and its unique index on (position, table,
        schema, database, operation) would reject all but the first row of a COPY
        (they share one position): add the columns, drop that index, and say so.
        """
        conn = self.conn
        columns = {r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'changes'::regclass AND attnum > 0 "
            "AND NOT attisdropped").fetchall()}
        missing = [c for c in ("commit_position", "change_index") if c not in columns]
        if missing:
            conn.execute('ALTER TABLE changes ADD COLUMN IF NOT EXISTS "commit_position" bigint, '
                         'ADD COLUMN IF NOT EXISTS "change_index" integer')
            log.warning("added columns %s to the existing changes table (they identify a change: "
                        "commit position and order in its transaction)", ", ".join(missing))
        for name, constraint in conn.execute(
            "SELECT i.indexrelid::regclass::text, c.conname FROM pg_index i "
            "LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid "
            "WHERE i.indrelid = 'changes'::regclass AND i.indisunique AND NOT i.indisprimary "
            "AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a "
            "     WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) "
            "    = ARRAY['database', 'operation', 'position', 'schema', 'table']"
        ).fetchall():
            if constraint:
                conn.execute(sql.SQL("ALTER TABLE changes DROP CONSTRAINT {}").format(sql.Identifier(constraint)))
            else:
                conn.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))
            log.warning("dropped the unique index %s of the published changes table: every row written by one "
                        "COPY shares one position, so it would drop changes (ours is changes_identity_index)", name)

    def checkpoint(self) -> Checkpoint | None:
        row = self.conn.execute(
            "SELECT (commit_lsn - '0/0'::pg_lsn)::int8, (end_lsn - '0/0'::pg_lsn)::int8 "
            "FROM _bemi_worker_checkpoints WHERE slot = %s AND database = %s",
            [self.slot, self.database],
        ).fetchone()
        self.conn.rollback()
        return Checkpoint(*row) if row else None

    def write(self, rows: list[ChangeRow], queued_at: datetime) -> None:
        """Stream rows into ``changes`` inside the open destination transaction (not committed).

        One COPY stays open until the commit, so the server inserts (and updates
        the indexes) while we decode the next rows: the only wait is at the commit.
        """
        if not rows:
            return
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
        for r in rows:
            if r.context is not last_ctx:
                last_ctx, last_ctx_text = r.context, _copy_text(r.context)
            if r.committed_at is not last_at:
                last_at, last_at_text = r.committed_at, r.committed_at.isoformat()
            append("\t".join((
                prefix, _copy_text(r.schema), _copy_text(r.table),
                "\\N" if r.primary_key is None else _copy_text(r.primary_key), r.operation,
                _copy_text(r.before), _copy_text(r.after), last_ctx_text, last_at_text, queued,
                str(r.transaction_id), str(r.position), str(r.commit_position), str(r.change_index),
            )))
        append("")
        self._copy.write("\n".join(lines).encode())

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

    def commit(self, last: po.Commit, xid: int | None, changes: int) -> None:
        """Store the checkpoint and commit it with the rows written since the last commit."""
        self._end_copy()
        self.conn.execute(
            "INSERT INTO _bemi_worker_checkpoints AS c "
            "(slot, database, commit_lsn, end_lsn, transaction_id, committed_at, changes, updated_at) "
            "VALUES (%s, %s, %s::pg_lsn, %s::pg_lsn, %s, %s, %s, now()) "
            "ON CONFLICT (slot, database) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, "
            "end_lsn = EXCLUDED.end_lsn, transaction_id = EXCLUDED.transaction_id, "
            "committed_at = EXCLUDED.committed_at, changes = c.changes + EXCLUDED.changes, updated_at = now()",
            [self.slot, self.database, po.int_to_lsn(last.commit_lsn), po.int_to_lsn(last.end_lsn), xid,
             last.commit_time, changes],
        )
        self.conn.commit()
        self.in_transaction = False

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
