"""``BemiRecordMixin``: a model's own audit trail, from its instances and class.

    class Todo(BemiRecordMixin, models.Model): ...

    todo.bemi_changes()                 # every change of this row, oldest first
    todo.bemi_changes('is_completed')   # the changes that changed one field
    todo.bemi_as_of(when)               # the row as it was then (unsaved), or None
    Todo.bemi_history(todo.pk)          # every version, oldest first
    Todo.bemi_table_as_of(when, is_completed=True)  # every row as it was then (a filter of their values then)

The mixin adds no field and no database column.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Iterator, TypeVar, cast

from bemi.timetravel import BemiVersion, history

if TYPE_CHECKING:  # pragma: no cover
    from bemi.querysets import BemiChangeQuerySet


def _changes() -> "BemiChangeQuerySet":
    """``BemiChange.objects.all()``, imported when first used.

    The one function-level import of the query side: a project's ``models.py``
    imports this mixin while Django is still loading apps, and importing a model
    (``BemiChange``) at that point raises ``AppRegistryNotReady``.
    """
    from bemi.models import BemiChange

    return BemiChange.objects.all()


_R = TypeVar("_R", bound="BemiRecordMixin")


class BemiRecordMixin:
    # A mixin for subclasses of django.db.models.Model, which provides pk.
    if TYPE_CHECKING:  # pragma: no cover
        pk: Any

    def bemi_changes(self, field_name: str | None = None) -> "BemiChangeQuerySet":
        """This row's changes (table = the model's db_table, primary_key = str(pk))."""
        if field_name is None:
            return _changes().record(type(self), self.pk)
        return _changes().field_changed(type(self), self.pk, field_name)

    def bemi_as_of(self: _R, when: dt.datetime) -> _R | None:
        """This row as it was at ``when`` (an unsaved instance of its model), or None if it did not exist."""
        return cast("_R | None", _changes().as_of(cast(Any, type(self)), self.pk, when))

    @classmethod
    def bemi_table_as_of(
        cls, when: dt.datetime, filter: Any = None, *, using: str | None = None, masked: str = "raise", **lookups: Any
    ) -> list[Any]:
        """The model's rows as they were at ``when`` (unsaved instances), filtered by their values then."""
        return _changes().table_as_of(cls, when, filter, using=using, masked=masked, **lookups)

    @classmethod
    def bemi_history(cls, primary_key: Any) -> Iterator["BemiVersion"]:
        """``(change, record)`` for every version of the row, oldest first."""
        return history(_changes(), cls, primary_key)
