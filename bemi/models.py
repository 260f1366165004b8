"""``BemiChange``: one row of the ``changes`` table the worker writes.

The model is unmanaged: Django never creates or alters ``changes`` (the
worker owns its DDL, ``bemi/sql/changes.sql``), which lives in schema ``bemi``. With
``bemi.BemiDatabaseRouter`` configured, reads and writes go to the ``bemi``
database alias.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.db import models

from bemi import tables
from bemi.exactjson import ExactJSONDecoder, ExactJSONEncoder
from bemi.querysets import CHRONOLOGICAL, BemiChangeQuerySet


class ExactJSONField(models.JSONField):
    """A ``JSONField`` that reads and writes numbers exactly (``ExactJSONDecoder``/``Encoder``).

    The coders change only how Python sees the ``jsonb``, not the column, so
    the field deconstructs as a plain ``JSONField``: migrations see no change
    (``changes`` is unmanaged; its DDL is the worker's).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("encoder", ExactJSONEncoder)
        kwargs.setdefault("decoder", ExactJSONDecoder)
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, _path, args, kwargs = super().deconstruct()
        if kwargs.get("encoder") is ExactJSONEncoder:
            del kwargs["encoder"]
        if kwargs.get("decoder") is ExactJSONDecoder:
            del kwargs["decoder"]
        return name, "django.db.models.JSONField", args, kwargs


class BemiChange(models.Model):
    """A change of one row: its values before and after, and the application context."""

    class Operation(models.TextChoices):
        CREATE = "CREATE", "CREATE"
        UPDATE = "UPDATE", "UPDATE"
        DELETE = "DELETE", "DELETE"
        TRUNCATE = "TRUNCATE", "TRUNCATE"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    database = models.CharField(max_length=255)
    schema = models.CharField(max_length=255)
    table = models.CharField(max_length=255)
    primary_key = models.CharField(max_length=255, null=True)
    operation = models.TextField(choices=Operation.choices)
    # Row values: numbers exact (a numeric 1.20 is Decimal('1.20'), not the float 1.2).
    before = ExactJSONField(default=dict)
    after = ExactJSONField(default=dict)
    context = models.JSONField(default=dict)
    committed_at = models.DateTimeField()
    queued_at = models.DateTimeField()
    created_at = models.DateTimeField()
    transaction_id = models.BigIntegerField()
    position = models.BigIntegerField()
    commit_position = models.BigIntegerField()
    change_index = models.IntegerField()

    objects = BemiChangeQuerySet.as_manager()

    class Meta:
        managed = False
        # "bemi"."changes" (bemi/tables.py): Django quotes a db_table only when it is not quoted
        # already, so this reads the worker's table whatever the connection's search_path.
        db_table = f'{tables.SCHEMA}"."changes'
        ordering = list(CHRONOLOGICAL)
        verbose_name = "change"
        verbose_name_plural = "changes"
        permissions = [("revert_change", "Can revert changes and restore deleted rows")]

    def __str__(self) -> str:
        when = self.committed_at.isoformat(sep=" ") if self.committed_at else "?"
        return f"{self.operation} {self.table} {self.primary_key} at {when}"

    def diff(self) -> dict[str, list[Any]]:
        """``{column: [before, after]}`` for every column whose value differs.

        A missing side counts as ``None``, so a CREATE lists every column as
        ``[None, value]`` and a DELETE as ``[value, None]``.
        """
        before = self.before or {}
        after = self.after or {}
        columns = list(after) + [c for c in before if c not in after]
        return {
            column: [before.get(column), after.get(column)]
            for column in columns
            if not _same(before.get(column), after.get(column))
        }


def _same(a: Any, b: Any) -> bool:
    """JSON equality that tells ``1`` from ``true`` (Python says ``1 == True``) and ``1.2`` from ``1.20``.

    ``jsonb`` keeps a numeric's scale, and so does ``Decimal``: a change of
    ``1.2`` to ``1.20`` in a ``numeric`` column is a change.
    """
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return str(a) == str(b)
    return type(a) is type(b) and a == b
