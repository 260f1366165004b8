"""Table-level time travel: every row of a table as it was at a moment.

Built from today's rows and the changes committed after the moment, never
from the whole history: a row changed since is replaced by the ``before`` of
its earliest change after the moment (absent if that change created it, back
if a DELETE removed it); every other row is today's. The rebuilt table is a
``WITH "<table>" AS (...)`` in front of the SQL Django compiles for the
caller's queryset, so the filter, the order and the field conversions are
Django's own and PostgreSQL pushes the filter into both halves (an indexed
lookup stays indexed). Values go back through ``jsonb_populate_record``:
PostgreSQL reads the JSON exactly as ``to_jsonb`` wrote it (a numeric stays
exact), and Django converts the columns as for any query.

What the history cannot tell is never invented: a masked value (its digest
says only *that* it changed) raises ``MaskedValueError`` unless
``masked="none"``; then it and any column missing from the recorded row
(an ignored column, a column added later) is ``None`` and named in the
instance's ``bemi_unknown_fields``.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any, cast

from django.db import DEFAULT_DB_ALIAS, connections, models, router
from django.db.models import Q, TextField
from django.db.models.functions import Cast
from django.db.models.sql import Query

from bemi.sourcetable import SourceTable, SourceTableError
from bemi.tracking import MASK_PREFIX
from bemi.timetravel import HistoryPrunedError, TimeTravelError, check_when, pruned_before, resolve_schema_table

if TYPE_CHECKING:  # pragma: no cover
    from bemi.querysets import BemiChangeQuerySet

MASKED_CHOICES = ("raise", "none")


class MaskedValueError(TimeTravelError):
    """A row needs a masked value, which the history holds only as a digest.

    ``fields``: ``{primary key: columns}`` of the rows that needed one.
    """

    def __init__(self, message: str, fields: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.fields = fields


class _Restored:
    """The rows changed since the moment: their keys, and the ``before`` of those that existed then."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.elements: list[str] = []  # '{"b": <before, as stored>, "m": [masked columns]}'
        self.unknown: dict[str, tuple[list[str], list[str]]] = {}  # key -> (masked, missing columns)


def table_as_of(
    changes: "BemiChangeQuerySet",
    model_or_table: Any,
    when: dt.datetime,
    filter: Any = None,
    *,
    using: str | None = None,
    masked: str = "raise",
    **lookups: Any,
) -> list[Any]:
    """The rows of a table at ``when``: unsaved model instances (for a model), dicts (for a table name).

    ``filter`` (a ``Q``, a dict of lookups, or a queryset of the model) and
    ``lookups`` select rows by their values *at* ``when``; the result follows
    the queryset's order, else the primary key's.
    """
    when = check_when(when)
    if masked not in MASKED_CHOICES:
        raise ValueError(f"masked must be one of {MASKED_CHOICES}; got {masked!r}")
    schema, table, model = resolve_schema_table(model_or_table, changes)
    schema = schema or "public"
    if model is not None and '"."' in model._meta.db_table:
        raise TimeTravelError(
            f"table_as_of() does not support a db_table naming its schema ({model._meta.db_table!r}): "
            "the rebuilt table stands in for the unqualified name Django writes.")
    pruned = pruned_before(changes.db)
    if pruned is not None and when < pruned:
        raise HistoryPrunedError(
            f"Cannot tell the table {schema}.{table} as of {when.isoformat()}: the history before "
            f"{pruned.isoformat()} was pruned (bemi_prune or BEMI_RETENTION).", pruned)
    if model is None:
        if filter is not None or lookups:
            raise TypeError("A filter of rows needs the model: pass the model class instead of the table name.")
        alias = using or DEFAULT_DB_ALIAS
    else:
        queryset = _queryset(model, filter, lookups, using)
        alias = queryset.db
    connection = connections[alias]
    with connection.cursor() as cursor:
        try:
            source = SourceTable(cursor, connection, schema, table, caller="table_as_of")
        except SourceTableError as error:
            raise TimeTravelError(str(error)) from error
        restored = _restored(changes, schema, table, when, source.columns)
        prefix, params = _with_clause(source, table, restored)
        if model is None:
            cursor.execute(prefix + source.compose("SELECT * FROM {name} ORDER BY {pk}", name=table), params)
            names = [column.name for column in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
            return _checked(rows, restored, masked, lambda row: row[source.pk], lambda row, unknown: None)
    query = cast(_AsOfQuery, queryset.query.chain(_AsOfQuery))
    query.with_clause = (prefix, params)
    rebuilt = queryset.using(alias)
    rebuilt.query = query
    records = list(rebuilt)
    by_column = {f.column: f.attname for f in model._meta.concrete_fields}

    def flag(record: Any, unknown: list[str]) -> None:
        record.bemi_unknown_fields = frozenset(by_column.get(c, c) for c in unknown)

    nothing_unknown: frozenset[str] = frozenset()
    for record in records:
        record._state.adding, record._state.db = True, None  # unsaved, as as_of() gives them
        record.bemi_unknown_fields = nothing_unknown
    return _checked(records, restored, masked, lambda record: record.pk, flag)


class _AsOfQuery(Query):
    """Django's query of the model, run with the rebuilt table in front of it (``WITH "<table>" AS (...)``)."""

    with_clause: tuple[str, list[Any]] = ("", [])

    def get_compiler(self, using: Any = None, connection: Any = None, elide_empty: bool = True) -> Any:
        compiler = super().get_compiler(using, connection, elide_empty)
        plain = compiler.as_sql

        def as_sql(*args: Any, **kwargs: Any) -> tuple[str, tuple]:
            text, params = plain(*args, **kwargs)
            return self.with_clause[0] + text, (*self.with_clause[1], *params)

        compiler.as_sql = as_sql
        return compiler


def _queryset(model: type[models.Model], filter: Any, lookups: dict, using: str | None) -> models.QuerySet:
    if isinstance(filter, models.QuerySet):
        if filter.model is not model:
            raise TypeError(f"The queryset filters {filter.model.__name__}, not {model.__name__}.")
        queryset = filter if using is None else filter.using(using)
    else:
        queryset = model._default_manager.db_manager(using or router.db_for_read(model)).all()
        if isinstance(filter, dict):
            queryset = queryset.filter(**filter)
        elif isinstance(filter, Q):
            queryset = queryset.filter(filter)
        elif filter is not None:
            raise TypeError(f"filter must be a Q, a dict of lookups or a queryset of {model.__name__}; got {filter!r}")
    queryset = queryset.filter(**lookups)
    return queryset if queryset.ordered else queryset.order_by("pk")


def _restored(
    changes: "BemiChangeQuerySet", schema: str, table: str, when: dt.datetime, columns: list[str]
) -> _Restored:
    """The earliest change after ``when`` of each row changed since (one indexed query on ``changes``)."""
    order = changes.model._meta.ordering  # oldest first: commit time, commit position, index in it
    earliest = (
        changes.model._default_manager.using(changes.db)
        .filter(schema=schema, table=table, committed_at__gt=when)
        .order_by("primary_key", *(order or ())).distinct("primary_key")
        .values_list("primary_key", "operation", Cast("before", TextField()), "id")
    )
    restored = _Restored()
    unrecorded: TimeTravelError | None = None  # raised after the loop: a TRUNCATE (key None, sorted last) says more
    for key, operation, before, change_id in earliest.iterator(chunk_size=2000):
        if key is None:
            raise TimeTravelError(
                f"Cannot rebuild {schema}.{table} as of {when.isoformat()}: change {change_id} "
                f"({operation}) has no primary key" + (" (a TRUNCATE removed rows without recording them)"
                                                       if operation == "TRUNCATE" else "") + ".")
        if key.startswith(MASK_PREFIX):
            raise MaskedValueError(
                f"Cannot rebuild {schema}.{table} as of {when.isoformat()}: its primary key is masked "
                f"(BEMI_MASKED_COLUMNS; change {change_id}), so the rows changed since cannot be told from "
                "today's rows.", {key: ["primary_key"]})
        restored.keys.append(key)
        if operation == "CREATE":
            continue  # did not exist then
        values = json.loads(before)
        if not values:
            unrecorded = unrecorded or TimeTravelError(
                f"Row {key} of {table} changed after {when.isoformat()} ({operation}, change {change_id}) "
                "without its 'before' values. Run ALTER TABLE ... REPLICA IDENTITY FULL on the table "
                "(the bemi migration does) so that the worker records them.")
            continue
        hidden = [c for c, v in values.items() if isinstance(v, str) and v.startswith(MASK_PREFIX)]
        missing = [c for c in columns if c not in values]
        restored.elements.append('{"b":%s,"m":%s}' % (before, json.dumps(hidden)))
        if hidden or missing:
            restored.unknown[key] = (hidden, missing)
    if unrecorded is not None:
        raise unrecorded
    return restored


def _with_clause(source: SourceTable, name: str, restored: _Restored) -> tuple[str, list[Any]]:
    """``WITH "<name>" AS (today's unchanged rows UNION ALL the restored ones)``, ready for Django's cursor."""
    text = source.compose(
        "WITH {name} AS ("
        "SELECT t.* FROM {table} t WHERE NOT EXISTS (SELECT FROM pg_catalog.unnest(%s::pg_catalog.text[]) k(v) "
        "WHERE k.v OPERATOR(pg_catalog.=) t.{pk}::pg_catalog.text) "
        "UNION ALL "
        "SELECT r.* FROM pg_catalog.jsonb_array_elements(%s::pg_catalog.jsonb) x(v), "
        "LATERAL pg_catalog.jsonb_populate_record(NULL::{table}, "
        "(x.v OPERATOR(pg_catalog.->) 'b') OPERATOR(pg_catalog.-) "
        "ARRAY(SELECT pg_catalog.jsonb_array_elements_text(x.v OPERATOR(pg_catalog.->) 'm'))) r) ",
        name=name,
    )
    return text, [restored.keys, "[" + ",".join(restored.elements) + "]"]


def _checked(rows: list[Any], restored: _Restored, masked: str, key_of: Any, flag: Any) -> list[Any]:
    """Flag (or refuse) the rows that needed a value the history does not hold."""
    needing: dict[str, list[str]] = {}
    for row in rows:
        unknown = restored.unknown.get(str(key_of(row)))
        if unknown is None:
            continue
        hidden, missing = unknown
        if hidden:
            needing[str(key_of(row))] = hidden
        flag(row, [*hidden, *missing])
    if needing and masked == "raise":
        sample = ", ".join(f"{key} ({', '.join(columns)})" for key, columns in list(needing.items())[:5])
        raise MaskedValueError(
            f"{len(needing)} row(s) need a masked value, which the history holds only as a digest: {sample}. "
            "Pass masked='none' to get None for those columns (named in each row's bemi_unknown_fields).",
            needing)
    return rows
