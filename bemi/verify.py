"""Check the chain of stored changes: ``manage.py bemi_verify`` and ``bemi-worker verify`` (Django-free).

Reads ``changes`` per database in commit order (``commit_position``,
``change_index``) through a server-side cursor (bounded memory), recomputes each
link from the stored row (bemi/chain.py) and compares it with ``chain_link``.
Each chain starts at its newest cut (bemi/chainstore.py: where the worker
started it, or where pruning removed older changes), from the link recorded
there. At the end, the last link must be the head the worker's checkpoint holds
(when this role may read it) and, with ``--head``, contain the head published
earlier: that catches removal of the newest changes.

Exit status: 0 intact, 1 broken (naming the first change where it breaks), 2
when it cannot check. What it proves is in docs/security.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from bemi import chainstore, tables
from bemi.chain import GENESIS, canonical_json, change_bytes, link, parse_head
from bemi.trust import BEMI_TABLES, untrusted_tables

__all__ = ["EXIT_INTACT", "EXIT_BROKEN", "EXIT_ERROR", "Break", "ChainReport", "Report", "verify", "run",
           "render_text", "add_verify_arguments", "connect"]

EXIT_INTACT, EXIT_BROKEN, EXIT_ERROR = 0, 1, 2
FETCH_ROWS = 2000

SESSION = {"search_path": "pg_catalog, pg_temp", "TimeZone": "UTC", "statement_timeout": "0"}


@dataclass
class Break:
    """Where a chain breaks: ``id`` is the first change that does not verify (None when the break is after
    the last stored change: the newest changes were removed); ``after_id`` the last one that did."""

    reason: str
    id: str | None = None
    after_id: str | None = None
    table: str | None = None
    operation: str | None = None
    primary_key: str | None = None
    commit_position: int | None = None
    change_index: int | None = None


@dataclass
class ChainReport:
    database: str
    checked: int = 0  # changes whose link was recomputed and matched
    before_cut: int = 0  # changes at or before the cut (not checked: their predecessors are gone)
    unlinked: int = 0  # changes stored before the chain started (earlier versions), not covered
    cut: dict[str, Any] | None = None  # the cut the chain starts from
    head: str = ""  # the last link (hex)
    checkpoint_head: str | None = None  # what the worker's checkpoint says it is (None: unknown)
    broken: Break | None = None


@dataclass
class Report:
    chains: list[ChainReport] = field(default_factory=list)
    head_given: str | None = None
    head_found: bool | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def broken(self) -> Break | None:
        for chain in self.chains:
            if chain.broken:
                return chain.broken
        return None

    @property
    def exit_code(self) -> int:
        if self.error:
            return EXIT_ERROR
        if self.broken or self.head_found is False:
            return EXIT_BROKEN
        return EXIT_INTACT

    @property
    def status(self) -> str:
        return {EXIT_INTACT: "intact", EXIT_BROKEN: "broken", EXIT_ERROR: "error"}[self.exit_code]

    def as_dict(self) -> dict[str, Any]:
        broken = self.broken
        return {
            "status": self.status, "exit": self.exit_code, "error": self.error,
            "id": broken.id if broken else None, "reason": broken.reason if broken else (
                None if self.head_found is not False else f"head {self.head_given} is not in the chain"),
            "head": self.chains[0].head if len(self.chains) == 1 else None,
            "head_given": self.head_given, "head_found": self.head_found,
            "chains": [asdict(c) for c in self.chains], "notes": self.notes,
        }


class _CannotCheck(Exception):
    pass


def connect(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True, application_name="bemi-verify")
    for name, value in SESSION.items():
        conn.execute("SELECT pg_catalog.set_config(%s::text, %s::text, false)", [name, value])
    return conn


_ROWS = sql.SQL(
    'SELECT id::text, database::text, schema::text, "table"::text, primary_key::text, operation, before::text, '
    'after::text, context::text, '
    "pg_catalog.trunc(EXTRACT(EPOCH FROM committed_at) OPERATOR(pg_catalog.*) 1000000)::text, "
    "pg_catalog.trunc(EXTRACT(EPOCH FROM queued_at) OPERATOR(pg_catalog.*) 1000000)::text, "
    "transaction_id, position, commit_position, change_index, chain_link FROM {} "
    "WHERE commit_position IS NOT NULL {} ORDER BY database, commit_position, change_index")


def _checkpoint_heads(conn: psycopg.Connection, notes: list[str]) -> dict[str, bytes] | None:
    """Per database, the head of its newest checkpoint; None when this role may not read them."""
    conn.execute("SAVEPOINT bemi_verify_checkpoints")
    try:
        rows = conn.execute(sql.SQL(
            "SELECT DISTINCT ON (database) database, chain_head FROM {} WHERE chain_head IS NOT NULL "
            "ORDER BY database, commit_lsn DESC").format(tables.CHECKPOINTS)).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        conn.execute("ROLLBACK TO SAVEPOINT bemi_verify_checkpoints")
        notes.append("the worker's checkpoint is not readable by this role: removal of the newest changes is "
                     "caught only with --head")
        return None
    except psycopg.errors.UndefinedTable:
        conn.execute("ROLLBACK TO SAVEPOINT bemi_verify_checkpoints")
        return {}
    conn.execute("RELEASE SAVEPOINT bemi_verify_checkpoints")
    return {r[0]: bytes(r[1]) for r in rows}


def _cuts(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    rows = conn.execute(sql.SQL(
        "SELECT DISTINCT ON (database) database, commit_position, change_index, link, reason, changes, "
        "cut_at::text, cut_by FROM {} ORDER BY database, commit_position DESC, change_index DESC, "
        "cut_at DESC").format(tables.CHAIN_CUTS)).fetchall()
    return {r[0]: {"commit_position": r[1], "change_index": r[2], "link": bytes(r[3]).hex(), "reason": r[4],
                   "changes": r[5], "cut_at": r[6], "cut_by": r[7]} for r in rows}


class _Walk:
    """One database's chain, fed its rows in commit order."""

    def __init__(self, database: str, cut: dict[str, Any] | None, head: bytes | None,
                 checkpoint_head: bytes | None) -> None:
        self.report = ChainReport(database, cut=cut)
        self.prev = bytes.fromhex(cut["link"]) if cut else GENESIS
        self.prev2: bytes | None = None
        self.cut_at = (cut["commit_position"], cut["change_index"]) if cut else None
        self.started = cut is not None
        self.start_cut = bool(cut) and cut["reason"] == "start"  # type: ignore[index]
        self.head = head
        self.head_found = head is not None and cut is not None and self.prev == head
        self.checkpoint_head = checkpoint_head
        self.report.checkpoint_head = checkpoint_head.hex() if checkpoint_head else None
        self.checkpoint_seen = checkpoint_head is not None and self.prev == checkpoint_head
        self.after_checkpoint: tuple | None = None  # the first change after the checkpoint's head
        self.last_id: str | None = None
        self._ctx_in: str | None = None
        self._ctx_out = ""

    def feed(self, row: tuple) -> bool:
        """False when the chain breaks at this row (the report says where)."""
        (id_, database, schema, table, primary_key, operation, before, after, context, committed_at, queued_at,
         transaction_id, position, commit_position, change_index, stored) = row
        report = self.report
        if self.cut_at is not None and (commit_position, change_index) <= self.cut_at:
            if self.start_cut:
                report.unlinked += 1  # stored before the worker started the chain
            else:
                report.before_cut += 1
            return True
        if stored is None and not self.started:
            report.unlinked += 1  # stored before the chain started, and no cut says where it did
            return True
        self.started = True
        if stored is None:
            return self._break(row, "it has no link: it was inserted after the fact (or stored by a worker "
                                    "running without the chain)")
        stored = bytes(stored)
        if context != self._ctx_in:
            self._ctx_in, self._ctx_out = context, canonical_json(context)
        data = change_bytes(database, schema, table, primary_key, operation, canonical_json(before),
                            canonical_json(after), self._ctx_out, committed_at, queued_at, transaction_id, position,
                            commit_position, change_index)
        expected = link(self.prev, data)
        if stored != expected:
            if self.prev2 is not None and stored == link(self.prev2, data):
                return self._break(self._last_row, "it was inserted after the fact: the change after it "
                                                   "follows from the one before it", after_id=self._before_last)
            if report.checked == 0:
                reason = ("its link does not follow from where the chain starts: it was altered, or changes "
                          "before it were removed (or the cut record was)")
            else:
                reason = "its link does not follow from the change before it: it was altered, or changes " \
                         "before it were removed"
            return self._break(row, reason)
        if self.checkpoint_seen and self.after_checkpoint is None:
            self.after_checkpoint = row
        self.prev2, self.prev = self.prev, stored
        report.checked += 1
        if stored == self.head:
            self.head_found = True
        if stored == self.checkpoint_head:
            self.checkpoint_seen, self.after_checkpoint = True, None
        self._before_last, self._last_row, self.last_id = self.last_id, row, id_
        return True

    _last_row: tuple = ()
    _before_last: str | None = None

    def _break(self, row: tuple, reason: str, after_id: str | None = None) -> bool:
        self.report.broken = Break(
            reason, id=row[0], after_id=after_id if after_id is not None or row is self._last_row else self.last_id,
            table=f"{row[2]}.{row[3]}", operation=row[5], primary_key=row[4], commit_position=row[13],
            change_index=row[14])
        return False

    def finish(self) -> None:
        report = self.report
        report.head = self.prev.hex()
        if report.broken or self.checkpoint_head is None or self.prev == self.checkpoint_head:
            return
        if self.checkpoint_seen and self.after_checkpoint is not None:
            self._break(self.after_checkpoint, "it is after the head the worker's checkpoint holds: it was "
                                               "inserted after the fact")
            self.report.broken.after_id = None  # type: ignore[union-attr]
        else:
            report.broken = Break(
                "the worker's checkpoint holds head " + self.checkpoint_head.hex() + ", which is not in the "
                "chain: the newest changes were removed (the chain ends at change " + str(self.last_id) + ")",
                id=None, after_id=self.last_id)


def verify(conn: psycopg.Connection, head: bytes | None = None, database: str | None = None,
           fetch_rows: int = FETCH_ROWS) -> Report:
    """Walk every chain (or ``database``'s) of the destination ``conn`` (autocommit; one read-only
    repeatable-read transaction: rows, cuts and checkpoints seen at one instant)."""
    report = Report(head_given=head.hex() if head else None)
    try:
        untrusted = untrusted_tables(conn, BEMI_TABLES)
        if untrusted:
            raise _CannotCheck("refusing to read bemi's tables made by another role: "
                               + ", ".join(t.why for t in untrusted))
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            if not chainstore.has_chain(conn):
                raise _CannotCheck("no chain to check: table changes has no column chain_link or there is no "
                                   "table _bemi_chain_cuts (the worker adds them when it starts)")
            cuts = _cuts(conn)
            checkpoints = _checkpoint_heads(conn, report.notes)
            where = sql.SQL("")
            params: list[Any] = []
            if database is not None:
                where, params = sql.SQL("AND database OPERATOR(pg_catalog.=) %s::text"), [database]
            unlinked: dict[str, int] = dict(conn.execute(sql.SQL(
                "SELECT database::text, pg_catalog.count(*) FROM {} WHERE commit_position IS NULL {} "
                "GROUP BY 1").format(tables.CHANGES, where), params).fetchall())
            walks: dict[str, _Walk] = {}

            def walk_of(name: str) -> _Walk:
                walk = walks.get(name)
                if walk is None:
                    walk = walks[name] = _Walk(name, cuts.get(name), head, (checkpoints or {}).get(name))
                    walk.report.unlinked += int(unlinked.get(name, 0))
                return walk

            with conn.cursor(name="bemi_verify") as cursor:
                cursor.itersize = fetch_rows
                cursor.execute(_ROWS.format(tables.CHANGES, where), params)
                current: _Walk | None = None
                stopped = False
                while not stopped and (rows := cursor.fetchmany(fetch_rows)):
                    for row in rows:
                        if current is None or current.report.database != row[1]:
                            current = walk_of(row[1])
                        if not current.feed(row):
                            stopped = True
                            break
            if stopped and current is not None:
                walks = {current.report.database: current}  # the others are not read to their end
            else:
                for name in list(cuts) + list(checkpoints or {}) + list(unlinked):
                    if database is None or name == database:
                        walk_of(name)
            for name in sorted(walks):
                walk = walks[name]
                walk.finish()
                report.chains.append(walk.report)
            if not any(w.report.checked or w.report.cut or w.report.broken for w in walks.values()):
                if head is None:
                    raise _CannotCheck("no chain to check: no change carries a link and no chain was started "
                                       "(run the worker: it starts the chain)")
            if head is not None:
                report.head_found = any(w.head_found for w in walks.values())
    except _CannotCheck as exc:
        report.error = str(exc)
    except psycopg.Error as exc:
        report.error = f"cannot read the chain: {' '.join(str(exc).split())}"
    return report


def _count(n: int, what: str = "changes") -> str:
    return f"{n:,} {what if n != 1 else what[:-1]}"


def render_text(report: Report) -> str:
    if report.error:
        return f"cannot verify: {report.error}\n"
    lines: list[str] = []
    for chain in report.chains:
        start = "from the start of the chain"
        if chain.cut and chain.cut["reason"] != "start":
            start = (f"from where it was cut on {chain.cut['cut_at']} by {chain.cut['reason']} "
                     f"({_count(chain.cut['changes'])} removed)")
        extra = []
        if chain.before_cut:
            extra.append(f"{_count(chain.before_cut)} older than the cut, not checked")
        if chain.unlinked:
            extra.append(f"{_count(chain.unlinked)} stored before the chain started, not covered")
        more = f" ({'; '.join(extra)})" if extra else ""
        if chain.broken:
            b = chain.broken
            where = (f"change {b.id} ({b.table} {b.operation}, primary key {b.primary_key}, commit position "
                     f"{b.commit_position} #{b.change_index})" if b.id else "after the last stored change")
            lines.append(f"BROKEN: database {chain.database}: {where}: {b.reason}.")
            if b.after_id:
                lines.append(f"  the last change that verifies: {b.after_id} ({_count(chain.checked)} checked "
                             f"{start}{more})")
        else:
            lines.append(f"intact: database {chain.database}: {_count(chain.checked)} checked {start}{more}; "
                         f"head {chain.head}")
    if report.head_found is False:
        lines.append(f"BROKEN: head {report.head_given} is not in the chain: changes after it were removed, or "
                     "the chain was rewritten before it.")
    elif report.head_found:
        lines.append(f"head {report.head_given}: found in the chain")
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines) + "\n"


def add_verify_arguments(parser) -> None:
    parser.add_argument("--head", default=None, metavar="HEX",
                        help="a chain head published earlier (bemi_status --json key chain_head, the worker's log): "
                             "it must be in the chain, so removing the newest changes is caught too")
    parser.add_argument("--source-database", default=None, metavar="NAME",
                        help="check only the chain of this source database (default: every one)")
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of text")


def run(dsn: str, options: Any, out: Any, err: Any) -> int:
    """Connect, verify, print; the exit status."""
    head = None
    if getattr(options, "head", None):
        try:
            head = parse_head(options.head)
        except ValueError as exc:
            report = Report(error=f"--head: {exc}")
            _print(report, options, out, err)
            return report.exit_code
    try:
        conn = connect(dsn)
    except psycopg.Error as exc:
        report = Report(error=f"cannot connect: {' '.join(str(exc).split())}")
    else:
        with conn:
            report = verify(conn, head, getattr(options, "source_database", None))
    _print(report, options, out, err)
    return report.exit_code


def _print(report: Report, options: Any, out: Any, err: Any) -> None:
    if getattr(options, "json", False):
        out.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        (err if report.error else out).write(render_text(report))
