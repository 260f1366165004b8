"""A todo's audit trail, through bemi's query API.

One small function so that the views do not care where the rows come from.
"""

from __future__ import annotations

from django.db import DatabaseError, transaction

from bemi.models import BemiChange
from todos.models import Todo


def todo_history(pk: int) -> list[BemiChange] | None:
    """Changes of the todo ``pk`` (also once it is deleted), oldest first.

    None when the ``changes`` table does not exist yet (no worker has run).
    """
    try:
        with transaction.atomic():
            return list(BemiChange.objects.record(Todo, pk).asc())
    except DatabaseError:
        return None
