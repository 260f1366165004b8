"""The worker's side of what is tracked (I/O on the source database).

At start the worker

* makes sure the rule is installed (``bemi/sql/tracking.sql``: the config table
  and ``_bemi_is_tracked``), which ``migrate bemi`` normally did;
* takes the tracking settings from its flags, storing them for the event
  trigger, or, without flags, the ones stored there (by ``migrate bemi`` from
  the Django settings, or by an earlier worker);
* registers bemi's own tables by oid when it writes ``changes`` into the
  tracked database itself (never by name);
* finds the masking key: given (``BEMI_MASKING_KEY``, or ``SECRET_KEY`` with
  ``manage.py bemi_worker``), else a random key kept in the source database.

Every query pins nothing itself (the connection does) and qualifies bemi's
objects and casts its parameters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets

import psycopg
from psycopg import errors, sql

from bemi import sql as bemi_sql
from bemi import tables
from bemi import tracking as tr
from bemi.trust import untrusted_source_objects
from bemi.worker.errors import Blocked, WorkerError
from bemi.worker.shown import shown

__all__ = ["TrackedTables"]

log = logging.getLogger("bemi.worker")



def _own_oids(conn: psycopg.Connection) -> tuple:
    """Oids of the tables registered as bemi's own (``changes``'s partitions are decided by their root)."""
    names = [table.as_string(conn) for table in (tables.CHANGES, tables.CHECKPOINTS, tables.FAILURES,
                                                  tables.CHAIN_CUTS)]
    return conn.execute("SELECT pg_catalog.to_regclass(%s::text)::oid, pg_catalog.to_regclass(%s::text)::oid, "
                        "pg_catalog.to_regclass(%s::text)::oid, pg_catalog.to_regclass(%s::text)::oid",
                        names).fetchone() or ()


_FUNCTIONS = ("public._bemi_is_tracked(regclass,jsonb)", "public._bemi_tracked_tables(jsonb)")
#: What _align_triggers() calls, and what those call (bemi/sql/install.sql, tracking.sql).
_ALIGN_ROUTINES = ("public._bemi_create_triggers()", "public._bemi_set_replica_identity()",
                   "public._bemi_create_trigger(regclass)", "public._bemi_set_replica_identity_on(regclass)",
                   "public._bemi_tables()", "public._bemi_tracked_tables(jsonb)", "public._bemi_is_tracked(regclass)",
                   "public._bemi_is_tracked(regclass,jsonb)")


class TrackedTables:
    """The tracking settings of one source database, as the worker uses them."""

    def __init__(self, control: psycopg.Connection, user: str) -> None:
        self.control = control  # autocommit
        self.user = user
        self.tracking = tr.Tracking.build()
        self.own_tables: frozenset[int] = frozenset()
        self.key = b""
        self.writable = True  # public._bemi_tracking is a superuser's or ours (ensure_rule)

    # -- the rule ----------------------------------------------------------------------------

    def ensure_rule(self) -> None:
        present = self.control.execute(
            "SELECT pg_catalog.to_regclass('public._bemi_tracking') IS NOT NULL AND "
            + " AND ".join("pg_catalog.to_regprocedure(%s) IS NOT NULL" for _ in _FUNCTIONS), list(_FUNCTIONS),
        ).fetchone()
        untrusted = untrusted_source_objects(self.control)
        self.writable = not untrusted
        if untrusted and untrusted[0].kind == "r":
            # Read only: a plain table runs no code of its owner on SELECT (the session has row_security
            # off, so a policy would be an error, never run). Written by a superuser's or our own only.
            log.warning("%s is neither a superuser's nor role %s's: the worker reads the settings there but writes "
                        "nothing into it (not its flags, its own tables or a masking key). Have a superuser run "
                        "`python manage.py bemi_grants` (docs/security.md)", untrusted[0].why, self.user)
        elif untrusted:  # (the application's role may make one in a public it owns: wait, never exit)
            raise Blocked(
                f"refusing to use {untrusted[0].why}: it is neither a superuser's nor role {self.user!r}'s, so "
                f"its triggers, rules or defaults would run as role {self.user!r}. Have a superuser run "
                "`python manage.py bemi_grants --app-role <the application's role> --worker-role "
                f"{self.user}` (it makes it again, keeping the settings; docs/security.md)."
            )
        if (present and present[0]) or not self.writable:
            return  # (tracking.sql refuses to install over a settings table another role owns)
        try:
            with self.control.transaction():
                self.control.execute(bemi_sql.read("tracking.sql"))
        except (errors.InsufficientPrivilege, errors.DependentObjectsStillExist) as exc:
            raise WorkerError(
                "the tracking rule (bemi/sql/tracking.sql) is not installed in the source database and role "
                f"{self.user!r} may not install it ({exc}). Run `python manage.py migrate bemi`, or "
                "`psql -f bemi/sql/tracking.sql` as the owner of schema public."
            ) from exc
        log.info("installed the tracking rule (public._bemi_tracking, public._bemi_is_tracked)")

    # -- the settings ------------------------------------------------------------------------

    def _update_settings_table(self, query: str, params: list) -> int:
        """Rows an UPDATE of public._bemi_tracking changed. InsufficientPrivilege, like the server's own,
        when that table is neither a superuser's nor ours: its triggers would run their owner's code as us."""
        if not self.writable:
            raise errors.InsufficientPrivilege("public._bemi_tracking is not a superuser's nor ours")
        return self.control.execute(query, params).rowcount

    def load(self, given: tr.Tracking | None) -> tr.Tracking:
        """The settings in force: the flags' (stored for the event trigger), else the stored ones."""
        if given is not None:
            rules, settings = json.dumps(given.sql_rules()), given.source_json()
            try:
                changed = self._update_settings_table(
                    "UPDATE public._bemi_tracking SET rules = %s::jsonb, settings = %s::jsonb, "
                    "updated_at = pg_catalog.now(), updated_by = 'bemi-worker' "
                    "WHERE rules IS DISTINCT FROM %s::jsonb OR settings IS DISTINCT FROM %s::jsonb",
                    [rules, settings, rules, settings])
                if changed:
                    log.info("stored the tracking settings in public._bemi_tracking (used by the event trigger)")
                    self._align_triggers()
            except errors.InsufficientPrivilege as exc:
                log.warning("could not store the tracking settings for the event trigger (%s): tables created "
                            "later are set up by the stored settings until `migrate bemi` or a worker with "
                            "UPDATE on public._bemi_tracking stores these", exc)
            self.tracking = given
        else:
            row = self.control.execute(
                "SELECT settings, updated_by FROM public._bemi_tracking").fetchone()
            stored = row[0] if row else {}
            try:
                self.tracking = tr.Tracking.from_source(stored) if stored else tr.Tracking.build()
            except tr.TrackingError as exc:
                raise WorkerError(f"the tracking settings stored in public._bemi_tracking are invalid: {exc}")
        log.info("tracking: %s", self.tracking.describe())
        # What is tracked is on the record: the settings table's changes are recorded like any table's when
        # the publication has it (bemi_grants' does), but never the masking key kept in it.
        key = tr.Pattern.parse("public._bemi_tracking.generated_key", "built-in", columns=True)
        self.tracking = dataclasses.replace(self.tracking, ignored_columns=self.tracking.ignored_columns + (key,),
                                            masked_columns=self.tracking.masked_columns + (key,))
        return self.tracking

    def _align_triggers(self, identity: bool = True) -> None:
        """Triggers (and replica identity) in line with the settings (when `migrate bemi` installed them)."""
        row = self.control.execute(
            "SELECT pg_catalog.to_regprocedure('public._bemi_create_triggers()') IS NOT NULL "
            "AND pg_catalog.to_regprocedure('public._bemi_set_replica_identity()') IS NOT NULL").fetchone()
        if not (row and row[0]):
            return
        untrusted = untrusted_source_objects(self.control, _ALIGN_ROUTINES)
        if untrusted:  # in schema public, which the application's role may own: never run as the worker
            log.warning("not bringing the triggers in line with the tracking settings: %s; run `python manage.py "
                        "migrate bemi`, or have a superuser run bemi_grants", ", ".join(u.why for u in untrusted))
            return
        notices: list[str] = []

        def on_notice(diagnostic) -> None:
            if (diagnostic.message_primary or "").startswith("bemi:"):
                notices.append(diagnostic.message_primary)

        self.control.add_notice_handler(on_notice)
        try:
            self.control.execute("CALL public._bemi_create_triggers()")
            if identity:
                self.control.execute("CALL public._bemi_set_replica_identity()")
        except psycopg.Error as exc:
            log.warning("could not bring the triggers in line with the tracking settings: %s "
                        "(run `python manage.py migrate bemi`)", exc)
        finally:
            self.control.remove_notice_handler(on_notice)
        for notice in notices:
            log.info("%s", shown(notice))  # names the tables: any role may name one with a newline
        log.info("triggers%s brought in line with the tracking settings", " and replica identity" if identity else "")

    def rules(self) -> str:
        """The rules ``_bemi_is_tracked(rel, rules)`` applies for this worker (with its own tables)."""
        rules = self.tracking.sql_rules()
        rules["own_tables"] = sorted(self.own_tables)
        return json.dumps(rules)

    # -- bemi's own tables -------------------------------------------------------------------

    def _same_database(self, destination: psycopg.Connection) -> bool:
        """Is ``destination`` a session of this very database (not merely a database of the same name)?"""
        pid, started = destination.execute(
            "SELECT pg_catalog.pg_backend_pid(), a.backend_start FROM pg_catalog.pg_stat_activity a "
            "WHERE a.pid = pg_catalog.pg_backend_pid()").fetchone() or (None, None)
        same = self.control.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = %s::int4 "
            "AND a.backend_start = %s::timestamptz AND a.datname = pg_catalog.current_database())",
            [pid, started],
        ).fetchone()
        return bool(same and same[0])

    def claim_new_tables(self, destination: psycopg.Connection) -> None:
        """In the transaction that just created bemi's tables here: register them as bemi's own, and
        undo what bemi's event trigger did to them as to any new table of the application.

        The event trigger gave ``changes``, its default partition and the
        worker's tables a trigger, ``REPLICA IDENTITY FULL`` and a place in the
        publication, since they were not registered yet (a table is registered
        by oid, known only once it exists). Undone before the commit, nobody
        sees them tracked, and the first start does not log them "no longer
        tracked". Without the privileges for it, nothing is undone here and
        ``register_own_tables`` does it after the commit, as before.
        """
        if not self._same_database(destination) or not self.writable:
            return  # (not writable: a settings table another role made, whose triggers would run as us)
        own = [o for o in _own_oids(destination) if o is not None]
        if not own:
            return
        try:
            with destination.transaction():  # a savepoint: on any refusal, as if nothing happened here
                destination.execute(
                    "UPDATE public._bemi_tracking SET own_tables = ARRAY(SELECT DISTINCT u FROM "
                    "pg_catalog.unnest(own_tables OPERATOR(pg_catalog.||) %s::pg_catalog.oid[]) u)", [own])
                # and _bemi_pruned, bemi's by the rule's _bemi-prefix-and-owner clause once these are registered
                relations = [r for (r,) in destination.execute(
                    "WITH o AS (SELECT pg_catalog.unnest(%s::pg_catalog.oid[] OPERATOR(pg_catalog.||) "
                    "pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid) AS oid) "
                    "SELECT o.oid FROM o WHERE o.oid IS NOT NULL UNION SELECT t.relid::pg_catalog.oid FROM o, "
                    "LATERAL pg_catalog.pg_partition_tree(o.oid::pg_catalog.regclass) t",
                    [own, tables.PRUNED.as_string(destination)])]
                for trigger, table in destination.execute(
                        "SELECT tg.tgname::pg_catalog.text, tg.tgrelid::pg_catalog.regclass::pg_catalog.text "
                        "FROM pg_catalog.pg_trigger tg WHERE tg.tgrelid OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.oid[]) "
                        "AND NOT tg.tgisinternal AND tg.tgfoid OPERATOR(pg_catalog.=) "
                        "pg_catalog.to_regprocedure('public._bemi_row_trigger_func()')", [relations]).fetchall():
                    destination.execute(sql.SQL("DROP TRIGGER {} ON {}").format(
                        sql.Identifier(trigger), sql.SQL(table)))
                for (table,) in destination.execute(
                        "SELECT c.oid::pg_catalog.regclass::pg_catalog.text FROM pg_catalog.pg_class c "
                        "WHERE c.oid OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.oid[]) "
                        "AND c.relreplident OPERATOR(pg_catalog.=) 'f'", [relations]).fetchall():
                    destination.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY DEFAULT").format(sql.SQL(table)))
                for publication, table in destination.execute(
                        "SELECT p.pubname::pg_catalog.text, r.prrelid::pg_catalog.regclass::pg_catalog.text "
                        "FROM pg_catalog.pg_publication_rel r JOIN pg_catalog.pg_publication p "
                        "ON p.oid OPERATOR(pg_catalog.=) r.prpubid "
                        "WHERE r.prrelid OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.oid[])", [relations]).fetchall():
                    destination.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                        sql.Identifier(publication), sql.SQL(table)))
        except psycopg.Error as exc:
            log.debug("bemi's new tables are registered after their creation instead: %s", exc)
            return
        self.own_tables = self.own_tables | frozenset(own)

    def register_own_tables(self, destination: psycopg.Connection) -> frozenset[int]:
        """Oids of ``changes``, the checkpoints and the dead letters when the destination is this very database."""
        same = self._same_database(destination)
        oids = _own_oids(destination)
        destination.rollback()
        if not same or not oids:
            return self.own_tables
        own = frozenset(int(o) for o in oids if o is not None)
        self.own_tables = self.own_tables | own
        try:
            registered = self._update_settings_table(
                "UPDATE public._bemi_tracking SET own_tables = ARRAY(SELECT DISTINCT u FROM "
                "pg_catalog.unnest(own_tables || %s::oid[]) u WHERE EXISTS "
                "(SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = u)) WHERE NOT (own_tables @> %s::oid[])",
                [sorted(own), sorted(own)])
            if registered:  # the event trigger may have set them up as it does any new table
                log.info("registered changes and the worker's _bemi_* tables as bemi's own (never tracked)")
                self._align_triggers(identity=False)
        except errors.InsufficientPrivilege as exc:
            log.warning("could not register changes and _bemi_worker_checkpoints as bemi's own tables in "
                        "public._bemi_tracking (%s); the worker still skips them", exc)
        return own

    def is_own(self, relid: int) -> bool | None:
        """Is this relation one of bemi's own tables or a partition of one (``changes`` is partitioned)?"""
        if not self.own_tables:
            return False
        row = self.control.execute(
            "SELECT COALESCE(pg_catalog.pg_partition_root(c.oid)::oid, c.oid) FROM pg_catalog.pg_class c "
            "WHERE c.oid = %s::oid", [relid]).fetchone()
        if row is None:
            # Dropped before the worker read it (a partition of changes the retention or a test dropped):
            # the catalog cannot say any more, so the partition's name decides (a known, narrow gap).
            return None
        return int(row[0]) in self.own_tables

    # -- the masking key ---------------------------------------------------------------------

    def masking_key(self, given: str | None) -> bytes:
        if given:
            self.key = tr.derive_key(given)
            return self.key
        try:
            row = self.control.execute("SELECT generated_key FROM public._bemi_tracking").fetchone()
            key = row[0] if row else None
            if key is None:
                key = secrets.token_bytes(32)
                self._update_settings_table(
                    "UPDATE public._bemi_tracking SET generated_key = %s::bytea WHERE generated_key IS NULL", [key])
                stored = self.control.execute("SELECT generated_key FROM public._bemi_tracking").fetchone()
                key = stored[0] if stored else key
                log.warning("no BEMI_MASKING_KEY: masked columns are keyed with a random key kept in "
                            "public._bemi_tracking of the source database (set BEMI_MASKING_KEY to choose one)")
        except errors.InsufficientPrivilege as exc:
            raise WorkerError(
                "masked columns need a key: set BEMI_MASKING_KEY (or --masking-key), or grant role "
                f"{self.user!r} SELECT, UPDATE on public._bemi_tracking so it can keep a random one ({exc})"
            ) from exc
        self.key = tr.derive_key(bytes(key))
        return self.key
