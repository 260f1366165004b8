"""The screen a person reads (``bemi_status`` without ``--json``).

One function a section, each returning its lines, in the order of ``SECTIONS``:
a new section is one more function there (and its field in ``report.Status``).
"""

from __future__ import annotations

from typing import Callable

from bemi.status.report import Status
from bemi.status.sizes import format_bytes


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _slot(s: Status) -> list[str]:
    slot = s.slot
    if not slot.exists:
        return [f"slot          {slot.name}: missing"]
    lines = [f"slot          {slot.name} ({slot.plugin}), wal_status {slot.wal_status}"]
    if s.worker:
        w = s.worker
        who = ", ".join(x for x in (w.application_name and f"application {w.application_name}",
                                    w.client_addr and f"from {w.client_addr}",
                                    w.backend_start and f"since {w.backend_start[:19]}") if x)
        lines.append(f"worker        running: pid {w.pid} ({w.via}{', ' + who if who else ''})")
    else:
        lines.append("worker        none running")
    lines.append(f"confirmed     {slot.confirmed_flush_lsn} (restart_lsn {slot.restart_lsn})")
    safe = ("unbounded (max_slot_wal_keep_size = -1)" if s.max_slot_wal_keep_size == "-1"
            else format_bytes(slot.safe_wal_size) + " more before the slot is invalidated")
    lines.append(f"retained WAL  {format_bytes(slot.retained_wal_bytes)}; safe_wal_size {safe}")
    return lines


def _publication(s: Status) -> list[str]:
    pub = s.publication
    if pub.exists:
        return [f"publication   {pub.name}: {'FOR ALL TABLES' if pub.all_tables else f'{pub.tables} tables'}"]
    return [f"publication   {pub.name}: missing"]


def _tables(s: Status) -> list[str]:
    t = s.tables
    return [f"tables        {t.tracked} tracked; missing from the publication: "
            f"{', '.join(t.missing_from_publication) or 'none'}; without trigger: "
            f"{', '.join(t.without_trigger) or 'none'}; "
            f"without REPLICA IDENTITY FULL: {', '.join(t.without_replica_identity_full) or 'none'}"]


def _checkpoint(s: Status) -> list[str]:
    c = s.checkpoint
    if c:
        return [f"checkpoint    last stored commit {c.commit_lsn} committed {c.committed_at} ({_ago(c.age_seconds)})"]
    return ["checkpoint    none (nothing stored from this slot yet)"]


def _chain_head(s: Status) -> list[str]:
    if s.chain_head:
        return [f"chain head    {s.chain_head} (keep it elsewhere; bemi_verify --head checks it)"]
    return []


def _lag(s: Status) -> list[str]:
    lag_b = "unknown" if s.lag_bytes is None else format_bytes(s.lag_bytes)
    if s.lag_seconds is None:
        return [f"lag           {lag_b}; seconds: {s.lag_seconds_source}"]
    return [f"lag           {lag_b}, {s.lag_seconds:.1f} s ({s.lag_seconds_source})"]


def _dead_letters(s: Status) -> list[str]:
    return [f"dead letters  {s.dead_letters}"]


def _nats(s: Status) -> list[str]:
    n = s.nats
    if not n:
        return []
    if not n["reachable"]:
        return [f"nats          {n['url']}: unreachable"]
    if not n["stream_exists"]:
        return [f"nats          {n['url']}: no stream {n['stream']}"]
    limits = ", ".join(x for x in (n["max_age_seconds"] and f"max age {n['max_age_seconds']:.0f} s",
                                   n["max_bytes"] and f"max bytes {format_bytes(n['max_bytes'])}") if x)
    lines = [f"nats stream   {n['stream']} at {n['url']}: {n['messages']} messages, {format_bytes(n['bytes'])}"
             f" (seq {n['first_seq']}-{n['last_seq']}{'; ' + limits if limits else ''})"]
    if n["reader_checkpoint"]:
        c = n["reader_checkpoint"]
        lines.append(f"nats reader   published through commit {c.get('committed_at')} (checkpoint at {c.get('at')})")
    if n["consumer_exists"]:
        lines.append(f"nats consumer {n['consumer']}: {n['consumer_pending']} not delivered, "
                     f"{n['consumer_ack_pending']} being stored; lag {n['consumer_lag_seconds']:.1f} s")
    else:
        lines.append(f"nats consumer {n['consumer']}: none yet")
    return lines


def _thresholds(s: Status) -> list[str]:
    return [f"thresholds    --max-lag-seconds {s.max_lag_seconds:g}, --max-retained-bytes "
            f"{format_bytes(s.max_retained_bytes) if s.max_retained_bytes else 'off'}"]


#: The screen's sections, top to bottom, between the verdict and the problems and warnings.
SECTIONS: tuple[Callable[[Status], list[str]], ...] = (
    _slot, _publication, _tables, _checkpoint, _chain_head, _lag, _dead_letters, _nats, _thresholds,
)


def render_text(status: Status) -> str:
    lines = [f"bemi status of database {status.source_database} (changes in {status.destination_database}) "
             f"at {status.checked_at}: {'HEALTHY' if status.healthy else 'UNHEALTHY'}", ""]
    for section in SECTIONS:
        lines.extend(section(status))
    for title, items in (("problems", status.problems), ("warnings", status.warnings)):
        if items:
            lines.extend(["", f"{title}:", *(f"  - {item}" for item in items)])
    return "\n".join(lines)
