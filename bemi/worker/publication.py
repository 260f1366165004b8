"""The publication the worker reads: create it, and keep exactly the tracked tables in it (I/O).

Which tables are tracked is decided by one rule, ``_bemi_is_tracked`` of
bemi/sql/tracking.sql (the settings: bemi/tracking.py), which the `migrate
bemi` triggers and event trigger use too; the event trigger adds each new
table at once. A publication bemi did not create is used as it is.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import errors, sql

from bemi.trust import untrusted_source_objects
from bemi.worker.errors import Blocked, WorkerError
from bemi.worker.shown import qualified, shown

__all__ = ["Publication", "MANAGED_PUBLICATION_COMMENT", "GRANTS_PUBLICATION_COMMENT"]

log = logging.getLogger("bemi.worker")

# Marks the publications this worker created and keeps to exactly the tracked tables;
# the `migrate bemi` event trigger adds each new table to them at once (bemi/sql/install.sql,
# _bemi_publish). The second one is what earlier versions wrote.
MANAGED_PUBLICATION_COMMENT = "bemi: tracked tables"
MANAGED_PUBLICATION_COMMENTS = (MANAGED_PUBLICATION_COMMENT, "bemi: tables of schema public")
#: The publication a superuser's `manage.py bemi_grants` made (bemi/grants.py): every table of the tracked
#: schemas (all tables before PostgreSQL 15), published from the transaction that creates it. Nobody but
#: a superuser may change it; the worker records only the tracked tables of it.
GRANTS_PUBLICATION_COMMENT = "bemi: tables of the tracked schemas (bemi_grants)"


#: What refresh_tables() calls in schema public (bemi/sql/tracking.sql).
_RULE_ROUTINES = ("public._bemi_tracked_tables(jsonb)", "public._bemi_is_tracked(regclass,jsonb)")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Publication:
    """One publication of the source database, managed through ``control`` (an autocommit connection)."""

    def __init__(self, control: psycopg.Connection, publication: str, user: str, database: str,
                 superuser: bool) -> None:
        self.control = control
        self.publication = publication
        self.user = user
        self.database = database
        self.superuser = superuser
        self.all_tables = False
        self.managed = False  # a publication bemi created: its tables are kept in line
        self.rules: str | None = None  # JSON rules for _bemi_is_tracked (bemi/worker/tracked.py); None: stored
        self._missing_identity_logged: set[str] = set()
        self._untrusted_logged = False

    def ensure_publication(self) -> None:
        """The publication: created (and then kept to exactly the tracked tables) when missing;
        one created by someone else is used as it is."""
        row = self.control.execute(
            "SELECT pg_catalog.pg_get_userbyid(p.pubowner), p.puballtables, "
            "pg_catalog.pg_has_role(p.pubowner, 'USAGE'), p.pubviaroot, "
            "pg_catalog.obj_description(p.oid, 'pg_publication'), "
            "(SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) p.pubowner) "
            "FROM pg_catalog.pg_publication p WHERE p.pubname = %s::name", [self.publication],
        ).fetchone()
        if row is None:
            try:
                self.control.execute(sql.SQL("CREATE PUBLICATION {} WITH (publish_via_partition_root = true)").format(
                    sql.Identifier(self.publication)))
            except errors.InsufficientPrivilege as exc:
                raise WorkerError(
                    f"cannot create publication {self.publication!r}: role {self.user!r} needs CREATE on the "
                    f"database. Run: GRANT CREATE ON DATABASE {_quote_ident(self.database)} TO {_quote_ident(self.user)}; "
                    f"(or create it as its owner: CREATE PUBLICATION {_quote_ident(self.publication)};)"
                ) from exc
            self._mark_managed()
            self.managed = True
            log.info("created publication %s (the tracked tables are added to it)", self.publication)
            return
        owner, all_tables, is_member, via_root, comment, owner_super = row
        if not owner_super and owner != self.user:
            # Its owner decides what is recorded: a publication of one harmless table, made before the
            # worker's first start by the database's owner, would hide every other write. Never used.
            raise Blocked(
                f"refusing to read through publication {shown(self.publication)}: role {owner!r}, neither a "
                f"superuser nor the worker's role {self.user!r}, made it and decides which tables it holds. "
                "Have a superuser run `python manage.py bemi_grants --app-role <the application's role> "
                f"--worker-role {self.user}` (it makes the publication again; docs/security.md), or drop it.")
        self.all_tables = all_tables
        self.managed = not all_tables and comment in MANAGED_PUBLICATION_COMMENTS
        if comment == GRANTS_PUBLICATION_COMMENT:
            log.info("publication %s was made by bemi_grants: every new table of its schemas is published from "
                     "the transaction that creates it (the worker records only the tracked tables)",
                     self.publication)
            return
        if not self.managed:
            log.info("publication %s was not created by bemi: used as it is, its tables are left alone "
                     "(the worker still records only the tracked tables)", self.publication)
            return
        if not (is_member or self.superuser):
            raise WorkerError(
                f"publication {self.publication!r} belongs to {owner!r}, so role {self.user!r} cannot keep its "
                f"tables in line. Run: ALTER PUBLICATION {_quote_ident(self.publication)} OWNER TO "
                f"{_quote_ident(self.user)};"
            )
        if not via_root:  # made by an earlier version: record partitions under their root's name
            self.control.execute(sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(
                sql.Identifier(self.publication)))
        if comment != MANAGED_PUBLICATION_COMMENT:
            self._mark_managed()

    def _mark_managed(self) -> None:
        """Let the `migrate bemi` event trigger add new tables to this publication as they are created."""
        self.control.execute(sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
            sql.Identifier(self.publication), sql.Literal(MANAGED_PUBLICATION_COMMENT)))

    def refresh_tables(self) -> list[str]:
        """Keep exactly the tracked tables in a publication bemi manages; return the names added.

        Tracked: ``_bemi_is_tracked`` under this worker's rules (``rules``), the one rule of
        bemi/sql/tracking.sql; partitions are published through their root. A table without a
        usable replica identity would make the application's UPDATE/DELETE fail once published,
        so it gets REPLICA IDENTITY FULL when we own it, and is left out (and named) otherwise.
        """
        if not self.managed:
            return []
        untrusted = untrusted_source_objects(self.control, _RULE_ROUTINES)
        if untrusted:  # in schema public, which the application's role may own: never run as the worker
            if not self._untrusted_logged:
                self._untrusted_logged = True
                log.warning("not keeping publication %s in line: %s (have a superuser run manage.py bemi_grants: "
                            "its publication needs no upkeep)", self.publication, ", ".join(u.why for u in untrusted))
            return []
        pub = sql.Identifier(self.publication)
        rows = self.control.execute(
            """
            SELECT c.oid, n.nspname, c.relname, c.relreplident,
                   EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                   EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
                   pg_catalog.pg_has_role(c.relowner, 'USAGE'),
                   EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel pr
                           JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
                           WHERE p.pubname = %s::name AND pr.prrelid = c.oid)
            FROM public._bemi_tracked_tables(%s::jsonb) AS t(rel)
            JOIN pg_catalog.pg_class c ON c.oid = t.rel::oid
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE NOT c.relispartition
            """,
            [self.publication, self.rules],
        ).fetchall()
        tracked = {oid for oid, *_ in rows}
        for oid, schema, name in self.control.execute(
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_publication_rel pr "
            "JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid "
            "JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE p.pubname = %s::name", [self.publication],
        ).fetchall():
            if oid not in tracked:
                try:
                    self.control.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                        pub, sql.Identifier(schema, name)))
                    log.info("not tracked any more (tracking settings): removed %s from publication %s",
                             qualified(schema, name), shown(self.publication))
                except (errors.UndefinedObject, errors.UndefinedTable, errors.LockNotAvailable) as exc:
                    log.info("will retry removing %s from the publication: %s", qualified(schema, name), shown(exc))
        added = []
        for _oid, schema, name, ident, has_pk, has_ident_index, owned, published in rows:
            usable = ident == "f" or (ident == "d" and has_pk) or (ident == "i" and has_ident_index)
            table = sql.Identifier(schema, name)
            label = qualified(schema, name)  # for the log: a name can hold a newline
            if not usable:
                if owned or self.superuser:
                    try:
                        self.control.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(table))
                        log.warning("set REPLICA IDENTITY FULL on %s: it has no primary key, and "
                                    "published without a replica identity its UPDATE/DELETE would fail", label)
                        usable = True
                    except psycopg.Error as exc:
                        log.warning("could not set REPLICA IDENTITY FULL on %s: %s", label, shown(exc))
                if not usable:
                    if published:
                        self.control.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(pub, table))
                    if label not in self._missing_identity_logged:
                        self._missing_identity_logged.add(label)
                        log.warning("not tracking %s: it has no primary key or replica identity and we "
                                    "may not set one (run ALTER TABLE %s REPLICA IDENTITY FULL; as its owner)",
                                    label, shown(table.as_string(self.control)))
                    continue
            if not published:
                try:
                    self.control.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, table))
                except errors.InsufficientPrivilege as exc:
                    if label not in self._missing_identity_logged:
                        self._missing_identity_logged.add(label)
                        log.warning("not tracking %s: %s (the table's owner must run the worker, or "
                                    "ALTER PUBLICATION %s ADD TABLE %s;)", label, shown(exc), shown(self.publication),
                                    shown(table.as_string(self.control)))
                    continue
                except (errors.DuplicateObject, errors.LockNotAvailable, errors.UndefinedTable) as exc:
                    log.info("will retry adding %s to the publication: %s", label, shown(exc))
                    continue
                added.append(label)
        if added:
            log.info("tracking new tables: %s", ", ".join(added))
        return added
