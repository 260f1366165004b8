"""Replication slots and publications left behind by an earlier Bemi worker (Django-free).

After switching from the published Docker worker (Debezium: slot ``bemi_local``,
publication ``dbz_publication``) or after trying our worker under other slot
names, an inactive logical slot keeps every WAL segment since its position:
the disk fills. ``find_leftovers(cursor)`` lists what looks like such a
leftover in the cursor's database and the statement that drops it; the system
check ``bemi.W015`` and ``bemi_status`` show them.

Rules (docs/upgrading.md#leftovers):

* a **slot** is a leftover when it is a logical slot of this database, not
  active, named ``bemi_local``, ``debezium*`` or ``bemi*``, and not in use by
  our worker: not ``bemi`` (its default), not named in ``in_use_slots``, and
  without a checkpoint row in ``bemi._bemi_worker_checkpoints`` of this
  database (a stopped worker's slot is not a leftover: ``bemi_status`` reports it);
* the **publication** ``dbz_publication`` (Debezium's default) is a leftover
  when it is not named in ``in_use_publications`` and no slot of Debezium's
  (``bemi_local``, ``debezium*``) remains in use. Publications keep no WAL;
  ``bemi*`` publications are never reported (our worker's may have any name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from psycopg import sql

from bemi.trust import untrusted_tables

__all__ = ["Leftover", "find_leftovers", "DEFAULT_SLOT", "DEFAULT_PUBLICATION"]

DEFAULT_SLOT = "bemi"
DEFAULT_PUBLICATION = "bemi"
DEBEZIUM_PUBLICATION = "dbz_publication"


def _debezium_slot(name: str) -> bool:
    return name == "bemi_local" or name.startswith("debezium")


def _looks_like_ours(name: str) -> bool:
    return _debezium_slot(name) or name.startswith("bemi")


@dataclass(frozen=True)
class Leftover:
    kind: str  # "slot" or "publication"
    name: str
    retained_wal_bytes: int | None  # slots: WAL kept since its restart position
    drop_sql: str  # the statement that removes it

    def as_dict(self) -> dict[str, Any]:
        """For JSON output (``bemi_status --json``)."""
        return {"kind": self.kind, "name": self.name, "retained_wal_bytes": self.retained_wal_bytes,
                "drop_sql": self.drop_sql, "message": self.message}

    @property
    def message(self) -> str:
        if self.kind == "slot":
            size = f"{self.retained_wal_bytes / (1024 * 1024):.1f} MiB of" if self.retained_wal_bytes is not None else \
                "an unknown amount of"
            return (f"inactive replication slot {self.name!r} looks like one an earlier Bemi worker left "
                    f"(no worker reads it): it keeps {size} WAL, and more every minute. If nothing reads it, "
                    f"drop it: {self.drop_sql}")
        return (f"publication {self.name!r} looks like one the published Bemi worker (Debezium) left, and "
                f"none of its slots is in use. If nothing uses it, drop it: {self.drop_sql}")


def _checkpointed_slots(cursor: Any) -> set[str]:
    cursor.execute("SELECT pg_catalog.to_regclass('bemi._bemi_worker_checkpoints') IS NOT NULL")
    row = cursor.fetchone()
    if not row or not row[0] or untrusted_tables(cursor, ["_bemi_worker_checkpoints"]):
        return set()  # missing, or made by another role: not read (its code would run as us, bemi/trust.py)
    cursor.execute('SELECT DISTINCT slot FROM bemi._bemi_worker_checkpoints '
                   'WHERE "database" OPERATOR(pg_catalog.=) pg_catalog.current_database()::text')
    return {r[0] for r in cursor.fetchall()}


def find_leftovers(cursor: Any, in_use_slots: Iterable[str] = (),
                   in_use_publications: Iterable[str] = ()) -> list[Leftover]:
    """Leftover slots and publications of the cursor's database (a psycopg 3 cursor)."""
    in_use = {DEFAULT_SLOT, *in_use_slots} | _checkpointed_slots(cursor)
    cursor.execute(
        "SELECT slot_name::text, active, "
        "(pg_catalog.pg_current_wal_lsn() OPERATOR(pg_catalog.-) restart_lsn)::int8 "
        "FROM pg_catalog.pg_replication_slots "
        "WHERE slot_type OPERATOR(pg_catalog.=) 'logical' "
        "AND database OPERATOR(pg_catalog.=) pg_catalog.current_database() ORDER BY 1"
    )
    slots = cursor.fetchall()
    context = cursor.connection
    found = []
    debezium_in_use = False
    for name, active, retained in slots:
        if not _looks_like_ours(name):
            continue
        if active or name in in_use:
            debezium_in_use = debezium_in_use or _debezium_slot(name)
            continue
        # Qualified and typed: a person runs it, often as a superuser with public on the search_path,
        # where an untyped literal would prefer a planted public.pg_drop_replication_slot(text).
        drop = sql.SQL("SELECT pg_catalog.pg_drop_replication_slot({}::pg_catalog.name);").format(
            sql.Literal(name)).as_string(context)
        found.append(Leftover("slot", name, retained, drop))
    if DEBEZIUM_PUBLICATION not in set(in_use_publications) and not debezium_in_use:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication "
                       "WHERE pubname OPERATOR(pg_catalog.=) %s::name)", [DEBEZIUM_PUBLICATION])
        row = cursor.fetchone()
        if row and row[0]:
            drop = sql.SQL("DROP PUBLICATION {};").format(sql.Identifier(DEBEZIUM_PUBLICATION)).as_string(context)
            found.append(Leftover("publication", DEBEZIUM_PUBLICATION, None, drop))
    return found
