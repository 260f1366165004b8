"""How far behind the trail is: WAL not stored yet (bytes), and how long its oldest change has
been waiting (seconds).

With no worker running, the seconds come from a peek at the slot
(``pg_logical_slot_peek_binary_changes``, which consumes nothing): the status's
one read that is not a plain catalog query.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from bemi.status.report import Checkpoint, Slot, Worker
from bemi.status.session import one
from bemi.worker import pgoutput as po

#: Seconds the peek at the first waiting transaction may take.
PEEK_TIMEOUT = "10s"


def _lsn(text: str | None) -> int:
    return po.lsn_to_int(text) if text else 0


def lag_bytes(slot: Slot, behind: int, checkpoint: Checkpoint | None) -> int | None:
    """WAL after what is stored and confirmed (the slot, or the checkpoint when ahead of it)."""
    if not slot.exists:
        return None
    if checkpoint and checkpoint.end_lsn and slot.confirmed_flush_lsn:
        ahead = _lsn(checkpoint.end_lsn) - _lsn(slot.confirmed_flush_lsn)
        if ahead > 0:
            return max(behind - ahead, 0)
    return behind


def lag_seconds(conn: psycopg.Connection, slot: Slot, worker: Worker | None, checkpoint: Checkpoint | None,
                lag_bytes: int | None, *, database: str, publication: str, now: datetime) -> tuple[float | None, str]:
    """How long the oldest change not stored yet has been waiting, and where that number comes from."""
    if not slot.exists or slot.wal_status == "lost":
        return None, "no slot"
    if not lag_bytes:
        return 0.0, "nothing waiting"
    if worker is not None:
        row = one(conn, "SELECT extract(epoch FROM coalesce(replay_lag, flush_lag))::float8 AS lag "
                        "FROM pg_stat_replication WHERE pid = %s::int4", [worker.pid])
        if row is not None:
            return round(row["lag"] or 0.0, 3), "pg_stat_replication (replay_lag)"
        return None, "unknown while a worker reads the slot (its bemi_replication_lag_seconds metric has it)"
    try:
        first, source = _first_waiting(conn, slot.name, database, publication,
                                       _lsn(checkpoint.commit_lsn) if checkpoint else 0)
        return (0.0 if first is None else round(max((now - first).total_seconds(), 0.0), 3)), source
    except (_Busy, psycopg.Error) as exc:
        why = "a worker took the slot" if isinstance(exc, _Busy) else str(exc).strip().splitlines()[0]
        if checkpoint and checkpoint.age_seconds is not None:
            return (checkpoint.age_seconds,
                    f"upper bound, the age of the last stored commit (could not peek: {why})")
        return None, f"unknown (could not peek at the slot: {why})"


class _Busy(Exception):
    pass


def _first_waiting(conn: psycopg.Connection, slot: str, database: str, publication: str,
                   after_commit_lsn: int) -> tuple[datetime | None, str]:
    """Commit time of the first transaction the slot holds with changes for us (None: nothing waits).

    Only called when no worker runs. The peek holds the slot for its moment (at most
    ``PEEK_TIMEOUT``): a worker starting then waits for it (its application_name is
    ``bemi-status``); a worker that took the slot first makes the peek fail (``_Busy``).
    """
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', %s::text, true)", [PEEK_TIMEOUT])
        # The server decodes a whole transaction at its commit record, whatever upto_nchanges says:
        # only the first 21 bytes of each message (a Begin's header; the kind of the others) are
        # sent, through a server-side cursor read in batches, so the status holds the same few
        # kilobytes whether the waiting transaction is one row or millions of large ones.
        try:
            with conn.cursor(name="bemi_status_peek", binary=True) as cur:
                cur.execute(
                    "SELECT pg_catalog.substr(data, 1, 21) FROM pg_catalog.pg_logical_slot_peek_binary_changes("
                    "%s::name, NULL::pg_lsn, %s::int4, 'proto_version', '1', 'publication_names', %s::text)",
                    [slot, 64, '"' + publication.replace('"', '""') + '"'])
                begin: po.Begin | None = None
                while rows := cur.fetchmany(1000):
                    for (data,) in rows:
                        kind = bytes(data[:1])
                        if kind == b"B":
                            begin = po.decode(bytes(data))
                        elif kind in (b"I", b"U", b"D", b"T") and begin is not None \
                                and begin.final_lsn > after_commit_lsn:
                            return begin.commit_time, "the first waiting transaction"
                        elif kind == b"C":
                            begin = None
        except psycopg.errors.ObjectInUse:
            raise _Busy from None
    return None, "nothing waiting"
