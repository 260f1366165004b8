"""Append-only ``changes``: the worker's role owns it, the application's role may only read it.

``grant_statements()`` composes the SQL (``manage.py bemi_grants`` runs or prints it);
``rewrite_privileges()`` is what the system check ``bemi.W004`` asks the server.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

#: bemi's tables in the destination database; the application reads the first two.
READ_BY_APP = ("changes", "_bemi_pruned")
WORKER_ONLY = ("_bemi_worker_checkpoints",)
REWRITE = ("UPDATE", "DELETE", "TRUNCATE")


def bemi_tables(cursor: Any) -> list[str]:
    """bemi's tables that exist in schema public, partitions of changes included."""
    cursor.execute(
        "SELECT c.relname::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname OPERATOR(pg_catalog.=) 'public'::pg_catalog.name AND ("
        "c.relname OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.name[]) OR c.oid OPERATOR(pg_catalog.=) ANY (ARRAY("
        "SELECT i.inhrelid FROM pg_catalog.pg_inherits i "
        "WHERE i.inhparent OPERATOR(pg_catalog.=) pg_catalog.to_regclass('public.changes')::pg_catalog.oid))) "
        "ORDER BY 1",
        [list(READ_BY_APP + WORKER_ONLY)])
    return [r[0] for r in cursor.fetchall()]


def grant_statements(tables: list[str], app_role: str, worker_role: str | None) -> list[sql.Composed]:
    statements: list[sql.Composed] = []
    for name in tables:
        table = sql.SQL("{}.{}").format(sql.Identifier("public"), sql.Identifier(name))
        if worker_role:
            statements.append(sql.SQL("ALTER TABLE {} OWNER TO {}").format(table, sql.Identifier(worker_role)))
        statements.append(sql.SQL("REVOKE ALL ON {} FROM PUBLIC, {}").format(table, sql.Identifier(app_role)))
        if name in READ_BY_APP:
            statements.append(sql.SQL("GRANT SELECT ON {} TO {}").format(table, sql.Identifier(app_role)))
    return statements


def rewrite_privileges(cursor: Any) -> list[str]:
    """The privileges among UPDATE, DELETE, TRUNCATE that the current role holds on ``changes`` or on
    any of its partitions ([] when ``changes`` does not exist)."""
    # Runs on the application's connection (its search_path): operators qualified, types exact.
    cursor.execute(
        "SELECT p.privilege FROM pg_catalog.unnest(%s::pg_catalog.text[]) AS p(privilege) WHERE EXISTS ("
        " SELECT FROM pg_catalog.pg_class c"
        " WHERE (c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('public.changes')::pg_catalog.oid"
        "        OR c.oid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT i.inhrelid FROM pg_catalog.pg_inherits i"
        "           WHERE i.inhparent OPERATOR(pg_catalog.=) pg_catalog.to_regclass('public.changes')::pg_catalog.oid)))"
        "   AND pg_catalog.has_table_privilege(c.oid, p.privilege))", [list(REWRITE)])
    return [r[0] for r in cursor.fetchall()]
