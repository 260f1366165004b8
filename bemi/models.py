"""``BemiChange``: one row of the ``changes`` table the worker writes.

The model is unmanaged: Django never creates or alters ``changes`` (the
worker owns its DDL, ``bemi/sql/changes.sql``). With
``bemi.BemiDatabaseRouter`` configured, reads and writes go to the ``bemi``
database alias.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import models

from bemi.querysets import CHRONOLOGICAL, BemiChangeQuerySet


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
    before = models.JSONField(default=dict)
    after = models.JSONField(default=dict)
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
        db_table = "changes"
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
    """JSON equality that tells ``1`` from ``true`` (Python says ``1 == True``)."""
    return type(a) is type(b) and a == b
