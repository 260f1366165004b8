"""Time partitions of ``changes``: create them ahead, move strays, drop old history.

``changes`` is partitioned by range on ``committed_at`` (UTC), one partition per
day, ISO week or month (``changes_p20250101``: the period's first day), plus a
DEFAULT partition ``changes_default`` that catches a change for which no
partition exists at that moment, so a write never fails for want of a
partition (see docs/retention.md). No Django here: psycopg and ``psycopg.sql``.

Every statement names bemi's objects with their schema (``bemi``) and every
identifier goes through ``sql.Identifier``; nothing depends on ``search_path``.
Lock waits are bounded (``lock_timeout``): maintenance that cannot get its lock
gives up and is tried again later, it never stalls the worker or the readers.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Iterator

import psycopg
from psycopg import sql

from bemi import tables
from bemi.words import counted
from bemi import chainstore

__all__ = [
    "INTERVALS", "DEFAULT_INTERVAL", "Partition", "Partitions", "PruneResult", "parse_retention",
    "period_start", "period_end", "partition_name",
]

log = logging.getLogger("bemi.worker")

UTC = timezone.utc
INTERVALS = ("day", "week", "month")
DEFAULT_INTERVAL = "month"
SCHEMA = tables.SCHEMA
TABLE = "changes"
DEFAULT_PARTITION = "changes_default"
PRUNE_LOG = "_bemi_pruned"
_STAGING = "_bemi_new_partition"
#: Advisory lock key (the first int4 of two) serialising partition DDL between processes.



# -- periods ---------------------------------------------------------------------------------

def check_interval(interval: str) -> str:
    if interval not in INTERVALS:
        raise ValueError(f"partition interval must be one of {', '.join(INTERVALS)}; got {interval!r}")
    return interval


def period_start(moment: datetime, interval: str) -> datetime:
    """The first instant (UTC midnight) of the day, ISO week (Monday) or month holding ``moment``."""
    day = moment.astimezone(UTC).date()
    if interval == "week":
        day -= timedelta(days=day.weekday())
    elif interval == "month":
        day = day.replace(day=1)
    else:
        check_interval(interval)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def period_end(start: datetime, interval: str) -> datetime | None:
    """The first instant after the period starting at ``start`` (None past year 9999)."""
    try:
        if interval == "day":
            return start + timedelta(days=1)
        if interval == "week":
            return start + timedelta(days=7)
        if start.month == 12:
            return start.replace(year=start.year + 1, month=1)
        return start.replace(month=start.month + 1)
    except OverflowError:
        return None
    except ValueError:
        return None


def partition_name(start: datetime) -> str:
    """``changes_p20250101``; a partition filling a gap that starts within a day: ``changes_p20250101_093000000000``."""
    start = start.astimezone(UTC)
    if start.time() == datetime.min.time():
        return f"{TABLE}_p{start:%Y%m%d}"
    return f"{TABLE}_p{start:%Y%m%d_%H%M%S%f}"


def parse_retention(value: Any) -> timedelta | None:
    """``BEMI_RETENTION`` / ``--retention``: a timedelta, or a number of days (``90``, ``'90'``, ``'90d'``).

    None, 0 or '' mean: keep everything.
    """
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = timedelta(days=value)
    elif isinstance(value, str):
        text = value.strip().lower()
        text = text[:-1] if text.endswith("d") else text
        try:
            result = timedelta(days=float(text))
        except ValueError:
            raise ValueError(f"retention must be a number of days (e.g. 90) or a timedelta; got {value!r}") from None
    else:
        raise ValueError(f"retention must be a number of days (e.g. 90) or a timedelta; got {value!r}")
    if result <= timedelta(0):
        raise ValueError(f"retention must be positive; got {value!r}")
    return result


# -- the layout in the catalog ---------------------------------------------------------------

@dataclass(frozen=True)
class Partition:
    name: str
    lower: datetime | None  # None: MINVALUE (or the DEFAULT partition)
    upper: datetime | None  # None: MAXVALUE (or the DEFAULT partition)
    default: bool = False

    def covers(self, moment: datetime) -> bool:
        return (not self.default and (self.lower is None or self.lower <= moment)
                and (self.upper is None or moment < self.upper))


def table_ident(name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(name))


CHANGES = table_ident(TABLE)


@dataclass
class PruneResult:
    cutoff: datetime
    dropped: list[Partition] = field(default_factory=list)
    dropped_rows: int = 0
    trimmed: dict[str, int] = field(default_factory=dict)  # partition -> rows deleted
    dry_run: bool = False

    @property
    def rows(self) -> int:
        return self.dropped_rows + sum(self.trimmed.values())


class Partitions:
    """Partition management of ``bemi.changes`` over one psycopg connection.

    Every method runs its own short transactions on ``conn``, which must be idle
    (no transaction open) when called. ``clock`` gives "now" (tests move it).
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        interval: str = DEFAULT_INTERVAL,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        lock_timeout_ms: int = 2000,
        table: str = TABLE,
    ) -> None:
        self.conn = conn
        self.table = table  # another name only while bemi_partition builds the new table
        self.ident = table_ident(table)
        self.interval = check_interval(interval)
        self.clock = clock
        self.lock_timeout_ms = lock_timeout_ms
        self._ranges: list[Partition] = []  # known non-default partitions, sorted by lower bound
        self._lowers: list[datetime] = []
        self._hot: Partition | None = None  # the partition the last checked moment fell into
        self.pending: set[datetime] = set()  # period starts written into the DEFAULT partition

    # -- reading the catalog ------------------------------------------------------------------
    def _tx(self):
        return self.conn.transaction()

    def is_partitioned(self) -> bool:
        with self._tx():
            row = _one(self.conn.execute(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = %s::name AND c.relname = %s::name "
                "AND c.relkind = 'p')", [SCHEMA, self.table]))
        return bool(row[0])

    def layout(self) -> list[Partition]:
        """The partitions of ``bemi.changes`` (the DEFAULT one last), refreshing the cache."""
        with self._tx():
            # The bounds' text is in the session's TimeZone and DateStyle: the server reads it back.
            rows = self.conn.execute(
                "SELECT name, bound = 'DEFAULT', "
                "  (pg_catalog.regexp_match(bound, '^FOR VALUES FROM \\(''([^'']*)''\\) TO'))[1]::timestamptz, "
                "  (pg_catalog.regexp_match(bound, ' TO \\(''([^'']*)''\\)$'))[1]::timestamptz "
                "FROM (SELECT c.relname::text AS name, pg_catalog.pg_get_expr(c.relpartbound, c.oid) AS bound "
                "      FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid "
                "      WHERE i.inhparent = %s::regclass) AS p", [f"{SCHEMA}.{self.table}"]).fetchall()
        parts: list[Partition] = []
        default: list[Partition] = []
        for name, is_default, lower, upper in rows:
            if is_default:
                default.append(Partition(name, None, None, default=True))
            else:  # None: MINVALUE / MAXVALUE
                parts.append(Partition(name, lower and lower.astimezone(UTC), upper and upper.astimezone(UTC)))
        parts.sort(key=lambda p: p.lower or datetime.min.replace(tzinfo=UTC))
        self._ranges = parts
        self._lowers = [p.lower or datetime.min.replace(tzinfo=UTC) for p in parts]
        self._hot = None
        return parts + default

    def find(self, moment: datetime) -> Partition | None:
        """The cached partition holding ``moment`` (None: it would go to the DEFAULT partition)."""
        hot = self._hot
        if hot is not None and hot.covers(moment):
            return hot
        i = bisect_right(self._lowers, moment) - 1
        if i >= 0 and self._ranges[i].covers(moment):
            self._hot = self._ranges[i]
            return self._hot
        return None

    # -- the sink's hook ------------------------------------------------------------------------
    def uncovered(self, moments: Iterable[datetime]) -> set[datetime]:
        """Period starts of the moments that no known partition holds."""
        missing: set[datetime] = set()
        last = None
        for moment in moments:
            if moment is last:
                continue
            last = moment
            if self.find(moment) is None:
                missing.add(period_start(moment, self.interval))
        return missing

    # -- creating ------------------------------------------------------------------------------
    def ensure_ahead(self) -> list[str]:
        """Make the current and the next period's partitions (by ``clock``) exist."""
        start = period_start(self.clock(), self.interval)
        following = period_end(start, self.interval)
        return self.ensure_periods([start] + ([following] if following else []))

    def ensure_periods(self, starts: Iterable[datetime]) -> list[str]:
        """Create the partitions of these periods (only the parts no partition covers yet),
        moving rows of those ranges out of the DEFAULT partition. Returns the names created."""
        created: list[str] = []
        self.layout()
        for start in sorted(set(starts)):
            end = period_end(start, self.interval)
            if end is None:
                continue  # past year 9999: such rows stay in the DEFAULT partition
            for lower, upper in self._gaps(start, end):
                name = self._create(lower, upper)
                if name:
                    created.append(name)
        if created:
            self.layout()
        return created

    def try_ensure(self, starts: Iterable[datetime]) -> list[str]:
        """ensure_periods() that never raises: on failure the rows stay in the DEFAULT partition
        (nothing is lost) and a warning says why; maintain() tries again later."""
        starts = set(starts)
        try:
            return self.ensure_periods(starts)
        except psycopg.Error as exc:
            _rollback(self.conn)
            log.warning("could not create the partitions of %s (%s); their changes go to %s.%s meanwhile",
                        ", ".join(sorted(s.date().isoformat() for s in starts)), str(exc).strip(), SCHEMA,
                        DEFAULT_PARTITION)
            self.pending |= starts
            return []

    def _gaps(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """The parts of [start, end) that no partition covers."""
        gaps = []
        cursor = start
        for part in self._ranges:
            lower = part.lower or datetime.min.replace(tzinfo=UTC)
            upper = part.upper or datetime.max.replace(tzinfo=UTC)
            if upper <= cursor or lower >= end:
                continue
            if lower > cursor:
                gaps.append((cursor, lower))
            cursor = max(cursor, upper)
            if cursor >= end:
                break
        if cursor < end:
            gaps.append((cursor, end))
        return gaps

    def _create(self, lower: datetime, upper: datetime) -> str | None:
        """One partition for [lower, upper): a new table, the DEFAULT partition's rows of that
        range moved into it, attached; one transaction. None when the lock was not granted."""
        name = partition_name(lower)
        conn = self.conn
        try:
            with self._tx(), _settings(conn, lock_timeout=f"{self.lock_timeout_ms}ms"):
                # One maintainer at a time, on a lock only the table's owner and roles that may rewrite
                # it can take (an advisory lock is anyone's: a LOGIN role holding it stalled every pass).
                # ATTACH PARTITION takes this mode on the parent anyway; reads and the worker's COPY go on.
                conn.execute(sql.SQL("LOCK TABLE {} IN SHARE UPDATE EXCLUSIVE MODE").format(self.ident))
                if _one(conn.execute("SELECT pg_catalog.to_regclass(%s)", [f"{SCHEMA}.{name}"]))[0]:
                    return None  # made meanwhile by another process
                has_default = _one(conn.execute("SELECT pg_catalog.to_regclass(%s)",
                                           [f"{SCHEMA}.{DEFAULT_PARTITION}"]))[0]
                # Made under a _bemi name, renamed once attached: the `migrate bemi` event triggers
                # then never see a new public table to track, publish or put triggers on.
                target = table_ident(_STAGING)
                conn.execute(sql.SQL(
                    "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)"
                ).format(target, self.ident))
                moved = 0
                if has_default:
                    default = table_ident(DEFAULT_PARTITION)
                    columns = self._columns()
                    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
                    # Lock the DEFAULT partition first: its rows of this range must not change under us.
                    conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(default))
                    cur = conn.execute(sql.SQL(
                        "WITH moved AS (DELETE FROM {default} WHERE committed_at >= %s AND committed_at < %s "
                        "RETURNING {cols}) INSERT INTO {target} ({cols}) SELECT {cols} FROM moved"
                    ).format(default=default, target=target, cols=cols), [lower, upper])
                    moved = cur.rowcount
                conn.execute(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                    self.ident, target, sql.Literal(lower), sql.Literal(upper)))
                conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(target, sql.Identifier(name)))
                # Its indexes, made by ATTACH after the staging name: changes_p20250101_committed_at_index...
                for index, parent in conn.execute(
                        "SELECT c.relname::text, p.relname::text FROM pg_catalog.pg_index i "
                        "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
                        "JOIN pg_catalog.pg_inherits h ON h.inhrelid = i.indexrelid "
                        "JOIN pg_catalog.pg_class p ON p.oid = h.inhparent "
                        "WHERE i.indrelid = %s::regclass", [f"{SCHEMA}.{name}"]).fetchall():
                    suffix = parent[len(self.table):] if parent.startswith(self.table) else "_" + parent
                    conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        table_ident(index), sql.Identifier((name + suffix)[:63])))
        except psycopg.errors.LockNotAvailable:
            log.warning("could not create partition %s.%s now (a lock was busy); its changes go to %s until "
                        "the next try", SCHEMA, name, DEFAULT_PARTITION)
            return None
        if moved:
            log.info("created partition %s.%s for %s .. %s, moving %d changes out of %s", SCHEMA, name,
                     lower.isoformat(), upper.isoformat(), moved, DEFAULT_PARTITION)
        else:
            log.info("created partition %s.%s for %s .. %s", SCHEMA, name, lower.isoformat(), upper.isoformat())
        return name

    def _columns(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum", [f"{SCHEMA}.{self.table}"]).fetchall()]

    def default_periods(self) -> set[datetime]:
        """Period starts of the rows sitting in the DEFAULT partition (a loose index scan)."""
        starts: set[datetime] = set()
        with self._tx():
            if not _one(self.conn.execute("SELECT pg_catalog.to_regclass(%s)",
                                     [f"{SCHEMA}.{DEFAULT_PARTITION}"]))[0]:
                return starts
            query = sql.SQL("SELECT min(committed_at) FROM {} WHERE committed_at >= %s").format(
                table_ident(DEFAULT_PARTITION))
            floor = datetime.min.replace(tzinfo=UTC)
            while True:
                (found,) = _one(self.conn.execute(query, [floor]))
                if found is None:
                    break
                start = period_start(found, self.interval)
                starts.add(start)
                end = period_end(start, self.interval)
                if end is None:
                    break
                floor = end
        return starts

    def maintain(self) -> list[str]:
        """Current and next partitions ready; rows of the DEFAULT partition moved where they belong."""
        created = self.ensure_ahead()
        strays = self.default_periods() | self.pending
        self.pending = set()
        if strays:
            created += self.ensure_periods(strays)
        return created

    # -- removing ------------------------------------------------------------------------------
    def prune(self, cutoff: datetime, *, dry_run: bool = False, batch_rows: int = 10_000,
              by: str = "bemi_prune", progress: Callable[[str], None] | None = None,
              retries: int = 30, whole_only: bool = False) -> PruneResult:
        """Remove every change committed before ``cutoff``.

        Partitions entirely before it are detached and dropped (a short lock on
        ``changes``, no row read); the partition that straddles it, and the DEFAULT partition,
        are trimmed with ``DELETE`` in batches of ``batch_rows``, one transaction
        each. Afterwards the current and next partitions exist again.

        ``whole_only`` (the worker's retention): drop whole partitions only; history
        is then gone up to the end of the last partition dropped (the cutoff
        recorded), and only the DEFAULT partition is trimmed to it.
        """
        say = progress or (lambda text: log.info("%s", text))
        cutoff = cutoff.astimezone(UTC)
        result = PruneResult(cutoff, dry_run=dry_run)
        parts = self.layout()
        whole = [p for p in parts if not p.default and p.upper is not None and p.upper <= cutoff]
        straddling = [p for p in parts if p.default or (p not in whole and (p.lower is None or p.lower < cutoff))]
        if whole_only:
            if not whole:
                return result
            cutoff = result.cutoff = max(p.upper for p in whole if p.upper is not None)
            straddling = [p for p in parts if p.default]
        for part in whole:
            rows = self._count(part.name)
            if dry_run:
                say(f"would drop partition {SCHEMA}.{part.name} ({_span(part)}, {counted(rows, 'change')})")
            else:
                if not self._detach_and_drop(part.name, retries, by, rows):
                    continue
                say(f"dropped partition {SCHEMA}.{part.name} ({_span(part)}, {counted(rows, 'change')})")
            result.dropped.append(part)
            result.dropped_rows += rows
        for part in straddling:
            count = self._trim(part.name, cutoff, batch_rows, dry_run, by)
            if count:
                result.trimmed[part.name] = count
                verb = "would delete" if dry_run else "deleted"
                say(f"{verb} {counted(count, 'change')} before {cutoff.isoformat()} from {SCHEMA}.{part.name}")
        if not dry_run:
            if result.rows or result.dropped:
                self._log_prune(result, by)
            self.ensure_ahead()
        return result

    def _count(self, name: str) -> int:
        with self._tx():
            return int(_one(self.conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_ident(name))))[0])

    def _detach_and_drop(self, name: str, retries: int, by: str = "bemi_prune", rows: int = 0) -> bool:
        """DETACH then DROP, one transaction (milliseconds: no row is written; an interruption
        leaves no detached orphan). A busy lock is retried after a pause instead of queueing readers.
        The chain's cut (its newest change per database, one index probe each) is recorded in it."""
        chained = self._chained()
        for attempt in range(retries):
            try:
                with self._tx(), _settings(self.conn, lock_timeout=f"{self.lock_timeout_ms}ms"):
                    for cut in chainstore.cut_at(self.conn, table_ident(name)) if chained else []:
                        chainstore.record_cut(self.conn, cut._replace(reason=by, changes=rows))
                    self.conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
                        self.ident, table_ident(name)))
                    self.conn.execute(sql.SQL("DROP TABLE {}").format(table_ident(name)))
                return True
            except psycopg.errors.LockNotAvailable:
                log.info("partition %s is busy (lock timeout), retrying", name)
                time.sleep(min(0.1 * (attempt + 1), 1.0))
            except psycopg.errors.UndefinedTable:
                return False  # dropped meanwhile by someone else
        log.warning("could not detach partition %s.%s after %d tries (lock busy); it is kept", SCHEMA, name, retries)
        return False

    def _chained(self) -> bool:
        with self._tx():
            return chainstore.has_chain(self.conn)

    def _trim(self, name: str, cutoff: datetime, batch_rows: int, dry_run: bool, by: str = "bemi_prune") -> int:
        target = table_ident(name)
        if dry_run:
            with self._tx():
                return int(_one(self.conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE committed_at < %s").format(
                    target), [cutoff]))[0])
        total = 0
        chained = self._chained()
        # With the chain: the newest deleted change per database is the cut, recorded in the same transaction.
        query = sql.SQL(
            "WITH gone AS (DELETE FROM {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE committed_at < %s "
            "LIMIT %s)) RETURNING database, commit_position, change_index, {link}) "
            "SELECT newest.*, (SELECT pg_catalog.count(*) FROM gone) FROM ("
            "SELECT DISTINCT ON (database) database, commit_position, change_index, link FROM gone "
            "ORDER BY database, commit_position DESC NULLS LAST, change_index DESC) newest"
        ).format(t=target, link=sql.SQL("chain_link AS link" if chained else "NULL::bytea AS link"))
        while True:
            try:
                with self._tx():
                    rows = self.conn.execute(query, [cutoff, batch_rows]).fetchall()
                    deleted = int(rows[0][4]) if rows else 0
                    for cut in chainstore.newest_of([r[:4] for r in rows]):
                        chainstore.record_cut(self.conn, cut._replace(reason=by, changes=deleted))
            except psycopg.errors.UndefinedTable:
                break
            total += deleted
            if deleted < batch_rows:
                break
        return total

    def _log_prune(self, result: PruneResult, by: str) -> None:
        with self._tx():
            self.conn.execute(sql.SQL(
                "INSERT INTO {} (pruned_before, partitions, changes, pruned_by) VALUES (%s, %s, %s, %s)"
            ).format(table_ident(PRUNE_LOG)), [result.cutoff, [p.name for p in result.dropped], result.rows, by])


@contextmanager
def _settings(conn: psycopg.Connection, **values: str) -> Iterator[None]:
    """Settings for the transaction block in hand, put back as they were when it succeeds (inside a
    caller's transaction SET LOCAL would outlive our savepoint; a failure rolls them back anyway)."""
    old = {name: _one(conn.execute("SELECT pg_catalog.current_setting(%s)", [name]))[0] for name in values}
    for name, value in values.items():
        conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", [name, value])
    yield
    for name, value in old.items():
        conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", [name, value])


def _one(cur: psycopg.Cursor[Any]) -> Any:
    """The row of a query that always returns one (psycopg types ``fetchone()`` as optional)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("a query that always returns a row returned none")
    return row


def _rollback(conn: psycopg.Connection) -> None:
    try:
        conn.rollback()
    except psycopg.Error:
        pass


def _span(part: Partition) -> str:
    lower = part.lower.date().isoformat() if part.lower else "MINVALUE"
    upper = part.upper.date().isoformat() if part.upper else "MAXVALUE"
    return f"{lower} .. {upper}"


def as_utc_date(value: date | datetime) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)
