"""Time travel: a row as it was at a given moment, rebuilt from its changes.

The state at ``when`` is the ``after`` of the row's last change at or before
``when`` (nothing if that change is a DELETE). When there is no such change
but a later one exists, the row may predate tracking: the later change's
``before`` is the state then (it needs ``REPLICA IDENTITY FULL``).
Exact results therefore need every change recorded since the row was created
and ``REPLICA IDENTITY FULL`` on the table (the ``bemi`` migration sets it).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, TypeVar, overload

from django.apps import apps
from django.core.exceptions import ValidationError
from django.db import connections, models

from bemi import exactjson

if TYPE_CHECKING:  # pragma: no cover
    from bemi.models import BemiChange
    from bemi.querysets import BemiChangeQuerySet


class UnknownTableError(LookupError):
    """A table name that neither a Django model nor any recorded change uses."""


class TimeTravelError(ValueError):
    """The recorded changes cannot tell the state asked for."""


class HistoryPrunedError(TimeTravelError):
    """The history needed for the answer was removed (``bemi_prune``, ``BEMI_RETENTION``).

    ``pruned_before``: every change committed before that moment is gone.
    """

    def __init__(self, message: str, pruned_before: dt.datetime) -> None:
        super().__init__(message)
        self.pruned_before = pruned_before


# Tables seen in `changes`, per database alias: a table that has changes keeps them.
_known_tables: dict[str, set[str]] = {}


def resolve_table(
    model_or_table: Any, changes: "BemiChangeQuerySet"
) -> tuple[str, type[models.Model] | None]:
    """``(table name, model or None)`` for a model class, a model instance or a table name.

    A table name must be a model's ``db_table`` or have recorded changes, looked up
    through ``changes`` (any queryset of ``BemiChange``: its model and database).
    """
    if isinstance(model_or_table, models.Model):
        model_or_table = type(model_or_table)
    if isinstance(model_or_table, type) and issubclass(model_or_table, models.Model):
        model: type[models.Model] = model_or_table
        return model._meta.db_table, model
    if not isinstance(model_or_table, str) or not model_or_table:
        raise TypeError(
            "Pass a model class, a model instance or a table name (its db_table, "
            f"e.g. 'myapp_todo'); got {type(model_or_table).__name__} {model_or_table!r}"
        )
    table = model_or_table
    using = changes.db
    if table in _known_tables.get(using, ()) or any(m._meta.db_table == table for m in apps.get_models()):
        return table, None
    if changes.model._default_manager.using(using).filter(table=table).exists():
        _known_tables.setdefault(using, set()).add(table)
        return table, None
    raise UnknownTableError(
        f"Unknown table {table!r}: no Django model has this db_table and no change of it is "
        "recorded. Pass the table name as stored in changes.table (the model's "
        "_meta.db_table, e.g. 'myapp_todo', not the model name), or the model class itself."
    )


def model_schema_table(model: type[models.Model]) -> tuple[str, str]:
    """Where a model's rows are recorded: ``db_table = 'sales"."orders'`` is schema sales, any other public."""
    db_table = model._meta.db_table
    if '"."' in db_table:
        schema, table = db_table.split('"."', 1)
        return schema.strip('"'), table.strip('"')
    return "public", db_table


def resolve_schema_table(
    model_or_table: Any, changes: "BemiChangeQuerySet"
) -> tuple[str | None, str, type[models.Model] | None]:
    """``(schema or None, table, model or None)``: like resolve_table, and the schema.

    A model's schema comes from its ``db_table`` (public unless it names one); a string
    ``'schema.table'`` names both; a table name alone matches the table in any schema.
    """
    if isinstance(model_or_table, models.Model):
        model_or_table = type(model_or_table)
    if isinstance(model_or_table, type) and issubclass(model_or_table, models.Model):
        schema, table = model_schema_table(model_or_table)
        return schema, table, model_or_table
    if isinstance(model_or_table, str) and "." in model_or_table:
        schema, table = model_or_table.split(".", 1)
        using = changes.db
        models_there = [m for m in apps.get_models() if model_schema_table(m) == (schema, table)]
        if models_there:
            return schema, table, None
        if model_or_table in _known_tables.get(using, ()) or changes.model._default_manager.using(using).filter(
                schema=schema, table=table).exists():
            _known_tables.setdefault(using, set()).add(model_or_table)
            return schema, table, None
        if not any(m._meta.db_table == model_or_table for m in apps.get_models()):
            raise UnknownTableError(
                f"Unknown table {model_or_table!r}: no Django model has this schema and table and no change of "
                "it is recorded. Pass 'schema.table' as stored in changes.schema and changes.table, a table "
                "name alone, or the model class itself."
            )
    table, model = resolve_table(model_or_table, changes)
    return None, table, model


def check_when(when: Any) -> dt.datetime:
    if not isinstance(when, dt.datetime):
        raise TypeError(
            f"'when' must be a timezone-aware datetime, e.g. django.utils.timezone.now(); "
            f"got {type(when).__name__} {when!r}"
        )
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(
            f"'when' is a naive datetime ({when.isoformat()}): without a time zone it is ambiguous. "
            "Pass an aware one, e.g. django.utils.timezone.make_aware(when) or "
            "datetime(..., tzinfo=datetime.timezone.utc)."
        )
    return when


def check_primary_key(primary_key: Any) -> str:
    if primary_key is None or isinstance(primary_key, (dict, list, tuple, set)):
        raise TypeError(f"primary_key must be a single value such as 26 or '26'; got {primary_key!r}")
    return str(primary_key)


_M = TypeVar("_M", bound=models.Model)


@overload
def as_of(changes: "BemiChangeQuerySet", model_or_table: type[_M], primary_key: Any,
          when: dt.datetime) -> _M | None: ...
@overload
def as_of(changes: "BemiChangeQuerySet", model_or_table: _M, primary_key: Any, when: dt.datetime) -> _M | None: ...
@overload
def as_of(changes: "BemiChangeQuerySet", model_or_table: str, primary_key: Any,
          when: dt.datetime) -> dict[str, Any] | None: ...


def as_of(
    changes: "BemiChangeQuerySet", model_or_table: Any, primary_key: Any, when: dt.datetime
) -> models.Model | dict | None:
    """The row at ``when``: an unsaved model instance (for a model), a dict (for a
    table name), or None if the row did not exist then."""
    when = check_when(when)
    of_row, model = _row_changes(changes, model_or_table, primary_key)
    pruned = pruned_before(changes.db)
    if pruned is not None and when < pruned:
        table = model._meta.db_table if model is not None else model_or_table
        raise HistoryPrunedError(
            f"Cannot tell {table} {check_primary_key(primary_key)} as of {when.isoformat()}: the history "
            f"before {pruned.isoformat()} was pruned (bemi_prune or BEMI_RETENTION).", pruned)
    values = _values_at(of_row, when, pruned)
    if values is None:
        return None
    return to_instance(model, values) if model is not None else dict(values)


def _row_changes(
    changes: "BemiChangeQuerySet", model_or_table: Any, primary_key: Any
) -> tuple["BemiChangeQuerySet", type[models.Model] | None]:
    """All recorded changes of one row (whatever ``changes`` is filtered on), and its model if known."""
    schema, table, model = resolve_schema_table(model_or_table, changes)
    of_row = changes.model._default_manager.using(changes.db).filter(
        table=table, primary_key=check_primary_key(primary_key)
    )
    if schema is not None:
        of_row = of_row.filter(schema=schema)
    return of_row, model


def _values_at(of_row: "BemiChangeQuerySet", when: dt.datetime, pruned: dt.datetime | None = None) -> dict | None:
    last = of_row.filter(committed_at__lte=when).desc().first()
    if last is not None:
        return None if last.operation in ("DELETE", "TRUNCATE") else last.after
    following = of_row.filter(committed_at__gt=when).asc().first()
    if following is None and pruned is not None:
        # No change at all: the row may have been written before the cutoff and not changed since.
        raise HistoryPrunedError(
            f"No recorded change of this row, and the history before {pruned.isoformat()} was pruned: "
            "whether it existed then cannot be told.", pruned)
    if following is None or following.operation == "CREATE":
        return None
    if not following.before:
        raise TimeTravelError(
            f"Row {following.primary_key} of {following.table} existed before its first recorded change "
            f"({following.operation} at {following.committed_at.isoformat()}, id {following.id}), "
            "which has no 'before' values. Run ALTER TABLE ... REPLICA IDENTITY FULL on the table "
            "(the bemi migration does) so that the worker records them."
        )
    return following.before


_has_prune_log: set[str] = set()


def pruned_before(using: str) -> dt.datetime | None:
    """The latest cutoff of ``bemi_prune`` / retention on this database (None: nothing was pruned)."""
    with connections[using].cursor() as cursor:
        if using not in _has_prune_log:
            # The catalog, not to_regclass(): that raises without USAGE on schema bemi.
            cursor.execute("SELECT EXISTS (SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                           "ON n.oid OPERATOR(pg_catalog.=) c.relnamespace WHERE n.nspname OPERATOR(pg_catalog.=) "
                           "'bemi' AND c.relname OPERATOR(pg_catalog.=) '_bemi_pruned')")
            if not cursor.fetchone()[0]:
                return None
            _has_prune_log.add(using)
        cursor.execute('SELECT pg_catalog.max("pruned_before") FROM bemi._bemi_pruned')
        return cursor.fetchone()[0]


def to_instance(model: type[_M], values: dict) -> _M:
    """An unsaved instance of ``model`` from a JSON row (keys are column names).

    Columns missing from ``values`` (added to the table later) keep the field default.
    """
    kwargs = {}
    for field in model._meta.concrete_fields:
        if field.column in values:
            kwargs[field.attname] = _to_python(field, values[field.column])
    return model(**kwargs)


def _to_python(field: models.Field, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(field, models.JSONField):
        # What Django loads from the column: its own decoder over the recorded JSON (exact) text.
        return json.loads(exactjson.dumps(value), cls=field.decoder)
    if isinstance(field, models.BinaryField) and isinstance(value, str) and value.startswith("\\x"):
        return bytes.fromhex(value[2:])  # to_jsonb shows bytea as '\x...'
    try:
        return field.to_python(value)
    except ValidationError as error:
        raise TimeTravelError(
            f"Cannot read column {field.column!r} of {field.model.__name__} from the recorded value "
            f"{value!r}: {'; '.join(error.messages)}"
        ) from error


class BemiVersion(NamedTuple):
    """One version of a row: the change that made it and the row after it (None once deleted)."""

    change: "BemiChange"
    record: Any


def history(
    changes: "BemiChangeQuerySet", model_or_table: Any, primary_key: Any
) -> Iterator[BemiVersion]:
    """Every version of a row, oldest first."""
    of_row, model = _row_changes(changes, model_or_table, primary_key)
    for change in of_row.asc().iterator():
        if change.operation in ("DELETE", "TRUNCATE"):
            yield BemiVersion(change, None)
        elif model is not None:
            yield BemiVersion(change, to_instance(model, change.after))
        else:
            yield BemiVersion(change, dict(change.after))
