"""Facts read from the source (the tracked database): its slot, who reads it, the publication,
the tracked tables, and leftovers of an earlier worker.

Read-only catalog queries; nothing here judges what it finds (``health.py`` does).
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from bemi.leftovers import Leftover, find_leftovers
from bemi.status.report import Publication, Slot, Tables, Worker
from bemi.status.session import all_rows, one

#: The server's WAL position, also on a standby.
CURRENT_LSN = ("CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() "
               "ELSE pg_current_wal_lsn() END")

# The rule of install.sql's _bemi_is_tracked, for a database where `migrate bemi` never ran.
_FALLBACK_TRACKED = """
    n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname <> 'changes'
    AND left(c.relname, 5) <> '_bemi'"""


def read_slot(conn: psycopg.Connection, name: str) -> tuple[Slot, int]:
    """The slot, and how many bytes of WAL lie after its confirmed position."""
    row = one(conn, f"""
        SELECT to_jsonb(s) AS s, ({CURRENT_LSN} - s.restart_lsn)::int8 AS retained,
               s.restart_lsn::text AS restart_lsn, s.confirmed_flush_lsn::text AS confirmed,
               ({CURRENT_LSN} - s.confirmed_flush_lsn)::int8 AS behind
        FROM pg_replication_slots s WHERE s.slot_name = %s::name""", [name])
    if row is None:
        return Slot(name=name), 0
    s = row["s"]
    safe = s.get("safe_wal_size")
    slot = Slot(
        name=name, exists=True, plugin=s.get("plugin"), database=s.get("database"),
        active=bool(s.get("active")), active_pid=s.get("active_pid"), wal_status=s.get("wal_status"),
        restart_lsn=row["restart_lsn"], confirmed_flush_lsn=row["confirmed"],
        retained_wal_bytes=max(row["retained"] or 0, 0) if row["restart_lsn"] else None,
        safe_wal_size=int(safe) if safe is not None else None,
    )
    return slot, max(row["behind"] or 0, 0)


def read_worker(conn: psycopg.Connection, slot: Slot) -> Worker | None:
    """Who reads the slot: the replication connection holding it, or another session holding it.

    Only the slot tells (only a role with REPLICATION can hold one); a worker that is starting or
    reconnecting, not holding the slot at that moment, is not seen."""
    if slot.active and slot.active_pid:
        row = one(conn, """
            SELECT a.application_name, a.client_addr::text AS client_addr, a.backend_start::text AS backend_start,
                   r.state
            FROM pg_stat_activity a LEFT JOIN pg_stat_replication r ON r.pid = a.pid
            WHERE a.pid = %s::int4""", [slot.active_pid]) or {}
        if row.get("state") is not None:
            return Worker(pid=slot.active_pid, via="replication connection", **row)
    if slot.active and slot.active_pid:  # someone else holds the slot (not a bemi worker)
        row = one(conn, "SELECT application_name, client_addr::text AS client_addr, "
                        "backend_start::text AS backend_start FROM pg_stat_activity WHERE pid = %s::int4",
                  [slot.active_pid]) or {}
        return Worker(pid=slot.active_pid, via="slot held by a session", **row)
    return None


def read_publication(conn: psycopg.Connection, name: str) -> Publication:
    row = one(conn, """
        SELECT p.puballtables,
               (SELECT count(*) FROM pg_publication_tables t WHERE t.pubname = p.pubname)::int AS tables
        FROM pg_publication p WHERE p.pubname = %s::name""", [name])
    if row is None:
        return Publication(name=name)
    return Publication(name=name, exists=True, all_tables=row["puballtables"], tables=row["tables"])


def _function(conn: psycopg.Connection, name: str, argtypes: str) -> tuple[sql.Composable, int, str | None] | None:
    """A function bemi installs (``migrate bemi``) in schema public: its qualified name, its oid, and
    None when it may be called, else the role that owns it (not a superuser nor this session's role:
    calling it would run that role's code with our privileges; a function of the same name in any
    other schema is never considered)."""
    row = one(conn, """
        SELECT p.oid::int8 AS oid, CASE WHEN r.rolsuper OR r.rolname = current_user THEN NULL
                                        ELSE r.rolname::text END AS untrusted_owner
        FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
        WHERE p.pronamespace = 'public'::regnamespace AND p.proname = %s::name
          AND p.proargtypes::text = %s::text""",
        [name, argtypes])
    return (sql.Identifier("public", name), row["oid"], row["untrusted_owner"]) if row else None


def read_tables(conn: psycopg.Connection, publication: Publication) -> Tables:
    """The tracked tables, and which of them lack the publication, the trigger or REPLICA IDENTITY FULL."""
    is_tracked = _function(conn, "_bemi_is_tracked", "2205")  # (regclass)
    rule: sql.Composable
    has_trigger: sql.Composable
    trigger_func = _function(conn, "_bemi_row_trigger_func", "")
    if is_tracked is not None and is_tracked[2] is None:
        rule = sql.SQL("{}(c.oid::regclass)").format(is_tracked[0])
        source = "_bemi_is_tracked()"
    elif is_tracked is not None:
        rule = sql.SQL(_FALLBACK_TRACKED)
        source = (f"public._bemi_is_tracked() is owned by role {is_tracked[2]!r}, neither a superuser nor the "
                  "role running this status, so it is not called: tables of schema public except changes and _bemi*")
    else:
        rule = sql.SQL(_FALLBACK_TRACKED)
        source = "bemi's SQL functions are not installed: tables of schema public except changes and _bemi*"
    if trigger_func is not None:
        has_trigger = sql.SQL("EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid "
                              "AND t.tgfoid = {}::oid AND t.tgenabled <> 'D')").format(sql.Literal(trigger_func[1]))
    else:
        has_trigger = sql.SQL("NULL::boolean")
    rows = all_rows(conn, sql.SQL("""
        SELECT format('%I.%I', n.nspname, c.relname) AS name, c.relreplident = 'f' AS full_identity,
               {has_trigger} AS has_trigger,
               (p.puballtables OR EXISTS (SELECT 1 FROM pg_publication_tables pt  -- (schemas of bemi_grants too)
                                          WHERE pt.pubname = p.pubname AND pt.schemaname = n.nspname
                                          AND pt.tablename = c.relname)) AS published
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_publication p ON p.pubname = {pub}
        WHERE {rule} AND NOT c.relispartition
        ORDER BY 1""").format(has_trigger=has_trigger, pub=sql.Literal(publication.name), rule=rule))
    tables = Tables(tracked=len(rows), rule=source)
    for r in rows:
        if publication.exists and not r["published"]:
            tables.missing_from_publication.append(r["name"])
        if r["has_trigger"] is False:
            tables.without_trigger.append(r["name"])
        if not r["full_identity"]:
            tables.without_replica_identity_full.append(r["name"])
    return tables


def read_leftovers(conn: psycopg.Connection, slot: str, publication: str) -> list[Leftover]:
    """Slots and publications an earlier worker left (bemi/leftovers.py); none claimed by a role that
    may not read the checkpoints (they tell a stopped worker's slot from a leftover)."""
    try:
        with conn.cursor(row_factory=tuple_row) as cursor:
            return find_leftovers(cursor, in_use_slots=[slot], in_use_publications=[publication])
    except psycopg.errors.InsufficientPrivilege:
        return []
