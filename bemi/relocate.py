"""bemi's schema, and moving the tables of earlier versions into it (Django-free).

Earlier versions (and the published Docker worker) kept ``changes`` and the
worker's tables in schema ``public``, where the database's owner (the
application's role, on PostgreSQL 15+ through ``pg_database_owner``) may drop
any of them. They move into ``bemi/tables.py``'s schema, owned by the worker's
role: at the worker's start when it owns them, else by a superuser's
``manage.py bemi_grants``. ``ALTER TABLE ... SET SCHEMA`` keeps every row, index,
constraint and owned sequence, and takes milliseconds whatever the size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from psycopg import sql

from bemi.tables import LEGACY_SCHEMA, SCHEMA, STORED_TABLES

__all__ = ["Legacy", "legacy_tables", "move_statements", "move_own", "schema_owner"]


class Legacy(NamedTuple):
    name: str  # in LEGACY_SCHEMA
    owner: str
    kind: str  # pg_class.relkind
    mine: bool  # owned by the session's role
    trusted_owner: bool  # a superuser or a role with REPLICATION (a worker) made it
    partition: bool  # a partition of public.changes


LEGACY = """
SELECT c.relname::pg_catalog.text, r.rolname::pg_catalog.text, c.relkind::pg_catalog.text,
       r.rolname OPERATOR(pg_catalog.=) CURRENT_USER, r.rolsuper OR r.rolreplication, c.relispartition
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) c.relowner
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE n.nspname OPERATOR(pg_catalog.=) %(legacy)s::pg_catalog.name
  AND ((c.relname OPERATOR(pg_catalog.=) ANY (%(names)s::pg_catalog.name[]) AND NOT c.relispartition)
       OR c.oid OPERATOR(pg_catalog.=) ANY (ARRAY(
            SELECT i.inhrelid FROM pg_catalog.pg_inherits i
            JOIN pg_catalog.pg_class p ON p.oid OPERATOR(pg_catalog.=) i.inhparent
            WHERE p.relnamespace OPERATOR(pg_catalog.=) n.oid AND p.relname OPERATOR(pg_catalog.=) 'changes')))
  AND pg_catalog.to_regclass(pg_catalog.format('%%I.%%I', %(schema)s::pg_catalog.text,
        CASE WHEN c.relispartition THEN 'changes' ELSE c.relname END)) IS NULL
ORDER BY c.relispartition, 1
"""


def legacy_tables(cursor: Any) -> list[Legacy]:
    """bemi's tables still in schema public whose counterpart is not in bemi's schema yet (the
    partitions of public.changes while bemi's schema has no changes)."""
    result = cursor.execute(LEGACY, {"legacy": LEGACY_SCHEMA, "schema": SCHEMA, "names": list(STORED_TABLES)})
    return [Legacy(*row) for row in (result if result is not None else cursor).fetchall()]


def move_statements(tables: list[Legacy]) -> list[sql.Composed]:
    """``ALTER TABLE public.<t> SET SCHEMA bemi`` for each (a partitioned table moves without its
    partitions: each is moved too, and stays attached)."""
    return [sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(sql.Identifier(LEGACY_SCHEMA, t.name),
                                                          sql.Identifier(SCHEMA)) for t in tables]


def schema_owner(cursor: Any) -> tuple[str, bool] | None:
    """(owner, owner is a superuser) of bemi's schema, None when it does not exist."""
    result = cursor.execute(
        "SELECT r.rolname::pg_catalog.text, r.rolsuper FROM pg_catalog.pg_namespace n "
        "JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner "
        "WHERE n.nspname OPERATOR(pg_catalog.=) %s::pg_catalog.name", [SCHEMA])
    row = (result if result is not None else cursor).fetchone()
    return (row[0], row[1]) if row else None


def move_own(conn: Any) -> list[str]:
    """Move the tables of an earlier version this session may move and trust (it owns them, or it is a
    superuser and a superuser or a worker's role made them), in one transaction; their names. For
    ``bemi_partition`` and ``bemi_prune`` run before the worker's first start of this version."""
    superuser = conn.execute("SELECT rolsuper FROM pg_catalog.pg_roles "
                             "WHERE rolname OPERATOR(pg_catalog.=) CURRENT_USER").fetchone()[0]
    movable = [t for t in legacy_tables(conn) if t.kind in ("r", "p") and (t.mine or (superuser and t.trusted_owner))]
    if movable:
        with conn.transaction():
            if schema_owner(conn) is None:  # owned by whoever made the tables (the worker's role, usually)
                conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                    sql.Identifier(SCHEMA), sql.Identifier(movable[0].owner)))
            for statement in move_statements(movable):
                conn.execute(statement)
    return [t.name for t in movable]
