"""The verdict: which facts make the status unhealthy (problems) and which are worth a look
(warnings), with what to do about each.

Healthy means: the slot exists and is not lost; its retained WAL is at most
``max_retained_bytes``; and, when no worker is running, no change has been
waiting longer than ``max_lag_seconds``. Pure functions of what ``collector``
read, so every rule is in one place (docs/operations.md lists them).
"""

from __future__ import annotations

from bemi.status.report import Status
from bemi.status.sizes import format_bytes
from bemi.tables import SCHEMA as BEMI_SCHEMA

#: No worker running and a change waiting longer than this: unhealthy (a restart takes seconds;
#: five minutes leaves room for a deploy without paging anyone).
DEFAULT_MAX_LAG_SECONDS = 300.0
#: WAL a slot may retain before the status is unhealthy (a caught-up worker retains at most about
#: 15 seconds of WAL, see docs/worker.md).
DEFAULT_MAX_RETAINED_BYTES = 1024 ** 3


def problems(s: Status, *, foreign: str | None) -> list[str]:
    """What makes the status unhealthy. ``foreign``: the database that owns a slot of our name, when
    it is another one (then ``s.slot`` is the missing slot of ours)."""
    slot, the_slot = s.slot.name, s.slot
    found: list[str] = []
    if foreign is not None:
        found.append(f"replication slot {slot!r} belongs to database {foreign!r} on this server, and this "
                     f"database {s.source_database!r} has no slot of that name: its changes are not being recorded. "
                     "Give each database its own slot: BEMI_SLOT (and BEMI_PUBLICATION) in its Django settings, or "
                     "--slot (docs/worker.md)")
    elif not the_slot.exists:
        found.append(f"replication slot {slot!r} does not exist: changes are not being recorded "
                     "(the worker creates it on its first start)")
    else:
        if the_slot.wal_status == "lost":
            found.append(f"replication slot {slot!r} is invalidated (wal_status = 'lost'): the WAL it needed was "
                         "removed and changes were lost; see docs/worker.md (safety checks)")
        if the_slot.plugin != "pgoutput":
            found.append(f"replication slot {slot!r} is for plugin {the_slot.plugin!r}, not pgoutput")
        if (s.max_retained_bytes > 0 and the_slot.retained_wal_bytes is not None
                and the_slot.retained_wal_bytes > s.max_retained_bytes):
            found.append(f"slot {slot!r} retains {format_bytes(the_slot.retained_wal_bytes)} of WAL, more than "
                         f"--max-retained-bytes ({format_bytes(s.max_retained_bytes)})")
        if s.worker is None and s.lag_seconds is not None and s.lag_seconds > s.max_lag_seconds:
            found.append(f"no worker is running and changes have been waiting {s.lag_seconds:.0f} s, more than "
                         f"--max-lag-seconds ({s.max_lag_seconds:g} s): start the worker")
    return found


def warnings(s: Status, problems: list[str], *, untrusted: list[str], unreadable: list[str], role: str,
             has_changes_table: bool) -> list[str]:
    """Worth a look, still healthy. ``untrusted``: bemi's tables another role made (their ``why``);
    ``unreadable``: bemi's tables ``role`` may not read in the destination."""
    slot, the_slot, publication, tables = s.slot.name, s.slot, s.publication.name, s.tables
    found = [f"{why} was not made by the worker's role nor a superuser: not read, and the worker refuses to "
             "write to it (docs/security.md); check it, then have a superuser run manage.py bemi_grants (it sets "
             "aside what is not the worker's)" for why in untrusted]
    if s.max_slot_wal_keep_size == "-1":
        found.append("max_slot_wal_keep_size = -1 (unbounded): a stopped worker's slot keeps WAL until the disk "
                     "is full. Bound it above the longest worker outage you accept, e.g. "
                     "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); "
                     "(past it the slot is invalidated and changes are lost, but the database keeps running)")
    if the_slot.wal_status in ("extended", "unreserved"):
        found.append(f"slot {slot!r} has wal_status = {the_slot.wal_status!r}: it retains more WAL than "
                     "max_wal_size" + (" and will be invalidated at the next checkpoint unless the worker "
                                       "catches up" if the_slot.wal_status == "unreserved" else ""))
    if the_slot.exists and s.worker is None and not any("no worker is running" in p for p in problems):
        found.append("no worker is reading the slot" + (
            f" (changes waiting {s.lag_seconds:.0f} s; unhealthy after {s.max_lag_seconds:g} s)"
            if s.lag_seconds else ""))
    if s.lag_seconds is None and the_slot.exists and s.worker is None and the_slot.wal_status != "lost":
        found.append(f"lag in seconds unknown: {s.lag_seconds_source}")
    if not s.publication.exists:
        found.append(f"publication {publication!r} does not exist (the worker creates it on its first start)")
    if tables.missing_from_publication:
        found.append(f"tracked tables missing from publication {publication!r}: "
                     + ", ".join(tables.missing_from_publication)
                     + " (the running worker adds them within a second; without a replica identity it "
                       "cannot, see its log)")
    if tables.without_trigger:
        found.append("tracked tables without their bemi trigger: " + ", ".join(tables.without_trigger)
                     + " (as their owner run: CALL public._bemi_create_triggers();)")
    if tables.without_replica_identity_full:
        found.append("tracked tables without REPLICA IDENTITY FULL (their before values are incomplete): "
                     + ", ".join(tables.without_replica_identity_full)
                     + " (as their owner run: CALL public._bemi_set_replica_identity();)")
    if "not installed" in tables.rule:
        found.append("bemi's SQL functions are not installed in the source database "
                     "(python manage.py migrate bemi): no triggers, new tables not tracked at once")
    if unreadable:
        qualified = [f"{BEMI_SCHEMA}.{t}" for t in unreadable]
        found.append(f"role {role!r} may not read " + " and ".join(qualified)
                     + f" in database {s.destination_database!r}, so the checkpoint and dead letters are unknown: "
                     + "GRANT SELECT ON " + ", ".join(qualified) + f" TO {role}; "
                     + f"GRANT USAGE ON SCHEMA {BEMI_SCHEMA} TO {role};")
    if s.dead_letters:
        found.append(f"{s.dead_letters} dead letters wait in _bemi_worker_failures (changes the destination rejected)")
    found.extend(leftover["message"] for leftover in s.leftovers)
    if not has_changes_table:
        found.append(f"no changes table in database {s.destination_database!r} yet (the worker creates it on its "
                     "first start)")
    return found
