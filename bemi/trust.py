"""Which of bemi's stored tables may bemi's own code touch? (Django-free.)

Trusted by the catalog, never by name. bemi's tables live in their own schema
(``bemi/tables.py``), created by the worker or by a superuser's ``bemi_grants``
and owned by the worker's role. Anyone who could create that schema or a table
in it first (the database's owner may create schemas) could make it a view or
give it a trigger, rule or default, and its code would then run as whoever
reads or writes it: the worker, ``bemi_status``, ``manage.py check``, a
superuser's ``migrate``. So:

* the schema must be owned by a superuser or the session's own role, or, for
  sessions other than the worker's (``strict=False``), a role with
  ``REPLICATION`` (the worker's: the application's role has no such attribute);
* each table, and each partition of ``changes``, must be a table owned by a
  superuser, the session's own role or the schema's owner.

Membership in the owner's role is not enough (it once was): the worker's role is
no member of the application's role any more. See docs/security.md.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

from bemi.tables import SCHEMA, STORED_TABLES
from bemi.worker.shown import qualified, shown

__all__ = ["BEMI_TABLES", "Untrusted", "untrusted_tables"]

#: The worker's tables in the destination's bemi schema (created by changes.sql and worker.sql).
BEMI_TABLES = STORED_TABLES


class Untrusted(NamedTuple):
    name: str  # a table of schema SCHEMA, or the schema itself (kind "schema")
    owner: str
    kind: str  # pg_class.relkind, or "schema"
    schema: str = SCHEMA

    @property
    def why(self) -> str:
        """One line for a log or an error (names another role chose are shown escaped)."""
        if self.kind == "schema":
            return (f"schema {shown(self.name)} (owned by role {self.owner!r}, neither a superuser nor the worker's "
                    "role)")
        what = "" if self.kind in ("r", "p", "routine") else f", relkind {self.kind!r}: not a table"
        return f"{qualified(self.schema, self.name)} (owned by role {self.owner!r}{what})"


UNTRUSTED = """
WITH me AS (SELECT u.oid, u.rolsuper FROM pg_catalog.pg_roles u
            WHERE u.rolname OPERATOR(pg_catalog.=) CURRENT_USER),
     ns AS (SELECT n.oid, n.nspname, n.nspowner, o.rolname AS owner,
                   (o.rolsuper OR o.oid OPERATOR(pg_catalog.=) me.oid
                    OR (NOT %(strict)s::pg_catalog.bool AND o.rolreplication)) AS trusted
            FROM pg_catalog.pg_namespace n
            JOIN pg_catalog.pg_roles o ON o.oid OPERATOR(pg_catalog.=) n.nspowner CROSS JOIN me
            WHERE n.nspname OPERATOR(pg_catalog.=) %(schema)s::pg_catalog.name)
SELECT ns.nspname::pg_catalog.text, ns.owner::pg_catalog.text, 'schema'::pg_catalog.text, ns.nspname::pg_catalog.text
FROM ns WHERE NOT ns.trusted
UNION ALL
SELECT c.relname::pg_catalog.text, r.rolname::pg_catalog.text, c.relkind::pg_catalog.text, cn.nspname::pg_catalog.text
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) c.relowner
JOIN pg_catalog.pg_namespace cn ON cn.oid OPERATOR(pg_catalog.=) c.relnamespace
CROSS JOIN ns CROSS JOIN me
WHERE ns.trusted
  AND ((c.relnamespace OPERATOR(pg_catalog.=) ns.oid AND c.relname OPERATOR(pg_catalog.=) ANY (%(names)s::pg_catalog.name[]))
       OR c.oid OPERATOR(pg_catalog.=) ANY (ARRAY(
           SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class p
             ON p.oid OPERATOR(pg_catalog.=) i.inhparent
           WHERE p.relnamespace OPERATOR(pg_catalog.=) ns.oid AND p.relname OPERATOR(pg_catalog.=) 'changes'
             AND 'changes' OPERATOR(pg_catalog.=) ANY (%(names)s::pg_catalog.name[]))))
  AND NOT (c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog."char"[])
           AND (r.rolsuper OR r.oid OPERATOR(pg_catalog.=) me.oid OR r.oid OPERATOR(pg_catalog.=) ns.nspowner))
ORDER BY 3 DESC, 1
"""


def untrusted_tables(cursor: Any, names: Iterable[str] = BEMI_TABLES, strict: bool = False) -> list[Untrusted]:
    """What must not be used among bemi's schema and those of ``names`` (tables of that schema; with
    ``changes``, its partitions too) that exist: an empty list when all is well (a psycopg cursor or
    connection; everything is qualified, so any search_path will do). ``strict``: the worker's own
    session, which trusts only itself and superusers."""
    result = cursor.execute(UNTRUSTED, {"strict": strict, "schema": SCHEMA, "names": list(names)})
    rows = (result if result is not None else cursor).fetchall()
    return [Untrusted(name, owner, kind, schema) for name, owner, kind, schema in rows]


SOURCE_OBJECTS = """
SELECT c.relname::pg_catalog.text, r.rolname::pg_catalog.text, c.relkind::pg_catalog.text, 'public'::pg_catalog.text
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) c.relowner
WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('public._bemi_tracking')
  AND NOT (c.relkind OPERATOR(pg_catalog.=) 'r' AND (r.rolsuper OR r.rolname OPERATOR(pg_catalog.=) CURRENT_USER))
UNION ALL
SELECT s.sig, r.rolname::pg_catalog.text, 'routine', 'public'
FROM pg_catalog.unnest(%s::pg_catalog.text[]) s(sig)
JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(s.sig)
JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) p.proowner
WHERE NOT (r.rolsuper OR r.rolname OPERATOR(pg_catalog.=) CURRENT_USER)
"""


def untrusted_source_objects(cursor: Any, routines: Iterable[str] = ()) -> list[Untrusted]:
    """``public._bemi_tracking`` (the tracking settings) and those of ``routines`` (signatures in schema
    public) that exist and are not a superuser's nor the session's own role's: in schema public, which the
    application's role may own, the worker writes the one and calls the others only when they are."""
    result = cursor.execute(SOURCE_OBJECTS, [list(routines)])
    return [Untrusted(*row) for row in (result if result is not None else cursor).fetchall()]
