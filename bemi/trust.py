"""Which of bemi's tables may bemi's own code touch? (Django-free.)

bemi's tables live in schema ``public`` under fixed names, and are created with
``CREATE TABLE IF NOT EXISTS``. A role that may CREATE in ``public`` (every role
on PostgreSQL 14, the database owner on 15+) can make one first, as a view or a
table with a trigger, rule or default, and its code then runs as whoever reads
or writes it: the worker, ``bemi_status``, ``manage.py check``. So a table is
used only when it is a table owned by a superuser or by the session's own role
(or, for a role that is not a superuser, a role it is a member of: it could
become that role anyway). See docs/security.md.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

__all__ = ["BEMI_TABLES", "Untrusted", "untrusted_tables"]

#: The worker's tables in schema public of the destination (created by changes.sql and worker.sql).
BEMI_TABLES = ("changes", "_bemi_worker_checkpoints", "_bemi_worker_failures", "_bemi_pruned")


class Untrusted(NamedTuple):
    name: str  # in schema public
    owner: str
    kind: str  # pg_class.relkind

    @property
    def why(self) -> str:
        what = "" if self.kind in ("r", "p") else f", relkind {self.kind!r}: not a table"
        return f"public.{self.name} (owned by role {self.owner!r}{what})"


UNTRUSTED_TABLES = (
    "SELECT c.relname::pg_catalog.text, r.rolname::pg_catalog.text, c.relkind::pg_catalog.text "
    "FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) c.relowner "
    "CROSS JOIN (SELECT u.oid, u.rolsuper FROM pg_catalog.pg_roles u "
    "            WHERE u.rolname OPERATOR(pg_catalog.=) CURRENT_USER) AS me "
    "WHERE c.relnamespace OPERATOR(pg_catalog.=) 'public'::pg_catalog.regnamespace "
    "AND c.relname OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.name[]) "
    "AND NOT (c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog.\"char\"[]) AND (r.rolsuper "
    "     OR r.oid OPERATOR(pg_catalog.=) me.oid "
    "     OR (NOT me.rolsuper AND pg_catalog.pg_has_role(me.oid, r.oid, 'MEMBER')))) "
    "ORDER BY 1"
)


def untrusted_tables(cursor: Any, names: Iterable[str]) -> list[Untrusted]:
    """Those of ``names`` (in schema public) that exist and must not be used (a psycopg cursor or
    connection; the query qualifies everything, so any search_path will do)."""
    result = cursor.execute(UNTRUSTED_TABLES, [list(names)])
    rows = (result if result is not None else cursor).fetchall()
    return [Untrusted(*row) for row in rows]
