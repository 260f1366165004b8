"""Taking over from the published Docker worker (``--takeover``) without storing a change twice.

The published worker (Debezium + NATS + a TypeScript worker) reads a pgoutput
slot (``bemi_local``) through Debezium's publication (``dbz_publication``) and
stores one ``changes`` row per change with ``position`` = the change's LSN,
deduplicated by its unique key (position, table, schema, database,
operation). Debezium confirms positions to the slot only now and then, so when
the container stops, the slot's ``confirmed_flush_lsn`` is behind what the
container stored: started on that slot, our worker is handed those changes
again.

Rows the published worker wrote are the ones without our identity columns
(``commit_position IS NULL``: the sink adds the columns when it adopts the
table). A change the slot replays has a position at or after the slot's
``restart_lsn``; so the overlap is the published rows from that position on,
counted per published key. It is loaded once at start into three flat arrays
(20 bytes per key), refused beyond ``max_bytes``. Then every row about to be
stored whose key is in it is dropped, up to the number stored: a ``COPY`` or
multi-row insert shares one position, the published worker kept only the first
row of such a run (its unique key), so the others are stored now. An UPDATE
that changed the primary key is, in Debezium, a DELETE and a CREATE at the
same position: it counts as stored when both are.

The decision depends only on the row and the rows before it in the same
transaction, never on what was committed, so a destination transaction rolled
back and read again decides the same way (no state to undo).

What this cannot do (docs/upgrading.md): recover changes Debezium confirmed to
the slot but the container never stored (still in NATS, or in the TypeScript
worker's hands, when it stopped). The gap-free procedure avoids that case.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from bisect import bisect_left
from typing import Callable

import psycopg

from bemi.worker.errors import WorkerError
from bemi.worker.stitch import ChangeRow

__all__ = ["Overlap", "RowFilter", "TakeoverFilter", "start", "warn_if_published_rows", "warn_about_leftovers"]

log = logging.getLogger("bemi.worker")

RowFilter = Callable[[list[ChangeRow]], list[ChangeRow]]
BYTES_PER_KEY = 8 + 8 + 4  # position, tag, count
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_PUBLISHED_ROWS = (
    'SELECT "position", "schema"::text, "table"::text, "operation"::text, count(*) FROM bemi.changes '
    'WHERE commit_position IS NULL AND "database" = %s::text AND "position" >= %s::int8 '
    "GROUP BY 1, 2, 3, 4 ORDER BY 1"
)


def _digest(schema: str, table: str, operation: str) -> int:
    """A 64-bit digest of the rest of the published key (the position is compared apart, exactly)."""
    digest = hashlib.blake2b(f"{schema}\0{table}\0{operation}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little", signed=True)


class Overlap:
    """How many rows the published worker stored per key, for positions from a lower bound on."""

    def __init__(self) -> None:
        self.positions = array("q")
        self.tags = array("q")
        self.counts = array("i")  # 4 bytes: BYTES_PER_KEY is what the arrays really hold
        self._tag_cache: dict[tuple[str, str, str], int] = {}  # one entry per table and operation

    def _tag(self, schema: str, table: str, operation: str) -> int:
        key = (schema, table, operation)
        tag = self._tag_cache.get(key)
        if tag is None:
            if len(self._tag_cache) > 100_000:
                self._tag_cache.clear()
            tag = self._tag_cache[key] = _digest(schema, table, operation)
        return tag

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def nbytes(self) -> int:
        return len(self.positions) * BYTES_PER_KEY

    @property
    def first(self) -> int:
        return self.positions[0] if self.positions else 0

    @property
    def last(self) -> int:
        return self.positions[-1] if self.positions else -1

    def add(self, position: int, schema: str, table: str, operation: str, count: int) -> None:
        """Keys must come in ascending position order."""
        self.positions.append(position)
        self.tags.append(self._tag(schema, table, operation))
        self.counts.append(min(count, 2**31 - 1))

    def stored(self, position: int, schema: str, table: str, operation: str) -> int:
        """Rows the published worker stored under this key."""
        positions = self.positions
        i = bisect_left(positions, position)
        if i == len(positions) or positions[i] != position:
            return 0
        tag = self._tag(schema, table, operation)
        while i < len(positions) and positions[i] == position:
            if self.tags[i] == tag:
                return self.counts[i]
            i += 1
        return 0

    @classmethod
    def load(cls, conn: psycopg.Connection, database: str, from_position: int, max_bytes: int) -> "Overlap":
        overlap = cls()
        with conn.cursor(name="bemi_takeover") as cur:
            cur.execute(_PUBLISHED_ROWS, [database, from_position])
            while rows := cur.fetchmany(10_000):
                if overlap.nbytes + len(rows) * BYTES_PER_KEY > max_bytes:
                    conn.rollback()
                    raise WorkerError(
                        f"--takeover: the published worker stored more changes after the slot's restart position "
                        f"than fit in --takeover-memory ({max_bytes // (1024 * 1024)} MiB, {BYTES_PER_KEY} bytes "
                        "per change). Raise --takeover-memory, or follow the gap-free procedure of "
                        "docs/upgrading.md (a new slot created shortly before the container stops)."
                    )
                for position, schema, table, operation, count in rows:
                    overlap.add(position, schema, table, operation, count)
        conn.rollback()
        return overlap


class TakeoverFilter:
    """Drops, from the rows about to be stored, those the published worker already stored."""

    def __init__(self, overlap: Overlap) -> None:
        self.overlap = overlap
        self.skipped = 0
        self._run: tuple | None = None  # (commit_position, position, schema, table, operation) of the last row
        self._run_start = 0  # change_index of the first row of that run

    def __call__(self, rows: list[ChangeRow]) -> list[ChangeRow]:
        overlap = self.overlap
        first, last = overlap.first, overlap.last
        kept: list[ChangeRow] = []
        for row in rows:
            position = row.position
            if position < first or position > last:
                kept.append(row)
                continue
            key = (row.commit_position, position, row.schema, row.table, row.operation)
            if key != self._run:
                self._run, self._run_start = key, row.change_index
            nth = row.change_index - self._run_start  # rows of one key are consecutive in a transaction
            stored = overlap.stored(position, row.schema, row.table, row.operation)
            if not stored and row.operation == "UPDATE":  # a primary key change: Debezium's DELETE + CREATE
                stored = min(overlap.stored(position, row.schema, row.table, "DELETE"),
                             overlap.stored(position, row.schema, row.table, "CREATE"))
            if nth < stored:
                self.skipped += 1
                continue
            kept.append(row)
        return kept


def _restart_position(conn: psycopg.Connection, slot: str) -> int | None:
    row = conn.execute(
        "SELECT (restart_lsn OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::int8 "
        "FROM pg_catalog.pg_replication_slots WHERE slot_name OPERATOR(pg_catalog.=) %s::name",
        [slot],
    ).fetchone()
    return row[0] if row else None


def start(source_conn: psycopg.Connection, slot: str, sink_conn: psycopg.Connection, database: str,
          max_bytes: int = DEFAULT_MAX_BYTES) -> RowFilter | None:
    """The row filter for a takeover of ``slot``, or None when the published worker left no overlap."""
    restart = _restart_position(source_conn, slot)
    if restart is None:
        return None
    overlap = Overlap.load(sink_conn, database, restart, max_bytes)
    if not overlap:
        log.info("--takeover: no change stored by the published worker at or after the slot's restart position; "
                 "nothing to skip")
        return None
    log.info("--takeover: %d keys of changes stored by the published worker (positions %d to %d, %d bytes): "
             "the slot's replay of those is skipped", len(overlap), overlap.first, overlap.last, overlap.nbytes)
    return TakeoverFilter(overlap)


def warn_if_published_rows(sink_conn: psycopg.Connection, database: str) -> None:
    """First start without --takeover on a table the published worker filled: say what may happen."""
    try:
        # Once per new slot; on a big table of our own rows this would read it all: give up after 2 s.
        sink_conn.execute("SET LOCAL statement_timeout = '2s'")
        found = sink_conn.execute(
            'SELECT EXISTS (SELECT 1 FROM bemi.changes WHERE commit_position IS NULL AND "database" = %s::text)',
            [database],
        ).fetchone()
    except psycopg.errors.QueryCanceled:
        found = None
    finally:
        sink_conn.rollback()
    if found and found[0]:
        log.warning("changes holds rows of the published worker: if this slot is the one its Debezium read "
                    "(bemi_local), start with --takeover, or changes it stored may be stored twice "
                    "(docs/upgrading.md)")


def warn_about_leftovers(source_conn: psycopg.Connection, slot: str, publication: str) -> None:
    """At start: an inactive slot of an earlier Bemi worker keeps WAL forever; say which, and what to drop."""
    from bemi.leftovers import find_leftovers

    try:
        with source_conn.cursor() as cursor:
            leftovers = find_leftovers(cursor, in_use_slots=[slot], in_use_publications=[publication])
    except psycopg.Error as exc:  # never stop the worker for this
        log.debug("could not look for leftover slots: %s", exc)
        return
    for leftover in leftovers:
        log.warning("%s", leftover.message)
