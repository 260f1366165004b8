"""The chainable helpers of ``BemiChange.objects``.

JSON filters use containment (``@>``) so that PostgreSQL can answer them
from the GIN ``jsonb_path_ops`` indexes on ``before``, ``after`` and
``context``. Time travel lives in ``bemi.timetravel``, revert in
``bemi.revert``; the queryset only gives them a chainable entry point.
Imports run one way: ``bemi.models`` -> ``bemi.querysets`` ->
``bemi.timetravel`` and ``bemi.revert``, which import no bemi module at load
time (they reach ``BemiChange`` through the queryset they are given).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, overload

from django.db import models
from django.db.models import BooleanField, Func, Q
from django.db.models.fields.json import KeyTransform

from bemi import timetravel
from bemi.table_as_of import table_as_of
from bemi.revert import RevertAction, revert as revert_changes

if TYPE_CHECKING:  # pragma: no cover
    from bemi.models import BemiChange

_M = TypeVar("_M", bound=models.Model)

#: Oldest-first order of changes: commit time, then the commit's WAL position
#: (two transactions may share a timestamp), then the order inside the transaction.
CHRONOLOGICAL = ("committed_at", "commit_position", "change_index")


class _IsDistinctFrom(Func):
    """``a IS DISTINCT FROM b``: true when the values differ, NULL counting as a value."""

    arg_joiner = " IS DISTINCT FROM "
    template = "(%(expressions)s)"
    output_field = BooleanField()


def _require_dict(helper: str, values: Any) -> dict:
    if not isinstance(values, dict):
        raise TypeError(
            f"BemiChange.objects.{helper}() takes a dict of JSON values to match, "
            f"e.g. {helper}({{'is_completed': True}}); got {type(values).__name__} {values!r}"
        )
    return values


class BemiChangeQuerySet(models.QuerySet["BemiChange"]):
    """``BemiChange.objects``: Django's queryset and the helpers below, each returning one."""

    # -- JSON containment --------------------------------------------------------
    def before(self, values: dict) -> "BemiChangeQuerySet":
        """Changes whose ``before`` contains these column values."""
        return self.filter(before__contains=_require_dict("before", values))

    def before_not(self, values: dict) -> "BemiChangeQuerySet":
        """Changes whose ``before`` does not contain these column values."""
        return self.exclude(before__contains=_require_dict("before_not", values))

    def after(self, values: dict) -> "BemiChangeQuerySet":
        """Changes whose ``after`` contains these column values."""
        return self.filter(after__contains=_require_dict("after", values))

    def after_not(self, values: dict) -> "BemiChangeQuerySet":
        """Changes whose ``after`` does not contain these column values."""
        return self.exclude(after__contains=_require_dict("after_not", values))

    def context(self, values: dict) -> "BemiChangeQuerySet":
        """Changes made under a context containing these values."""
        return self.filter(context__contains=_require_dict("context", values))

    def context_value(self, key: str, raw: str) -> "BemiChangeQuerySet":
        """Changes whose context has ``key`` = ``raw`` as typed by a person: the text, or the JSON value it
        reads as (``'42'`` matches ``{"user_id": 42}`` and ``{"user_id": "42"}``), both by containment."""
        condition = Q(context__contains={key: raw})
        try:
            value = json.loads(raw)
        except ValueError:
            return self.filter(condition)
        if value != raw and not isinstance(value, (dict, list)):
            condition |= Q(context__contains={key: value})
        return self.filter(condition)

    def context_not(self, values: dict) -> "BemiChangeQuerySet":
        """Changes made under a context not containing these values."""
        return self.exclude(context__contains=_require_dict("context_not", values))

    # -- operations and order ----------------------------------------------------
    def created(self) -> "BemiChangeQuerySet":
        return self.filter(operation="CREATE")

    def updated(self) -> "BemiChangeQuerySet":
        return self.filter(operation="UPDATE")

    def deleted(self) -> "BemiChangeQuerySet":
        return self.filter(operation="DELETE")

    def asc(self) -> "BemiChangeQuerySet":
        """Oldest first (the default order)."""
        return self.order_by(*CHRONOLOGICAL)

    def desc(self) -> "BemiChangeQuerySet":
        """Newest first."""
        return self.order_by(*(f"-{name}" for name in CHRONOLOGICAL))

    # -- one record ----------------------------------------------------------------
    def record(self, model_or_table: Any, primary_key: Any) -> "BemiChangeQuerySet":
        """The changes of one row, given a model (class or instance), ``'schema.table'`` or a table name."""
        schema, table, _ = timetravel.resolve_schema_table(model_or_table, self)
        found = self.filter(table=table, primary_key=timetravel.check_primary_key(primary_key))
        return found if schema is None else found.filter(schema=schema)

    def field_changed(
        self,
        model_or_table: Any = None,
        primary_key: Any = None,
        field_name: str | None = None,
        *,
        table: Any = None,
    ) -> "BemiChangeQuerySet":
        """Changes of one row that changed the value of ``field_name`` (a column name).

        A CREATE counts when it set the column, a DELETE when the row had it.
        An UPDATE whose ``before`` was not recorded (no ``REPLICA IDENTITY
        FULL``) cannot be told apart and counts as a change.
        ``table=`` is the published package's keyword for ``model_or_table``.
        """
        if table is not None:
            if model_or_table is not None:
                raise TypeError(
                    "field_changed() got both model_or_table and table (the published package's name "
                    "for the same argument); pass one of them"
                )
            model_or_table = table
        if not isinstance(field_name, str) or not field_name:
            raise TypeError(f"field_changed() takes the column name as a string, e.g. 'is_completed'; got {field_name!r}")
        column = _column_name(model_or_table, field_name)
        return self.record(model_or_table, primary_key).filter(
            Q(operation="CREATE", after__has_key=column)
            | Q(operation="DELETE", before__has_key=column)
            | Q(
                _IsDistinctFrom(KeyTransform(column, "before"), KeyTransform(column, "after")),
                operation="UPDATE",
            )
        )

    # -- time travel and revert ----------------------------------------------------
    @overload
    def as_of(self, model_or_table: type[_M], primary_key: Any, when: datetime) -> _M | None: ...
    @overload
    def as_of(self, model_or_table: _M, primary_key: Any, when: datetime) -> _M | None: ...
    @overload
    def as_of(self, model_or_table: str, primary_key: Any, when: datetime) -> dict[str, Any] | None: ...

    def as_of(self, model_or_table: Any, primary_key: Any, when: datetime) -> Any:
        """The row as it was at ``when``: an unsaved instance of the model given, a dict for a table name,
        or None."""
        return timetravel.as_of(self, model_or_table, primary_key, when)

    def table_as_of(
        self, model_or_table: Any, when: datetime, filter: Any = None, *, using: str | None = None,
        masked: str = "raise", **lookups: Any,
    ) -> list[Any]:
        """Every row of a table as it was at ``when`` (unsaved instances, or dicts for a table name).

        ``filter`` (a ``Q``, a dict of lookups or a queryset of the model) and ``lookups`` select
        rows by their values at ``when``; see ``bemi.table_as_of``.
        """
        return table_as_of(self, model_or_table, when, filter, using=using, masked=masked, **lookups)

    def revert(self, *, force: bool = False, using: str | None = None) -> list[RevertAction]:
        """Undo these changes, newest first, in one transaction (see ``bemi.revert``)."""
        return revert_changes(self, force=force, using=using)


def _column_name(model_or_table: Any, field_name: str) -> str:
    """Accept a model field name (``author``) where the JSON has the column (``author_id``)."""
    model = model_or_table if isinstance(model_or_table, type) else getattr(model_or_table, "__class__", None)
    meta = getattr(model, "_meta", None)
    if meta is None:
        return field_name
    try:
        field = meta.get_field(field_name)
    except Exception:
        return field_name
    return getattr(field, "column", None) or field_name
