"""The least-privilege set-up of the destination: what ``manage.py bemi_grants`` runs or prints.

After it, bemi's schema (``bemi/tables.py``), ``changes``, its partitions and the
worker's tables belong to the worker's role; the application's role may only
read ``changes`` and ``_bemi_pruned``, and is no member of the worker's role nor
the worker of the application's. A schema under bemi's name that another role
made is set aside (renamed), never trusted; the tables of an earlier version are
moved out of schema public (bemi/relocate.py). ``rewrite_privileges()`` is what
the system check ``bemi.W004`` asks the server. See docs/security.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from bemi import relocate
from bemi.tables import LEGACY_SCHEMA, SCHEMA
from bemi.worker.publication import GRANTS_PUBLICATION_COMMENT

#: bemi's tables the application reads (BemiChange, time travel's pruned horizon, where the chain was cut).
READ_BY_APP = ("changes", "_bemi_pruned", "_bemi_chain_cuts")
REWRITE = ("UPDATE", "DELETE", "TRUNCATE")


@dataclass
class Plan:
    """What ``grant_statements`` found, for the command's report."""
    statements: list[sql.Composable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # what needs a person's decision first
    tables: list[str] = field(default_factory=list)  # bemi's tables once done

    def merge(self, other: "Plan") -> None:
        """Run ``other`` after this one (source and destination in one database)."""
        self.statements += other.statements
        self.notes += other.notes
        self.refused += other.refused
        self.tables += other.tables


def _rows(cursor: Any, query: str, params: Any = None) -> list[tuple]:
    result = cursor.execute(query, params)
    return (result if result is not None else cursor).fetchall()


def _schema(cursor: Any) -> tuple[int, str, bool, bool] | None:
    rows = _rows(cursor, "SELECT n.oid::int8, r.rolname::text, r.rolsuper, r.rolreplication "
                         "FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) "
                         "n.nspowner WHERE n.nspname OPERATOR(pg_catalog.=) %s::pg_catalog.name", [SCHEMA])
    return rows[0] if rows else None


def _tables_in_schema(cursor: Any) -> list[tuple[str, str, str, bool]]:
    """(name, relkind, owner, owner trusted) of every relation of bemi's schema that is not an
    index, sequence or TOAST table (those follow their table), partitions of changes included."""
    return _rows(cursor, """
        SELECT c.relname::text, c.relkind::text, r.rolname::text, r.rolsuper OR r.rolreplication
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) c.relowner
        JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
        WHERE n.nspname OPERATOR(pg_catalog.=) %s::pg_catalog.name
          AND c.relkind OPERATOR(pg_catalog.<>) ALL ('{i,I,S,t}'::pg_catalog."char"[])
        ORDER BY c.relispartition, 1""", [SCHEMA])


def grant_statements(cursor: Any, app_role: str, worker_role: str) -> Plan:
    """The statements that make the destination least-privilege (run by a superuser)."""
    plan = Plan()
    out = plan.statements
    schema, worker, app = sql.Identifier(SCHEMA), sql.Identifier(worker_role), sql.Identifier(app_role)
    found = _schema(cursor)
    existing: list[tuple[str, str, str, bool]] = []
    if found is None:
        out.append(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema, worker))
    else:
        oid, owner, owner_super, owner_repl = found
        if owner == worker_role or owner_super or owner_repl:
            existing = _tables_in_schema(cursor)
            if owner != worker_role:
                out.append(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(schema, worker))
        else:
            # Made by a role that is not a worker (the database's owner may create schemas): nothing in
            # it is trusted. Set aside, whole, for a person to inspect; the worker starts afresh.
            aside = f"{SCHEMA}_untrusted_{oid}"
            out.append(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(schema, sql.Identifier(aside)))
            out.append(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema, worker))
            plan.notes.append(f"schema {SCHEMA} was made by role {owner!r}, neither a superuser nor a worker's role: "
                              f"renamed to {aside} (inspect it, then drop it) and made again for the worker")
    for name, kind, owner, trusted in existing:
        if kind not in ("r", "p") or not (trusted or owner == worker_role):
            plan.refused.append(f"{SCHEMA}.{name} (relkind {kind!r}, owner {owner!r}): not made by a worker; "
                                f"check it, then drop it or ALTER TABLE {SCHEMA}.{name} OWNER TO {worker_role}")
    legacy = relocate.legacy_tables(cursor)
    moved = [t for t in legacy if t.kind in ("r", "p") and (t.trusted_owner or t.owner == worker_role)]
    for t in legacy:
        if t not in moved:
            plan.notes.append(f"left {LEGACY_SCHEMA}.{t.name} alone: role {t.owner!r} made it, not a worker")
    out.extend(relocate.move_statements(moved))
    if moved:
        plan.notes.append(f"moved {', '.join(t.name for t in moved)} of an earlier version from schema "
                          f"{LEGACY_SCHEMA} into schema {SCHEMA}")
    names = [n for n, kind, *_ in existing if kind in ("r", "p")] + [t.name for t in moved]
    plan.tables = names
    out.append(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(schema))
    out.append(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, app))
    for name in names:
        table = sql.Identifier(SCHEMA, name)
        out.append(sql.SQL("ALTER TABLE {} OWNER TO {}").format(table, worker))
        out.append(sql.SQL("REVOKE ALL ON {} FROM PUBLIC, {}").format(table, app))
        if name in READ_BY_APP:
            out.append(sql.SQL("GRANT SELECT ON {} TO {}").format(table, app))
    out.extend(_role_statements(cursor, plan, app_role, worker_role))
    return plan


def _role_statements(cursor: Any, plan: Plan, app_role: str, worker_role: str) -> list[sql.Composable]:
    """The worker's role: REPLICATION, and no membership either way with the application's role."""
    out: list[sql.Composable] = []
    worker, app = sql.Identifier(worker_role), sql.Identifier(app_role)
    rows = _rows(cursor, "SELECT r.rolname::text, r.rolsuper, r.rolreplication FROM pg_catalog.pg_roles r "
                         "WHERE r.rolname OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.name[])", [[app_role, worker_role]])
    roles = {name: (sup, repl) for name, sup, repl in rows}
    for name in (app_role, worker_role):
        if name not in roles:
            plan.refused.append(f"role {name!r} does not exist")
    if plan.refused:
        return out
    if roles[app_role][0] or roles[app_role][1]:
        plan.refused.append(f"the application's role {app_role!r} is a superuser or has REPLICATION: it could do "
                            f"anything the worker can (ALTER ROLE {app_role} NOSUPERUSER NOREPLICATION;)")
    if roles[worker_role][0]:
        plan.notes.append(f"the worker's role {worker_role!r} is a superuser: it needs only REPLICATION")
    elif not roles[worker_role][1]:
        out.append(sql.SQL("ALTER ROLE {} REPLICATION").format(worker))
    for member, group in ((worker_role, app_role), (app_role, worker_role)):
        direct = _rows(cursor, "SELECT EXISTS (SELECT FROM pg_catalog.pg_auth_members m "
                               "JOIN pg_catalog.pg_roles a ON a.oid OPERATOR(pg_catalog.=) m.member "
                               "JOIN pg_catalog.pg_roles g ON g.oid OPERATOR(pg_catalog.=) m.roleid "
                               "WHERE a.rolname OPERATOR(pg_catalog.=) %s::pg_catalog.name "
                               "AND g.rolname OPERATOR(pg_catalog.=) %s::pg_catalog.name)", [member, group])[0][0]
        if direct:
            out.append(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(group), sql.Identifier(member)))
    return out


def rewrite_privileges(cursor: Any) -> list[str]:
    """What the current role could do to the stored history among UPDATE, DELETE, TRUNCATE (privileges on
    ``changes`` or a partition) and DROP (it owns one of them or bemi's schema); [] when ``changes`` does
    not exist."""
    # Runs on the application's connection (its search_path): operators qualified, types exact.
    cursor.execute(
        "WITH ch AS (SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"  # (no to_regclass():
        "            ON n.oid OPERATOR(pg_catalog.=) c.relnamespace"  # it raises without USAGE on the schema)
        "            WHERE n.nspname OPERATOR(pg_catalog.=) %(schema)s::pg_catalog.name"
        "            AND c.relname OPERATOR(pg_catalog.=) 'changes'),"
        " t AS (SELECT c.oid, c.relowner FROM pg_catalog.pg_class c"
        " WHERE c.oid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT ch.oid FROM ch))"
        "    OR c.oid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT i.inhrelid FROM pg_catalog.pg_inherits i"
        "       WHERE i.inhparent OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT ch.oid FROM ch))))) "
        "SELECT p.privilege FROM pg_catalog.unnest(%(rewrite)s::pg_catalog.text[]) AS p(privilege) WHERE EXISTS ("
        " SELECT FROM t WHERE pg_catalog.has_table_privilege(t.oid, p.privilege)) "
        "UNION ALL SELECT 'DROP' WHERE EXISTS (SELECT FROM t WHERE pg_catalog.pg_has_role(t.relowner, 'USAGE'))"
        " OR EXISTS (SELECT FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) %(schema)s"
        "            ::pg_catalog.name AND pg_catalog.pg_has_role(n.nspowner, 'USAGE') AND EXISTS (SELECT FROM t))",
        {"rewrite": list(REWRITE), "schema": SCHEMA})
    return [r[0] for r in cursor.fetchall()]


# -- the source database -------------------------------------------------------------------------

#: bemi's routines in schema public (tracking.sql, install.sql): a superuser's, so that nothing the
#: application's role could rewrite runs as the event triggers' or the worker's role.
ROUTINES = (
    "public._bemi_context_from_query(text)", "public._bemi_row_trigger_func()",
    "public._bemi_is_tracked(regclass)", "public._bemi_is_tracked(regclass,jsonb)",
    "public._bemi_tracked_tables(jsonb)", "public._bemi_tables()",
    "public._bemi_create_trigger(regclass)", "public._bemi_create_triggers()",
    "public._bemi_set_replica_identity_on(regclass)", "public._bemi_set_replica_identity()",
    "public._bemi_publish(regclass)", "public._bemi_create_table_trigger_func()",
    "public._bemi_set_replica_identity_func()",
)
#: Columns of public._bemi_tracking the application's role reads and writes (migrate bemi stores the
#: settings): all but generated_key, the masking key the worker keeps there.
SETTINGS_COLUMNS = ("singleton", "rules", "settings", "own_tables", "updated_at", "updated_by")


def tracked_schemas(cursor: Any, schema_regexes: list[str]) -> list[str]:
    """The existing schemas the tracking settings name (their regexes, bemi/tracking.py)."""
    return [r[0] for r in _rows(cursor, """
        SELECT n.nspname::text FROM pg_catalog.pg_namespace n
        WHERE n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema', 'pg_toast',
                                                         %(bemi)s]::pg_catalog.name[])
          AND n.nspname::text OPERATOR(pg_catalog.!~) '^pg_(temp|toast_temp)_'
          AND EXISTS (SELECT FROM pg_catalog.unnest(%(res)s::pg_catalog.text[]) r(re)
                      WHERE n.nspname::text OPERATOR(pg_catalog.~) r.re)
        ORDER BY 1""", {"bemi": SCHEMA, "res": schema_regexes})]


def source_statements(cursor: Any, app_role: str, worker_role: str, publication: str,
                      schemas: list[str]) -> Plan:
    """The source database's part (run by a superuser): bemi's functions and settings table a superuser's,
    the event triggers installed, and the publication made once by the superuser so that a new table is
    published in the transaction that creates it, whoever creates it."""
    from bemi import sql as bemi_sql

    plan = Plan()
    out = plan.statements
    app, worker = sql.Identifier(app_role), sql.Identifier(worker_role)
    for signature, in _rows(cursor, """
            SELECT s.sig FROM pg_catalog.unnest(%s::pg_catalog.text[]) s(sig)
            JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(s.sig)
            JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) p.proowner
            WHERE NOT r.rolsuper ORDER BY 1""", [list(ROUTINES)]):
        # The install below rewrites each body and every attribute (CREATE OR REPLACE).
        out.append(sql.SQL("ALTER ROUTINE {} OWNER TO CURRENT_USER").format(sql.SQL(signature)))
        plan.notes.append(f"{signature} was not a superuser's: rewritten by the superuser's install")
    settings = _rows(cursor, """
        SELECT r.rolname::text, c.relkind::text FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) c.relowner
        WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('public._bemi_tracking')
          AND NOT r.rolsuper""")
    if settings:
        owner, kind = settings[0]
        # Its owner's triggers, rules or policies would stay with it: made again by the superuser,
        # with the same row (read as a superuser: no policy applies, and a table runs no code on SELECT).
        saved = _rows(cursor, "SELECT rules, settings, own_tables, generated_key FROM public._bemi_tracking") \
            if kind == "r" else []
        out.append(sql.SQL("DROP TABLE public._bemi_tracking" if kind == "r" else "DROP VIEW public._bemi_tracking"))
        plan.notes.append(f"public._bemi_tracking was role {owner!r}'s: made again by the superuser, its "
                          "settings kept")
        out.append(sql.SQL(bemi_sql.read("tracking.sql")))
        if saved:
            rules, stored, own, key = saved[0]
            out.append(sql.SQL("UPDATE public._bemi_tracking SET rules = {}::jsonb, settings = {}::jsonb, "
                               "own_tables = {}::oid[], generated_key = {}::bytea").format(
                sql.Literal(_json(rules)), sql.Literal(_json(stored)), sql.Literal(list(own or [])),
                sql.Literal(bytes(key) if key is not None else None)))
    else:
        out.append(sql.SQL(bemi_sql.read("tracking.sql")))
    out.append(sql.SQL(bemi_sql.read("install.sql")))
    columns = sql.SQL(", ").join(map(sql.Identifier, SETTINGS_COLUMNS))
    out.append(sql.SQL("GRANT SELECT ({c}), UPDATE ({c}) ON public._bemi_tracking TO {app}").format(c=columns, app=app))
    out.append(sql.SQL("GRANT SELECT, UPDATE ON public._bemi_tracking TO {}").format(worker))
    # Its changes are recorded (the publication has it): with what the settings were before, too.
    out.append(sql.SQL("ALTER TABLE public._bemi_tracking REPLICA IDENTITY FULL"))
    out.extend(publication_statements(cursor, plan, publication, schemas))
    return plan


def _json(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def publication_statements(cursor: Any, plan: Plan, publication: str, schemas: list[str]) -> list[sql.Composable]:
    """The publication, owned by the superuser: ``FOR TABLES IN SCHEMA`` the tracked schemas (PostgreSQL
    15+), ``FOR ALL TABLES`` before (the worker skips its own tables by oid). Either publishes a table
    from the transaction that creates it, and neither the application's nor the worker's role may change
    it. Tables of those schemas without a usable replica identity get ``REPLICA IDENTITY FULL``: published
    without one, their UPDATE and DELETE would fail."""
    out: list[sql.Composable] = []
    pub = sql.Identifier(publication)
    version = _rows(cursor, "SELECT pg_catalog.current_setting('server_version_num')::int4")[0][0]
    by_schema = version >= 150000
    found = _rows(cursor, """
        SELECT p.puballtables, r.rolsuper, pg_catalog.obj_description(p.oid, 'pg_publication'),
               (SELECT count(*) FROM pg_catalog.pg_publication_rel pr WHERE pr.prpubid OPERATOR(pg_catalog.=) p.oid)
        FROM pg_catalog.pg_publication p JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) p.pubowner
        WHERE p.pubname OPERATOR(pg_catalog.=) %s::pg_catalog.name""", [publication])
    if by_schema and not schemas:
        plan.refused.append("no existing schema matches BEMI_SCHEMAS: nothing to publish")
        return out
    if by_schema:
        wanted = sql.SQL("CREATE PUBLICATION {} FOR TABLES IN SCHEMA {} WITH (publish_via_partition_root = true)"
                         ).format(pub, sql.SQL(", ").join(map(sql.Identifier, schemas)))
        current = set()
        if found:
            current = {r[0] for r in _rows(cursor, """
                SELECT n.nspname::text FROM pg_catalog.pg_publication_namespace pn
                JOIN pg_catalog.pg_publication p ON p.oid OPERATOR(pg_catalog.=) pn.pnpubid
                JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) pn.pnnspid
                WHERE p.pubname OPERATOR(pg_catalog.=) %s::pg_catalog.name""", [publication])}
        keep = bool(found) and found[0][1] and not found[0][0] and not found[0][3] and current == set(schemas)
    else:
        wanted = sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES WITH (publish_via_partition_root = true)").format(pub)
        keep = bool(found) and found[0][0] and found[0][1]
    if keep:
        out.append(sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(pub))
    else:
        if found:
            # In the same transaction as the new one: the walsender sees one or the other, never none.
            out.append(sql.SQL("DROP PUBLICATION {}").format(pub))
            plan.notes.append(f"publication {publication!r} made again by the superuser "
                              + (f"for the tables of schema {', '.join(schemas)}" if by_schema else "for all tables"))
        out.append(wanted)
    out.append(sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(pub, sql.Literal(GRANTS_PUBLICATION_COMMENT)))
    for schema, name in _rows(cursor, """
            SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
            WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog."char"[]) AND c.relpersistence = 'p'
              AND (n.nspname OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.name[]) OR NOT %s::pg_catalog.bool)
              AND n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema', 'pg_toast',
                                                               %s]::pg_catalog.name[])
              AND (c.relreplident OPERATOR(pg_catalog.=) 'n'
                   OR (c.relreplident OPERATOR(pg_catalog.=) 'd' AND NOT EXISTS (
                         SELECT FROM pg_catalog.pg_index i WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid
                         AND i.indisprimary)))
            ORDER BY 1, 2""", [schemas, by_schema, SCHEMA]):
        out.append(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(sql.Identifier(schema, name)))
        plan.notes.append(f"{schema}.{name} has no primary key: REPLICA IDENTITY FULL, so that its UPDATE and DELETE "
                          "work once published")
    return out
