"""The publication the worker reads: create it, and keep the trackable tables in it (I/O).

Which tables are published is decided here (and by the `migrate bemi` event
trigger, bemi/sql/install.sql, which adds each new table at once).
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import errors, sql

from bemi.worker.errors import WorkerError

__all__ = ["Publication", "MANAGED_PUBLICATION_COMMENT"]

log = logging.getLogger("bemi.worker")

# Marks the publications this worker keeps up to date; the `migrate bemi` event
# trigger adds each new table to them at once (bemi/sql/install.sql, _bemi_publish).
MANAGED_PUBLICATION_COMMENT = "bemi: tables of schema public"


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
        self._missing_identity_logged: set[str] = set()

    def ensure_publication(self) -> None:
        row = self.control.execute(
            "SELECT pg_get_userbyid(pubowner), puballtables, pg_has_role(pubowner, 'USAGE') "
            "FROM pg_publication WHERE pubname = %s", [self.publication],
        ).fetchone()
        if row is None:
            try:
                self.control.execute(sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(self.publication)))
            except errors.InsufficientPrivilege as exc:
                raise WorkerError(
                    f"cannot create publication {self.publication!r}: role {self.user!r} needs CREATE on the "
                    f"database. Run: GRANT CREATE ON DATABASE {_quote_ident(self.database)} TO {_quote_ident(self.user)}; "
                    f"(or create it as its owner: CREATE PUBLICATION {_quote_ident(self.publication)};)"
                ) from exc
            self._mark_managed()
            log.info("created publication %s (public tables except changes and _bemi* are added to it)",
                     self.publication)
            return
        owner, all_tables, is_member = row
        self.all_tables = all_tables
        if not all_tables and not (is_member or self.superuser):
            raise WorkerError(
                f"publication {self.publication!r} belongs to {owner!r}, so role {self.user!r} cannot add tables "
                f"to it. Run: ALTER PUBLICATION {_quote_ident(self.publication)} OWNER TO {_quote_ident(self.user)};"
            )
        if not all_tables:
            self._mark_managed()

    def _mark_managed(self) -> None:
        """Let the `migrate bemi` event trigger add new tables to this publication as they are created."""
        self.control.execute(sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
            sql.Identifier(self.publication), sql.Literal(MANAGED_PUBLICATION_COMMENT)))

    def refresh_tables(self) -> list[str]:
        """Put every trackable public table in the publication; return the names added.

        A table without a usable replica identity would make the application's
        UPDATE/DELETE fail once published, so it gets REPLICA IDENTITY FULL when
        we own it, and is left out (and named in a warning) otherwise.
        """
        if self.all_tables:
            return []
        rows = self.control.execute(
            """
            SELECT c.oid, c.relname, c.relreplident,
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
                   pg_has_role(c.relowner, 'USAGE'),
                   EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                           WHERE p.pubname = %s AND pr.prrelid = c.oid)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind = 'r' AND NOT c.relispartition
              AND c.relname <> 'changes' AND c.relname NOT LIKE '\\_bemi%%'
            """,
            [self.publication],
        ).fetchall()
        added = []
        for _oid, name, ident, has_pk, has_ident_index, owned, published in rows:
            usable = ident == "f" or (ident == "d" and has_pk) or (ident == "i" and has_ident_index)
            table = sql.Identifier("public", name)
            if not usable:
                if owned or self.superuser:
                    try:
                        self.control.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(table))
                        log.warning("set REPLICA IDENTITY FULL on public.%s: it has no primary key, and "
                                    "published without a replica identity its UPDATE/DELETE would fail", name)
                        usable = True
                    except psycopg.Error as exc:
                        log.warning("could not set REPLICA IDENTITY FULL on public.%s: %s", name, exc)
                if not usable:
                    if published:
                        self.control.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                            sql.Identifier(self.publication), table))
                    if name not in self._missing_identity_logged:
                        self._missing_identity_logged.add(name)
                        log.warning("not tracking public.%s: it has no primary key or replica identity and we "
                                    "may not set one (run ALTER TABLE public.%s REPLICA IDENTITY FULL; as its owner)",
                                    name, name)
                    continue
            if not published:
                try:
                    self.control.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                        sql.Identifier(self.publication), table))
                except errors.InsufficientPrivilege as exc:
                    if name not in self._missing_identity_logged:
                        self._missing_identity_logged.add(name)
                        log.warning("not tracking public.%s: %s (the table's owner must run the worker, or "
                                    "ALTER PUBLICATION %s ADD TABLE public.%s;)", name, exc, self.publication, name)
                    continue
                except (errors.DuplicateObject, errors.LockNotAvailable, errors.UndefinedTable) as exc:
                    log.info("will retry adding public.%s to the publication: %s", name, exc)
                    continue
                added.append(name)
        if added:
            log.info("tracking new tables: %s", ", ".join(added))
        return added
