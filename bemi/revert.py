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

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, router, transaction
from django.db.models import Q
from psycopg import sql

from bemi.appcontext import context as bemi_context

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
    using = using or _source_alias(selected)
    if not force:
        _check_later_changes(changes, selected)
    connection = connections[using]
    actions = []
    checked: set[tuple[str, str, str | None]] = set()
    tables: dict[tuple[str, str], _Table] = {}
    with transaction.atomic(using=using), connection.cursor() as cursor:
        for change in selected:
            row = (change.schema, change.table, change.primary_key)
            table = tables.get(row[:2])
            if table is None:
                table = tables[row[:2]] = _Table(cursor, connection, change.schema, change.table)
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
                raise RevertConflict(
                    f"Cannot revert {_describe(first)}: {_describe(later)} changed the row after it. "
                    "Revert that change too (add it to the set; newer changes are undone first), "
                    "or pass revert(force=True) to overwrite it.",
                    first,
                    later,
                )


class _Table:
    """A source table as the catalog names it: quoted name, primary key column, writable columns.

    Every identifier is quoted by ``psycopg.sql.Identifier`` (Django's
    ``quote_name`` does not double an embedded ``"``: a column named
    ``x") = (SELECT 1); DELETE FROM victim; --`` would run the ``DELETE``), and
    the names are the catalog's, not the recorded change's. ``%`` in a name is
    doubled: the composed text goes through Django's cursor with parameters.
    """

    def __init__(self, cursor: Any, connection: Any, schema: str, name: str) -> None:
        self.name = name
        self._raw = connection.connection  # the psycopg connection (for quoting)
        self.qualified = self.ident(schema, name)  # for messages until the catalog answers
        cursor.execute(
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
            "WHERE n.nspname OPERATOR(pg_catalog.=) %s::name AND c.relname OPERATOR(pg_catalog.=) %s::name "
            "AND c.relkind IN ('r', 'p')",
            [schema, name],
        )
        found = cursor.fetchone()
        if found is None:
            raise RevertError(f"Table {self.qualified} does not exist on this database: pass revert(using=<alias of the source database>).")
        oid, schema, name = found
        self.qualified = self.ident(schema, name)
        cursor.execute(
            "SELECT a.attname, a.attgenerated OPERATOR(pg_catalog.<>) '' FROM pg_catalog.pg_attribute a "
            "WHERE a.attrelid OPERATOR(pg_catalog.=) %s::oid AND a.attnum OPERATOR(pg_catalog.>) 0 "
            "AND NOT a.attisdropped ORDER BY a.attnum",
            [oid],
        )
        self.columns = [column for column, generated in cursor.fetchall() if not generated]
        cursor.execute(
            "SELECT a.attname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a "
            "ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) ANY(i.indkey) "
            "WHERE i.indrelid OPERATOR(pg_catalog.=) %s::oid AND i.indisprimary",
            [oid],
        )
        keys = [r[0] for r in cursor.fetchall()]
        if len(keys) != 1:
            raise RevertError(f"Table {self.qualified} has no single-column primary key; revert works row by row and needs one.")
        self.pk = keys[0]

    def ident(self, *names: str) -> str:
        """``"schema"."name"`` or ``"column"``, quoted by psycopg, ready for a query with parameters."""
        return sql.Identifier(*names).as_string(self._raw).replace("%", "%%")

    def query(self, template: str, columns: Sequence[str] = ()) -> str:
        """``template`` with ``{table}``, ``{where_pk}``, ``{columns}`` and ``{r_columns}`` filled in."""
        return sql.SQL(template).format(
            table=sql.SQL(self.qualified),
            where_pk=self.where_pk(),
            columns=sql.SQL(", ").join(sql.SQL(self.ident(c)) for c in columns),
            r_columns=sql.SQL(", ").join(sql.SQL("r.{}").format(sql.SQL(self.ident(c))) for c in columns),
        ).as_string(self._raw)

    def where_pk(self) -> sql.Composable:
        """``pk = <the text primary key converted to the column's type>`` (keeps the index usable)."""
        return sql.SQL(
            "{pk} = (SELECT r.{pk} FROM pg_catalog.jsonb_populate_record(NULL::{table}, "
            "pg_catalog.jsonb_build_object(%s::text, %s::text)) r)"
        ).format(pk=sql.SQL(self.ident(self.pk)), table=sql.SQL(self.qualified))

    def known(self, values: dict) -> list[str]:
        return [c for c in self.columns if c in values]


def _check_current_row(cursor: Any, table: _Table, change: "BemiChange", force: bool) -> bool:
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


def _undo(cursor: Any, table: _Table, change: "BemiChange") -> RevertAction:
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
    return json.dumps(values or {})


def _revert_context(change: "BemiChange") -> Any:
    """Label the revert's own writes with the change they undo (``bemi.context``, added to the current one)."""
    return bemi_context(bemi_revert=str(change.id))
