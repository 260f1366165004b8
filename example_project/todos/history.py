"""A todo's audit trail, read from the ``changes`` table the worker writes.

One small function so that the views do not care where the rows come from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connection, transaction


@dataclass
class HistoryEntry:
    committed_at: datetime
    operation: str
    context: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]

    @property
    def diff(self) -> dict[str, list[Any]]:
        """``{column: [before, after]}`` for the columns whose values differ."""
        keys = [*self.before, *(k for k in self.after if k not in self.before)]
        return {
            k: [self.before.get(k), self.after.get(k)]
            for k in keys
            if self.before.get(k) != self.after.get(k)
        }


def todo_history(pk: int) -> list[HistoryEntry] | None:
    """Changes of the todo ``pk``, oldest first; None when ``changes`` does not exist yet."""
    sql = (
        'SELECT "committed_at", "operation", "context", "before", "after" FROM changes '
        'WHERE "table" = %s AND "primary_key" = %s ORDER BY "committed_at", "id"'
    )
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, ["todo", str(pk)])
            rows = cursor.fetchall()
    except DatabaseError:  # no worker has created the table yet
        return None
    return [HistoryEntry(at, op, *(_json(v) for v in values)) for at, op, *values in rows]


def _json(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else (value or {})
