"""Where bemi's stored tables live: one place to name them (Django-free).

New SQL names the schema and its tables through these, never as a literal, so
that where the history lives is decided here once (see docs/security.md).
"""

from __future__ import annotations

from psycopg import sql

__all__ = ["SCHEMA", "CHANGES", "CHECKPOINTS", "FAILURES", "PRUNED", "qualified"]

#: The schema of ``changes``, its partitions and the worker's bookkeeping tables.
SCHEMA = "public"


def qualified(name: str) -> sql.Identifier:
    """``"<SCHEMA>"."<name>"`` for one of bemi's stored tables."""
    return sql.Identifier(SCHEMA, name)


CHANGES = qualified("changes")
CHECKPOINTS = qualified("_bemi_worker_checkpoints")
FAILURES = qualified("_bemi_worker_failures")
PRUNED = qualified("_bemi_pruned")
