"""Is change tracking working? The state behind ``bemi-worker status`` and ``manage.py bemi_status``.

Django-free: ``collect()`` takes a psycopg connection to the source (the
tracked database) and one to the destination (where ``changes`` is written; the
same connection when they are one database) and returns a ``Status``;
``render_text()`` draws the screen a person reads, ``Status.as_dict()`` the
``--json`` document. Read-only, with one exception: when no worker runs, the
first waiting transaction is peeked at (``pg_logical_slot_peek_binary_changes``,
which consumes nothing) to know how long changes have been waiting.

Healthy means: the slot exists and is not lost; its retained WAL is at most
``max_retained_bytes``; and, when no worker is running, no change has been
waiting longer than ``max_lag_seconds``. Everything else worth a look is a
warning (see docs/operations.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, tuple_row

from bemi import tables
from bemi.leftovers import find_leftovers
from bemi.tables import SCHEMA as BEMI_SCHEMA
from bemi.trust import BEMI_TABLES, untrusted_tables
from bemi.worker import pgoutput as po

__all__ = ["Status", "collect", "connect", "render_text", "parse_bytes", "DEFAULT_MAX_LAG_SECONDS",
           "DEFAULT_MAX_RETAINED_BYTES", "EXIT_HEALTHY", "EXIT_UNHEALTHY", "EXIT_ERROR"]

#: No worker running and a change waiting longer than this: unhealthy (a restart takes seconds;
#: five minutes leaves room for a deploy without paging anyone).
DEFAULT_MAX_LAG_SECONDS = 300.0
#: WAL a slot may retain before the status is unhealthy (a caught-up worker retains at most about
#: 15 seconds of WAL, see docs/worker.md).
DEFAULT_MAX_RETAINED_BYTES = 1024 ** 3
#: Seconds the peek at the first waiting transaction may take.
PEEK_TIMEOUT = "10s"

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_ERROR = 0, 1, 2

SESSION = {
    "search_path": "pg_catalog, pg_temp",
    "statement_timeout": "30s",
    "TimeZone": "UTC",
}


def connect(dsn: str) -> psycopg.Connection:
    """A read-mostly connection for the status: autocommit, search_path pinned, statement timeout."""
    conn = psycopg.connect(dsn, autocommit=True, application_name="bemi-status")
    for name, value in SESSION.items():
        conn.execute("SELECT pg_catalog.set_config(%s::text, %s::text, false)", [name, value])
    return conn


_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3, "tb": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """``1073741824``, ``512MB``, ``1GB`` (PostgreSQL's units: powers of 1024) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?[bB]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1073741824, 512MB, 1GB)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


@dataclass
class Worker:
    pid: int
    via: str  # "replication connection" or "slot held by a session"
    application_name: str | None = None
    client_addr: str | None = None
    backend_start: str | None = None
    state: str | None = None


@dataclass
class Slot:
    name: str
    exists: bool = False
    plugin: str | None = None
    database: str | None = None
    active: bool = False
    active_pid: int | None = None
    wal_status: str | None = None
    restart_lsn: str | None = None
    confirmed_flush_lsn: str | None = None
    retained_wal_bytes: int | None = None
    safe_wal_size: int | None = None


@dataclass
class Publication:
    name: str
    exists: bool = False
    all_tables: bool = False
    tables: int = 0


@dataclass
class Tables:
    tracked: int = 0
    missing_from_publication: list[str] = field(default_factory=list)
    without_trigger: list[str] = field(default_factory=list)
    without_replica_identity_full: list[str] = field(default_factory=list)
    rule: str = ""  # where the "tracked" rule came from


@dataclass
class Checkpoint:
    commit_lsn: str | None = None
    end_lsn: str | None = None
    committed_at: str | None = None
    age_seconds: float | None = None
    updated_at: str | None = None


@dataclass
class Status:
    healthy: bool
    problems: list[str]
    warnings: list[str]
    source_database: str
    destination_database: str
    server_version: int
    max_slot_wal_keep_size: str
    slot: Slot
    worker: Worker | None
    publication: Publication
    tables: Tables
    checkpoint: Checkpoint | None
    lag_bytes: int | None
    lag_seconds: float | None
    lag_seconds_source: str
    dead_letters: int
    max_lag_seconds: float
    max_retained_bytes: int
    checked_at: str
    #: Slots and publications an earlier Bemi worker left (bemi.leftovers), with the statement that drops each.
    leftovers: list[dict[str, Any]] = field(default_factory=list)
    #: The newest link of the chain of this source database (hex; bemi/chain.py): keep it outside the
    #: database, ``bemi_verify --head`` checks it later. None: no chain (yet), or not readable.
    chain_head: str | None = None

    @property
    def worker_running(self) -> bool:
        return self.worker is not None

    @property
    def exit_code(self) -> int:
        return EXIT_HEALTHY if self.healthy else EXIT_UNHEALTHY

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["worker_running"] = self.worker_running
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str)


def _one(conn: psycopg.Connection, query: Any, params: Any = None) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchone()


def _all(conn: psycopg.Connection, query: Any, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def _function(conn: psycopg.Connection, name: str, argtypes: str) -> tuple[sql.Composable, int, str | None] | None:
    """A function bemi installs (``migrate bemi``) in schema public: its qualified name, its oid, and
    None when it may be called, else the role that owns it (not a superuser nor this session's role:
    calling it would run that role's code with our privileges; a function of the same name in any
    other schema is never considered)."""
    row = _one(conn, """
        SELECT p.oid::int8 AS oid, CASE WHEN r.rolsuper OR r.rolname = current_user THEN NULL
                                        ELSE r.rolname::text END AS untrusted_owner
        FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
        WHERE p.pronamespace = 'public'::regnamespace AND p.proname = %s::name
          AND p.proargtypes::text = %s::text""",
        [name, argtypes])
    return (sql.Identifier("public", name), row["oid"], row["untrusted_owner"]) if row else None


def _table_exists(conn: psycopg.Connection, name: str) -> bool:
    """Is ``bemi.<name>`` there, and one of ours to read? (A table another role made first is
    not read: a view or a rule there would run its owner's code as us; bemi/trust.py.)"""
    # From the catalog, not to_regclass(): that needs USAGE on the schema, and a role without it is told
    # what to grant when it reads the table.
    row = _one(conn, "SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                     "WHERE n.nspname = %s::name AND c.relname = %s::name) AS e", [BEMI_SCHEMA, name])
    return bool(row and row["e"]) and not untrusted_tables(conn, [name])


# -- the parts ----------------------------------------------------------------------------

_CURRENT_LSN = ("CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() "
                "ELSE pg_current_wal_lsn() END")


def _slot(conn: psycopg.Connection, name: str) -> tuple[Slot, int]:
    row = _one(conn, f"""
        SELECT to_jsonb(s) AS s, ({_CURRENT_LSN} - s.restart_lsn)::int8 AS retained,
               s.restart_lsn::text AS restart_lsn, s.confirmed_flush_lsn::text AS confirmed,
               ({_CURRENT_LSN} - s.confirmed_flush_lsn)::int8 AS behind
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


def _worker(conn: psycopg.Connection, slot: Slot, database: str) -> Worker | None:
    """Who reads the slot: the replication connection holding it, or another session holding it.

    Only the slot tells (only a role with REPLICATION can hold one); a worker that is starting or
    reconnecting, not holding the slot at that moment, is not seen."""
    if slot.active and slot.active_pid:
        row = _one(conn, """
            SELECT a.application_name, a.client_addr::text AS client_addr, a.backend_start::text AS backend_start,
                   r.state
            FROM pg_stat_activity a LEFT JOIN pg_stat_replication r ON r.pid = a.pid
            WHERE a.pid = %s::int4""", [slot.active_pid]) or {}
        if row.get("state") is not None:
            return Worker(pid=slot.active_pid, via="replication connection", **row)
    if slot.active and slot.active_pid:  # someone else holds the slot (not a bemi worker)
        row = _one(conn, "SELECT application_name, client_addr::text AS client_addr, "
                         "backend_start::text AS backend_start FROM pg_stat_activity WHERE pid = %s::int4",
                   [slot.active_pid]) or {}
        return Worker(pid=slot.active_pid, via="slot held by a session", **row)
    return None


def _publication(conn: psycopg.Connection, name: str) -> Publication:
    row = _one(conn, """
        SELECT p.puballtables,
               (SELECT count(*) FROM pg_publication_tables t WHERE t.pubname = p.pubname)::int AS tables
        FROM pg_publication p WHERE p.pubname = %s::name""", [name])
    if row is None:
        return Publication(name=name)
    return Publication(name=name, exists=True, all_tables=row["puballtables"], tables=row["tables"])


# The rule of install.sql's _bemi_is_tracked, for a database where `migrate bemi` never ran.
_FALLBACK_TRACKED = """
    n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname <> 'changes'
    AND left(c.relname, 5) <> '_bemi'"""


def _tables(conn: psycopg.Connection, publication: Publication) -> Tables:
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
    rows = _all(conn, sql.SQL("""
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


def _checkpoint(conn: psycopg.Connection, slot: str, database: str) -> Checkpoint | None:
    """The worker's checkpoint row for this slot (read tolerantly: its key may grow)."""
    if not _table_exists(conn, "_bemi_worker_checkpoints"):
        return None
    rows = _all(conn, "SELECT to_jsonb(c) AS c, commit_lsn::text AS commit_lsn, end_lsn::text AS end_lsn, "
                      "(now() - c.committed_at) AS age FROM bemi._bemi_worker_checkpoints c "
                      "WHERE c.slot = %s::text", [slot])
    if not rows:
        return None
    mine = [r for r in rows if r["c"].get("database") in (None, database)] or rows
    r = max(mine, key=lambda r: _lsn(r["end_lsn"]))
    c = r["c"]
    age = r["age"].total_seconds() if r["age"] is not None else None
    return Checkpoint(commit_lsn=r["commit_lsn"], end_lsn=r["end_lsn"], committed_at=c.get("committed_at"),
                      age_seconds=round(age, 3) if age is not None else None, updated_at=c.get("updated_at"))


def _lsn(text: str | None) -> int:
    if not text:
        return 0
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def _dead_letters(conn: psycopg.Connection, slot: str) -> int:
    if not _table_exists(conn, "_bemi_worker_failures"):
        return 0
    has_slot = _one(conn, "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = "
                          "'bemi._bemi_worker_failures'::regclass AND attname = 'slot' AND NOT attisdropped) AS e")
    if has_slot and has_slot["e"]:
        row = _one(conn, "SELECT count(*)::int8 AS n FROM bemi._bemi_worker_failures WHERE slot = %s::text",
                   [slot])
    else:
        row = _one(conn, "SELECT count(*)::int8 AS n FROM bemi._bemi_worker_failures")
    return int(row["n"]) if row else 0


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


class _Busy(Exception):
    pass


# -- all of it ----------------------------------------------------------------------------

def collect(source: psycopg.Connection, destination: psycopg.Connection | None = None, *, slot: str = "bemi",
            publication: str = "bemi", max_lag_seconds: float = DEFAULT_MAX_LAG_SECONDS,
            max_retained_bytes: int = DEFAULT_MAX_RETAINED_BYTES) -> Status:
    destination = destination or source
    problems: list[str] = []
    warnings: list[str] = []
    info = _one(source, "SELECT current_database() AS db, current_user AS user, "
                        "current_setting('server_version_num')::int AS version, "
                        "current_setting('max_slot_wal_keep_size', true) AS keep, now() AS now")
    assert info is not None
    database, now = info["db"], info["now"]
    keep = info["keep"] or "n/a"
    dest_row = _one(destination, "SELECT current_database() AS db")
    dest_db = dest_row["db"] if dest_row else database

    the_slot, behind = _slot(source, slot)
    # A slot's name is the server's, its data one database's: another database's slot is not ours.
    foreign = the_slot.database if the_slot.exists and the_slot.database != database else None
    if foreign is not None:
        the_slot, behind = Slot(name=slot), 0
    worker = _worker(source, the_slot, database) if the_slot.exists else None
    pub = _publication(source, publication)
    tables = _tables(source, pub)
    unreadable = []
    for table in untrusted_tables(destination, BEMI_TABLES):
        warnings.append(f"{table.why} was not made by the worker's role nor a superuser: not read, and the worker "
                        "refuses to write to it (docs/security.md); check it, then have a superuser run "
                        "manage.py bemi_grants (it sets aside what is not the worker's)")
    try:
        checkpoint = _checkpoint(destination, slot, database)
    except psycopg.errors.InsufficientPrivilege:
        checkpoint = None
        unreadable.append("_bemi_worker_checkpoints")
    try:
        dead = _dead_letters(destination, slot)
    except psycopg.errors.InsufficientPrivilege:
        dead = 0
        unreadable.append("_bemi_worker_failures")

    # Lag in bytes: WAL after what is stored and confirmed (the slot, or the checkpoint when ahead of it).
    lag_bytes: int | None = None
    if the_slot.exists:
        lag_bytes = behind
        if checkpoint and checkpoint.end_lsn and the_slot.confirmed_flush_lsn:
            ahead = _lsn(checkpoint.end_lsn) - _lsn(the_slot.confirmed_flush_lsn)
            if ahead > 0:
                lag_bytes = max(behind - ahead, 0)

    # Lag in seconds: how long the oldest change not stored yet has been waiting.
    lag_seconds: float | None = None
    lag_source = "no slot"
    if the_slot.exists and the_slot.wal_status != "lost":
        if not lag_bytes:
            lag_seconds, lag_source = 0.0, "nothing waiting"
        elif worker is not None:
            row = _one(source, "SELECT extract(epoch FROM coalesce(replay_lag, flush_lag))::float8 AS lag "
                               "FROM pg_stat_replication WHERE pid = %s::int4", [worker.pid])
            if row is not None:
                lag_seconds, lag_source = round(row["lag"] or 0.0, 3), "pg_stat_replication (replay_lag)"
            else:
                lag_source = "unknown while a worker reads the slot (its bemi_replication_lag_seconds metric has it)"
        else:
            try:
                first, lag_source = _first_waiting(source, slot, database, publication,
                                                   _lsn(checkpoint.commit_lsn) if checkpoint else 0)
                lag_seconds = 0.0 if first is None else round(max((now - first).total_seconds(), 0.0), 3)
            except (_Busy, psycopg.Error) as exc:
                why = "a worker took the slot" if isinstance(exc, _Busy) else str(exc).strip().splitlines()[0]
                if checkpoint and checkpoint.age_seconds is not None:
                    lag_seconds = checkpoint.age_seconds
                    lag_source = f"upper bound, the age of the last stored commit (could not peek: {why})"
                else:
                    lag_source = f"unknown (could not peek at the slot: {why})"

    # Problems: the status is unhealthy.
    if foreign is not None:
        problems.append(f"replication slot {slot!r} belongs to database {foreign!r} on this server, and this "
                        f"database {database!r} has no slot of that name: its changes are not being recorded. Give "
                        "each database its own slot: BEMI_SLOT (and BEMI_PUBLICATION) in its Django settings, or "
                        "--slot (docs/worker.md)")
    elif not the_slot.exists:
        problems.append(f"replication slot {slot!r} does not exist: changes are not being recorded "
                        "(the worker creates it on its first start)")
    else:
        if the_slot.wal_status == "lost":
            problems.append(f"replication slot {slot!r} is invalidated (wal_status = 'lost'): the WAL it needed was "
                            "removed and changes were lost; see docs/worker.md (safety checks)")
        if the_slot.plugin != "pgoutput":
            problems.append(f"replication slot {slot!r} is for plugin {the_slot.plugin!r}, not pgoutput")
        if (max_retained_bytes > 0 and the_slot.retained_wal_bytes is not None
                and the_slot.retained_wal_bytes > max_retained_bytes):
            problems.append(f"slot {slot!r} retains {format_bytes(the_slot.retained_wal_bytes)} of WAL, more than "
                            f"--max-retained-bytes ({format_bytes(max_retained_bytes)})")
        if worker is None and lag_seconds is not None and lag_seconds > max_lag_seconds:
            problems.append(f"no worker is running and changes have been waiting {lag_seconds:.0f} s, more than "
                            f"--max-lag-seconds ({max_lag_seconds:g} s): start the worker")

    # Warnings: worth a look, still healthy.
    if keep == "-1":
        warnings.append("max_slot_wal_keep_size = -1 (unbounded): a stopped worker's slot keeps WAL until the disk "
                        "is full. Bound it above the longest worker outage you accept, e.g. "
                        "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); "
                        "(past it the slot is invalidated and changes are lost, but the database keeps running)")
    if the_slot.wal_status in ("extended", "unreserved"):
        warnings.append(f"slot {slot!r} has wal_status = {the_slot.wal_status!r}: it retains more WAL than "
                        "max_wal_size" + (" and will be invalidated at the next checkpoint unless the worker "
                                          "catches up" if the_slot.wal_status == "unreserved" else ""))
    if the_slot.exists and worker is None and not any("no worker is running" in p for p in problems):
        warnings.append("no worker is reading the slot" + (
            f" (changes waiting {lag_seconds:.0f} s; unhealthy after {max_lag_seconds:g} s)"
            if lag_seconds else ""))
    if lag_seconds is None and the_slot.exists and worker is None and the_slot.wal_status != "lost":
        warnings.append(f"lag in seconds unknown: {lag_source}")
    if not pub.exists:
        warnings.append(f"publication {publication!r} does not exist (the worker creates it on its first start)")
    if tables.missing_from_publication:
        warnings.append(f"tracked tables missing from publication {publication!r}: "
                        + ", ".join(tables.missing_from_publication)
                        + " (the running worker adds them within a second; without a replica identity it "
                          "cannot, see its log)")
    if tables.without_trigger:
        warnings.append("tracked tables without their bemi trigger: " + ", ".join(tables.without_trigger)
                        + " (as their owner run: CALL public._bemi_create_triggers();)")
    if tables.without_replica_identity_full:
        warnings.append("tracked tables without REPLICA IDENTITY FULL (their before values are incomplete): "
                        + ", ".join(tables.without_replica_identity_full)
                        + " (as their owner run: CALL public._bemi_set_replica_identity();)")
    if "not installed" in tables.rule:
        warnings.append("bemi's SQL functions are not installed in the source database "
                        "(python manage.py migrate bemi): no triggers, new tables not tracked at once")
    if unreadable:
        warnings.append(f"role {info['user']!r} may not read " + " and ".join(f"{BEMI_SCHEMA}.{t}" for t in unreadable)
                        + f" in database {dest_db!r}, so the checkpoint and dead letters are unknown: GRANT SELECT ON "
                        + ", ".join(f"{BEMI_SCHEMA}.{t}" for t in unreadable) + f" TO {info['user']}; "
                        + f"GRANT USAGE ON SCHEMA {BEMI_SCHEMA} TO {info['user']};")
    if dead:
        warnings.append(f"{dead} dead letters wait in _bemi_worker_failures (changes the destination rejected)")
    leftovers = []
    if "_bemi_worker_checkpoints" not in unreadable:  # it tells a stopped worker's slot from a leftover
        try:
            with source.cursor(row_factory=tuple_row) as cursor:
                leftovers = find_leftovers(cursor, in_use_slots=[slot], in_use_publications=[publication])
        except psycopg.errors.InsufficientPrivilege:
            pass  # a source role that may not read the checkpoints: no leftover is claimed
    warnings.extend(leftover.message for leftover in leftovers)
    if not _table_exists(destination, "changes"):
        warnings.append(f"no changes table in database {dest_db!r} yet (the worker creates it on its first start)")

    return Status(
        healthy=not problems, problems=problems, warnings=warnings, source_database=database,
        destination_database=dest_db, server_version=info["version"], max_slot_wal_keep_size=keep,
        slot=the_slot, worker=worker, publication=pub, tables=tables, checkpoint=checkpoint,
        lag_bytes=lag_bytes, lag_seconds=lag_seconds, lag_seconds_source=lag_source, dead_letters=dead,
        max_lag_seconds=max_lag_seconds, max_retained_bytes=max_retained_bytes,
        checked_at=now.astimezone(timezone.utc).isoformat(timespec="seconds"),
        leftovers=[leftover.as_dict() for leftover in leftovers],
        chain_head=_chain_head(destination, database),
    )


def _chain_head(conn: psycopg.Connection, database: str) -> str | None:
    """The head of this database's chain: its checkpoint's (committed with the rows), else the newest
    stored link or cut (a role that may not read the checkpoints)."""
    heads = []
    for query in (sql.SQL("SELECT chain_head AS link FROM {} WHERE database = %s::text AND chain_head IS NOT NULL "
                          "ORDER BY commit_lsn DESC LIMIT 1").format(tables.CHECKPOINTS),
                  sql.SQL("SELECT chain_link AS link FROM {} WHERE database = %s::text AND chain_link IS NOT NULL "
                          "AND commit_position IS NOT NULL ORDER BY commit_position DESC, change_index DESC "
                          "LIMIT 1").format(tables.CHANGES)):
        try:
            with conn.transaction():
                row = _one(conn, query, [database])
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable,
                psycopg.errors.UndefinedColumn):
            continue
        if row is not None:
            heads.append(bytes(row["link"]).hex())
            break
    return heads[0] if heads else None


# -- the screen ---------------------------------------------------------------------------

def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def render_text(status: Status) -> str:
    s = status
    slot = s.slot
    lines = [f"bemi status of database {s.source_database} (changes in {s.destination_database}) "
             f"at {s.checked_at}: {'HEALTHY' if s.healthy else 'UNHEALTHY'}", ""]
    row = lines.append

    if not slot.exists:
        row(f"slot          {slot.name}: missing")
    else:
        row(f"slot          {slot.name} ({slot.plugin}), wal_status {slot.wal_status}")
        if s.worker:
            w = s.worker
            who = ", ".join(x for x in (w.application_name and f"application {w.application_name}",
                                        w.client_addr and f"from {w.client_addr}",
                                        w.backend_start and f"since {w.backend_start[:19]}") if x)
            row(f"worker        running: pid {w.pid} ({w.via}{', ' + who if who else ''})")
        else:
            row("worker        none running")
        row(f"confirmed     {slot.confirmed_flush_lsn} (restart_lsn {slot.restart_lsn})")
        safe = ("unbounded (max_slot_wal_keep_size = -1)" if s.max_slot_wal_keep_size == "-1"
                else format_bytes(slot.safe_wal_size) + " more before the slot is invalidated")
        row(f"retained WAL  {format_bytes(slot.retained_wal_bytes)}; safe_wal_size {safe}")
    pub = s.publication
    if pub.exists:
        row(f"publication   {pub.name}: {'FOR ALL TABLES' if pub.all_tables else f'{pub.tables} tables'}")
    else:
        row(f"publication   {pub.name}: missing")
    t = s.tables
    row(f"tables        {t.tracked} tracked; missing from the publication: "
        f"{', '.join(t.missing_from_publication) or 'none'}; without trigger: {', '.join(t.without_trigger) or 'none'}; "
        f"without REPLICA IDENTITY FULL: {', '.join(t.without_replica_identity_full) or 'none'}")
    c = s.checkpoint
    if c:
        row(f"checkpoint    last stored commit {c.commit_lsn} committed {c.committed_at} ({_ago(c.age_seconds)})")
    else:
        row("checkpoint    none (nothing stored from this slot yet)")
    if s.chain_head:
        row(f"chain head    {s.chain_head} (keep it elsewhere; bemi_verify --head checks it)")
    lag_b = "unknown" if s.lag_bytes is None else format_bytes(s.lag_bytes)
    if s.lag_seconds is None:
        row(f"lag           {lag_b}; seconds: {s.lag_seconds_source}")
    else:
        row(f"lag           {lag_b}, {s.lag_seconds:.1f} s ({s.lag_seconds_source})")
    row(f"dead letters  {s.dead_letters}")
    row(f"thresholds    --max-lag-seconds {s.max_lag_seconds:g}, --max-retained-bytes "
        f"{format_bytes(s.max_retained_bytes) if s.max_retained_bytes else 'off'}")
    for title, items in (("problems", s.problems), ("warnings", s.warnings)):
        if items:
            row("")
            row(f"{title}:")
            for item in items:
                row(f"  - {item}")
    return "\n".join(lines)


# -- the command line (shared by bemi-worker status and manage.py bemi_status) -------------

def add_status_arguments(parser) -> None:
    """The options after ``--slot`` and ``--publication`` (``bemi.cli.add_name_arguments``)."""
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of the screen")
    parser.add_argument("--max-lag-seconds", type=float, default=DEFAULT_MAX_LAG_SECONDS,
                        help="unhealthy when no worker runs and a change has waited longer than this "
                             f"(default: {DEFAULT_MAX_LAG_SECONDS:g})")
    parser.add_argument("--max-retained-bytes", type=parse_bytes, default=DEFAULT_MAX_RETAINED_BYTES,
                        help="unhealthy when the slot retains more WAL than this; units kB, MB, GB, TB; "
                             "0: never (default: 1GB)")


STATUS_EPILOG = """\
exit status: 0 healthy; 1 unhealthy (slot missing or lost, retained WAL above
--max-retained-bytes, or no worker running and a change waiting longer than
--max-lag-seconds); 2 the status could not be read (connection, privileges).
Warnings (max_slot_wal_keep_size = -1, wal_status extended/unreserved, tables
without trigger, publication or REPLICA IDENTITY FULL, dead letters) do not
change the exit status. See docs/operations.md.
"""


def run(source_dsn: str, destination_dsn: str | None, options, out, err) -> int:
    """Collect, print (screen or JSON), return the exit status."""
    try:
        source = connect(source_dsn)
    except psycopg.Error as exc:
        err.write(f"bemi status: cannot connect to the source database: {exc}".strip() + "\n")
        return EXIT_ERROR
    destination = None
    try:
        if destination_dsn:
            try:
                destination = connect(destination_dsn)
            except psycopg.Error as exc:
                err.write(f"bemi status: cannot connect to the destination database: {exc}".strip() + "\n")
                return EXIT_ERROR
        try:
            status = collect(source, destination, slot=options.slot, publication=options.publication,
                             max_lag_seconds=options.max_lag_seconds,
                             max_retained_bytes=options.max_retained_bytes)
        except psycopg.Error as exc:
            err.write(f"bemi status: cannot read the status: {exc}".strip() + "\n")
            return EXIT_ERROR
    finally:
        source.close()
        if destination is not None:
            destination.close()
    out.write((status.to_json() if options.json else render_text(status)) + "\n")
    return status.exit_code
