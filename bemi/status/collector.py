"""``collect()``: every part of the status read, judged and put in one ``Status``.

The order of the reads matters only for the peek (``lag.py``): it runs last
among the source's reads that decide the verdict, and only when no worker holds
the slot.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timezone

import psycopg

from bemi.status import health
from bemi.status.chain_head import read_chain_head
from bemi.status.destination import count_dead_letters, read_checkpoint, table_exists
from bemi.status.health import DEFAULT_MAX_LAG_SECONDS, DEFAULT_MAX_RETAINED_BYTES
from bemi.status.lag import lag_bytes, lag_seconds
from bemi.status.report import Slot, Status
from bemi.status.session import one
from bemi.status.source import read_leftovers, read_publication, read_slot, read_tables, read_worker
from bemi.trust import BEMI_TABLES, untrusted_tables


def collect(source: psycopg.Connection, destination: psycopg.Connection | None = None, *, slot: str = "bemi",
            publication: str = "bemi", max_lag_seconds: float = DEFAULT_MAX_LAG_SECONDS,
            max_retained_bytes: int = DEFAULT_MAX_RETAINED_BYTES) -> Status:
    """The status of ``slot`` and ``publication`` in the source database, with the worker's bookkeeping
    read from ``destination`` (the source when None)."""
    destination = destination or source
    info = one(source, "SELECT current_database() AS db, current_user AS user, "
                       "current_setting('server_version_num')::int AS version, "
                       "current_setting('max_slot_wal_keep_size', true) AS keep, now() AS now")
    assert info is not None
    database, now = info["db"], info["now"]
    dest_row = one(destination, "SELECT current_database() AS db")
    dest_db = dest_row["db"] if dest_row else database

    the_slot, behind = read_slot(source, slot)
    # A slot's name is the server's, its data one database's: another database's slot is not ours.
    foreign = the_slot.database if the_slot.exists and the_slot.database != database else None
    if foreign is not None:
        the_slot, behind = Slot(name=slot), 0
    worker = read_worker(source, the_slot) if the_slot.exists else None
    pub = read_publication(source, publication)
    tables = read_tables(source, pub)
    untrusted = [table.why for table in untrusted_tables(destination, BEMI_TABLES)]
    unreadable = []
    try:
        checkpoint = read_checkpoint(destination, slot, database)
    except psycopg.errors.InsufficientPrivilege:
        checkpoint = None
        unreadable.append("_bemi_worker_checkpoints")
    try:
        dead = count_dead_letters(destination, slot)
    except psycopg.errors.InsufficientPrivilege:
        dead = 0
        unreadable.append("_bemi_worker_failures")
    lag_b = lag_bytes(the_slot, behind, checkpoint)
    lag_s, lag_source = lag_seconds(source, the_slot, worker, checkpoint, lag_b,
                                    database=database, publication=publication, now=now)
    # The checkpoints tell a stopped worker's slot from a leftover: no leftover is claimed without them.
    leftovers = read_leftovers(source, slot, publication) if "_bemi_worker_checkpoints" not in unreadable else []
    has_changes_table = table_exists(destination, "changes")

    status = Status(
        healthy=True, problems=[], warnings=[], source_database=database,
        destination_database=dest_db, server_version=info["version"], max_slot_wal_keep_size=info["keep"] or "n/a",
        slot=the_slot, worker=worker, publication=pub, tables=tables, checkpoint=checkpoint,
        lag_bytes=lag_b, lag_seconds=lag_s, lag_seconds_source=lag_source, dead_letters=dead,
        max_lag_seconds=max_lag_seconds, max_retained_bytes=max_retained_bytes,
        checked_at=now.astimezone(timezone.utc).isoformat(timespec="seconds"),
        leftovers=[leftover.as_dict() for leftover in leftovers],
        chain_head=read_chain_head(destination, database),
    )
    problems = health.problems(status, foreign=foreign)
    warnings = health.warnings(status, problems, untrusted=untrusted, unreadable=unreadable, role=info["user"],
                               has_changes_table=has_changes_table)
    return replace(status, healthy=not problems, problems=problems, warnings=warnings)
