"""Where bemi's stored tables live: one place to name them (Django-free).

``changes``, its partitions and the worker's bookkeeping tables live in their
own schema, owned by the worker's role: the application's role, even when it
owns the database and schema ``public``, can neither drop, rename nor replace
them there, nor create anything the worker would then use (docs/security.md).
New SQL names the schema and its tables through these, never as a literal.
"""

from __future__ import annotations

from psycopg import sql

__all__ = ["SCHEMA", "LEGACY_SCHEMA", "CHANGES", "CHECKPOINTS", "FAILURES", "PRUNED", "CHAIN_CUTS", "STORED_TABLES",
           "qualified", "schema"]

#: The schema of ``changes``, its partitions and the worker's bookkeeping tables.
SCHEMA = "bemi"
#: Where earlier versions (and the published Docker worker) kept them: moved from there (bemi/relocate.py).
LEGACY_SCHEMA = "public"
#: bemi's stored tables by name (partitions of ``changes`` are found through the catalog).
STORED_TABLES = ("changes", "_bemi_worker_checkpoints", "_bemi_worker_failures", "_bemi_pruned", "_bemi_chain_cuts")


def qualified(name: str) -> sql.Identifier:
    """``"<SCHEMA>"."<name>"`` for one of bemi's stored tables."""
    return sql.Identifier(SCHEMA, name)


def schema() -> sql.Identifier:
    return sql.Identifier(SCHEMA)


CHANGES = qualified("changes")
CHECKPOINTS = qualified("_bemi_worker_checkpoints")
FAILURES = qualified("_bemi_worker_failures")
PRUNED = qualified("_bemi_pruned")
CHAIN_CUTS = qualified("_bemi_chain_cuts")
