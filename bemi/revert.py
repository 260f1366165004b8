"""Revert: undo a set of recorded changes on the source database.

Each change is undone by its inverse (CREATE -> DELETE, UPDATE -> UPDATE back
to ``before``, DELETE -> INSERT of ``before``), newest first, all in one
transaction. Values go back through ``jsonb_populate_record`` so PostgreSQL
converts the JSON to each column's type exactly as ``to_jsonb`` produced it.

Before writing anything, revert refuses (``RevertConflict``) when a row
changed after a change being undone by a change outside the set, or when the
row no longer looks like the newest change left it (a change the worker has
not recorded yet); ``force=True`` overrides both. Restoring a deleted row
whose primary key is taken again always fails with ``RevertError``.
Every statement runs under ``bemi.context(bemi_revert=<change id>)`` so that
the audit trail says which change it reverts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, router, transaction
from django.db.models import Q
from psycopg import sql

from bemi import exactjson
from bemi.appcontext import context as bemi_context
from bemi.sourcetable import SourceTable, SourceTableError
from bemi.tracking import MASK_PREFIX

if TYPE_CHECKING:  # pragma: no cover
    from bemi.models import BemiChange
    from bemi.querysets import BemiChangeQuerySet

REVERSIBLE = ("CREATE", "UPDATE", "DELETE")
INVERSE = {"CREATE": "DELETE", "UPDATE": "UPDATE", "DELETE": "INSERT"}


class RevertError(Exception):
    """A change cannot be reverted; the message says why and what to do."""


class RevertConflict(RevertError):
    """A row changed after a change being reverted."""

    def __init__(self, message: str, change: "BemiChange", conflicting: "BemiChange | None" = None) -> None:
        super().__init__(message)
        self.change = change
        self.conflicting = conflicting


@dataclass(frozen=True)
class RevertAction:
    """What revert did for one change: ``action`` is the SQL operation it ran."""

    change_id: Any
    table: str
    primary_key: str | None
    undone: str  # operation of the change undone
    action: str  # DELETE, UPDATE, INSERT, or NOTHING (already in that state, with force)

    def __str__(self) -> str:
        return f"{self.action} {self.table} {self.primary_key} (undoes {self.undone} {self.change_id})"


def _describe(change: "BemiChange") -> str:
    return (
        f"change {change.id} ({change.operation} of {change.table} {change.primary_key} "
        f"at {change.committed_at.isoformat()}, context {_short_context(change.context)})"
    )


def _short_context(context: dict) -> dict:
    return {k: v for k, v in (context or {}).items() if k != "SQL"}


def _key(change: "BemiChange") -> tuple:
    return (change.committed_at, change.commit_position, change.change_index)


def revert(
    changes: "BemiChangeQuerySet", *, force: bool = False, using: str | None = None
) -> list[RevertAction]:
    """Undo ``changes`` newest first in one transaction on the source database."""
    selected = list(changes.desc())
    if not selected:
        return []
    for change in selected:
        if change.operation not in REVERSIBLE:
            raise RevertError(
                f"Cannot revert {_describe(change)}: only CREATE, UPDATE and DELETE can be undone. "
                "Exclude it, e.g. .exclude(operation='TRUNCATE')."
            )
        if _masked_key(change):
            raise RevertError(
                f"Cannot revert {_describe(change)}: its primary key is masked (BEMI_MASKED_COLUMNS), so the "
                "row it changed cannot be found. Exclude it."
            )
    using = using or _source_alias(selected)
    if not force:
        _check_later_changes(changes, selected)
    connection = connections[using]
    actions = []
    checked: set[tuple[str, str, str | None]] = set()
    tables: dict[tuple[str, str], SourceTable] = {}
    with transaction.atomic(using=using), connection.cursor() as cursor:
        for change in selected:
            row = (change.schema, change.table, change.primary_key)
            table = tables.get(row[:2])
            if table is None:
                try:
                    table = tables[row[:2]] = SourceTable(cursor, connection, change.schema, change.table)
                except SourceTableError as error:
                    raise RevertError(str(error)) from error
            if row not in checked:  # the newest change of this row: is the row still as it left it?
                checked.add(row)
                if _check_current_row(cursor, table, change, force):
                    actions.append(RevertAction(change.id, change.table, change.primary_key, change.operation, "NOTHING"))
                    continue
            with _revert_context(change):
                actions.append(_undo(cursor, table, change))
    return actions


def _source_alias(changes: Iterable["BemiChange"]) -> str:
    """The database the changed tables live in: their model's write database, else default."""
    by_table = {m._meta.db_table: m for m in apps.get_models()}
    aliases = set()
    for table in {c.table for c in changes}:
        model = by_table.get(table)
        aliases.add(router.db_for_write(model) if model is not None else DEFAULT_DB_ALIAS)
    if len(aliases) > 1:
        raise RevertError(
            f"These changes come from tables in several databases ({', '.join(sorted(aliases))}); "
            "revert them separately, e.g. .filter(table=...).revert(using='<alias>')."
        )
    return aliases.pop()


def _check_later_changes(changes: "BemiChangeQuerySet", selected: list["BemiChange"]) -> None:
    """Refuse if a change outside the set touched a row after a change in the set."""
    for first, later in _later_changes(changes, selected):
        raise RevertConflict(
            f"Cannot revert {_describe(first)}: {_describe(later)} changed the row after it. "
            "Revert that change too (add it to the set; newer changes are undone first), "
            "or pass revert(force=True) to overwrite it.",
            first,
            later,
        )


def _later_changes(
    changes: "BemiChangeQuerySet", selected: list["BemiChange"]
) -> Iterator[tuple["BemiChange", "BemiChange"]]:
    """``(oldest change of a row in the set, a change outside the set after it)``, for each such change."""
    oldest: dict[tuple[str, str, str | None], "BemiChange"] = {}
    for change in selected:  # newest first: the last one seen per row is its oldest
        oldest[(change.schema, change.table, change.primary_key)] = change
    ids = {c.id for c in selected}
    manager = changes.model._default_manager.using(changes.db)
    rows = list(oldest.values())
    for start in range(0, len(rows), 200):
        chunk = rows[start:start + 200]
        condition = Q()
        for c in chunk:
            condition |= Q(schema=c.schema, table=c.table, primary_key=c.primary_key, committed_at__gte=c.committed_at)
        for later in manager.filter(condition).asc():
            first = oldest.get((later.schema, later.table, later.primary_key))
            if later.id not in ids and first is not None and _key(later) > _key(first):
                yield first, later


def _check_current_row(cursor: Any, table: SourceTable, change: "BemiChange", force: bool) -> bool:
    """Lock the row and check it is as ``change`` left it; True means nothing is left to undo."""
    cursor.execute(
        table.query("SELECT pg_catalog.to_jsonb(t) @> %s::jsonb FROM {table} t WHERE {where_pk} FOR UPDATE"),
        [_json(change.after), table.pk, change.primary_key],
    )
    found = cursor.fetchone()
    if change.operation == "DELETE":
        if found is not None:
            raise RevertError(
                f"Cannot restore row {change.primary_key} of {change.table} deleted by {_describe(change)}: "
                "a row with that primary key exists again. Delete it (or revert the change that created it, "
                "together with this one) before reverting."
            )
        return False
    if found is None:
        if force:
            return change.operation == "CREATE"  # already gone: nothing to delete
        raise RevertConflict(
            f"Cannot revert {_describe(change)}: the row no longer exists, deleted by a change the worker has "
            "not recorded yet. Wait for the worker and include that change, or pass revert(force=True).",
            change,
        )
    if not found[0] and not force:
        raise RevertConflict(
            f"Cannot revert {_describe(change)}: the row's current values differ from what it left "
            "(a newer change not recorded by the worker yet?). Wait for the worker and retry, "
            "or pass revert(force=True) to overwrite the current values.",
            change,
        )
    return False


def _masked(change: "BemiChange", columns: Iterable[str]) -> list[str]:
    """The columns among ``columns`` whose ``before`` is a masked value's digest (never its value)."""
    before = change.before or {}
    return [c for c in columns if isinstance(before.get(c), str) and before[c].startswith(MASK_PREFIX)]


def _masked_key(change: "BemiChange") -> bool:
    return bool(change.primary_key and change.primary_key.startswith(MASK_PREFIX))


def _refuse_masked(table: SourceTable, change: "BemiChange", columns: Iterable[str]) -> None:
    masked = _masked(change, columns)
    if masked:
        raise RevertError(
            f"Cannot revert {_describe(change)}: the value of {', '.join(masked)} before it is masked "
            "(BEMI_MASKED_COLUMNS): the history holds a digest, not the value, and writing the digest "
            f"would corrupt {table.qualified}. Set the column yourself, or exclude this change."
        )


def _undo(cursor: Any, table: SourceTable, change: "BemiChange") -> RevertAction:
    action = INVERSE[change.operation]
    pk_args = [table.pk, change.primary_key]
    if change.operation == "CREATE":
        cursor.execute(table.query("DELETE FROM {table} WHERE {where_pk}"), pk_args)
    elif change.operation == "UPDATE":
        if not change.before:
            raise RevertError(
                f"Cannot revert {_describe(change)}: its 'before' values were not recorded. "
                f"Run ALTER TABLE {table.qualified} REPLICA IDENTITY FULL (the bemi migration does) "
                "so that future changes can be reverted."
            )
        changed = set(change.diff())
        columns = [c for c in table.known(change.before) if c in changed]
        if not columns:
            return RevertAction(change.id, change.table, change.primary_key, change.operation, "NOTHING")
        _refuse_masked(table, change, columns)
        cursor.execute(
            table.query(
                "UPDATE {table} SET ({columns}) = (SELECT {r_columns} FROM "
                "pg_catalog.jsonb_populate_record(NULL::{table}, %s::jsonb) r) WHERE {where_pk}",
                columns,
            ),
            [_json(change.before), *pk_args],
        )
    else:
        columns = table.known(change.before)
        _refuse_masked(table, change, columns)
        try:
            with transaction.atomic(using=cursor.db.alias):
                cursor.execute(
                    table.query(
                        "INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE SELECT {r_columns} "
                        "FROM pg_catalog.jsonb_populate_record(NULL::{table}, %s::jsonb) r",
                        columns,
                    ),
                    [_json(change.before)],
                )
        except IntegrityError as error:
            raise RevertError(
                f"Cannot restore row {change.primary_key} of {change.table} deleted by {_describe(change)}: "
                f"{str(error).strip()}. Restore or revert what it refers to (or what now holds its unique "
                "values) first."
            ) from error
    return RevertAction(change.id, change.table, change.primary_key, change.operation, action)


def _json(values: dict) -> str:
    """The recorded values as JSON text, numbers with their recorded digits."""
    return exactjson.dumps(values or {})


def _revert_context(change: "BemiChange") -> Any:
    """Label the revert's own writes with the change they undo (``bemi.context``, added to the current one)."""
    return bemi_context(bemi_revert=str(change.id))


@dataclass(frozen=True)
class RevertStep:
    """What ``revert()`` would do for one change, and what stops it, read without writing anything.

    ``values``: the columns it would write and their recorded values (UPDATE: the columns the
    change modified, back to ``before``; INSERT: the row as it was deleted; DELETE: none).
    ``current``: the row now, as ``to_jsonb`` shows it (None: absent). ``problems``: why
    ``revert()`` would refuse (conflicts first; ``force=True`` overrides those that say so).
    """

    change: "BemiChange"
    action: str
    values: dict
    current: dict | None
    problems: tuple[str, ...]


def preview(changes: "BemiChangeQuerySet", *, using: str | None = None) -> list[RevertStep]:
    """What ``revert(changes)`` would do, newest first, with every problem it would stop at; writes nothing."""
    selected = list(changes.desc())
    if not selected:
        return []
    problems: dict[Any, list[str]] = {c.id: [] for c in selected}
    for change in selected:
        if change.operation not in REVERSIBLE:
            problems[change.id].append(f"only CREATE, UPDATE and DELETE can be undone, not {change.operation}")
    reversible = [c for c in selected if c.operation in REVERSIBLE]
    for first, later in _later_changes(changes, reversible):
        problems[first.id].append(f"conflict: {_describe(later)} changed the row after it (force overrides)")
    if not reversible:
        return [RevertStep(c, "NOTHING", {}, None, tuple(problems[c.id])) for c in selected]
    using = using or _source_alias(reversible)
    connection = connections[using]
    steps = []
    seen: set[tuple[str, str, str | None]] = set()
    tables: dict[tuple[str, str], SourceTable | None] = {}
    with connection.cursor() as cursor:
        for change in selected:
            found = problems[change.id]
            key = (change.schema, change.table)
            if key not in tables:
                try:
                    tables[key] = SourceTable(cursor, connection, change.schema, change.table)
                except SourceTableError as error:
                    tables[key] = None
                    found.append(str(error))
            table = tables[key]
            if _masked_key(change):
                found.append("its primary key is masked: the row cannot be found")
            if change.operation not in REVERSIBLE or table is None or _masked_key(change):
                steps.append(RevertStep(change, "NOTHING", {}, None, tuple(found)))
                continue
            cursor.execute(
                table.query("SELECT pg_catalog.to_jsonb(t)::pg_catalog.text, pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.@>) %s::pg_catalog.jsonb "
                            "FROM {table} t WHERE {where_pk}"),
                [_json(change.after), table.pk, change.primary_key])
            row = cursor.fetchone()
            current = exactjson.loads(row[0]) if row else None  # compared with the recorded (exact) values
            if (change.schema, change.table, change.primary_key) not in seen:  # the row's newest change
                seen.add((change.schema, change.table, change.primary_key))
                found.extend(_current_row_problems(change, current, bool(row and row[1])))
            values = _values_written(table, change)
            if change.operation == "UPDATE" and not change.before:
                found.append("its 'before' values were not recorded (no REPLICA IDENTITY FULL)")
            masked = _masked(change, values)
            if masked:
                found.append(f"the value of {', '.join(masked)} before it is masked: the history holds a digest, "
                             "not the value")
            steps.append(RevertStep(change, INVERSE[change.operation], values, current, tuple(found)))
    return steps


def _values_written(table: SourceTable, change: "BemiChange") -> dict:
    if change.operation == "UPDATE":
        changed = set(change.diff())
        return {c: change.before[c] for c in table.known(change.before or {}) if c in changed}
    if change.operation == "DELETE":
        return {c: change.before[c] for c in table.known(change.before or {})}
    return {}


def _current_row_problems(change: "BemiChange", current: dict | None, as_left: bool) -> list[str]:
    """What ``_check_current_row`` would refuse, from the row as it is now."""
    if change.operation == "DELETE":
        return [] if current is None else ["a row with that primary key exists again"]
    if current is None:
        return ["conflict: the row no longer exists (deleted by a change not recorded yet; force overrides)"]
    if not as_left:
        return ["conflict: the row's current values differ from what the change left (force overrides)"]
    return []

