"""Install and uninstall the database side of bemi (the SQL in ``bemi/sql``).

Used by the ``bemi`` migration. Only PostgreSQL connections are touched; the
server's NOTICEs (e.g. "no privilege to create event triggers") are shown to
the person running ``migrate`` and logged, since they say what to run next.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from bemi import sql

logger = logging.getLogger("bemi")


def run_sql_file(connection: Any, name: str) -> list[str]:
    """Run one of our SQL files on a Django connection; return bemi's NOTICEs."""
    return run_sql(sql.read(name), connection)


def run_sql(text: str, connection: Any) -> list[str]:
    """Run SQL on a Django connection; show and return bemi's NOTICEs."""
    if connection.vendor != "postgresql":
        return []
    notices: list[str] = []
    raw = connection.connection
    handler = None
    if hasattr(raw, "add_notice_handler"):  # psycopg 3

        def handler(diagnostic: Any) -> None:
            if (diagnostic.message_primary or "").startswith("bemi:"):
                notices.append(diagnostic.message_primary)

        raw.add_notice_handler(handler)
    try:
        with connection.cursor() as cursor:
            cursor.execute(text)
    finally:
        if handler is not None:
            raw.remove_notice_handler(handler)
    for notice in notices:
        tell(notice)
    return notices


def tell(notice: str, blank_line: bool = False) -> None:
    """Show a notice to whoever runs ``migrate``, once: on stdout, like the migration's own lines.

    Logged at INFO, not WARNING: with no logging configured, Python prints a
    WARNING record to stderr by itself (``logging.lastResort``), and every line
    came out twice.
    """
    logger.info(notice)
    sys.stdout.write(("\n" if blank_line else "") + f"  {notice}\n")


# Installed by a superuser (psql -f install.sql, for the event triggers) and now
# migrated by a role that is not one: keep the superuser's functions (the
# install would refuse to run over functions another role owns).
INSTALLED_BY_SUPERUSER = """
    SELECT r.rolname FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) p.proowner
    WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure('public._bemi_create_table_trigger_func()')
      AND r.rolsuper AND r.rolname OPERATOR(pg_catalog.<>) current_user
      AND NOT (SELECT u.rolsuper FROM pg_catalog.pg_roles u WHERE u.rolname OPERATOR(pg_catalog.=) current_user)
"""


def store_tracking(connection: Any, by: str = "migrate bemi") -> bool:
    """Write the ``BEMI_*`` tracking settings into ``public._bemi_tracking``; True when they changed.

    A role that may not (the rule installed by a superuser) gets a notice, never a failed migrate.
    """
    import json

    from django.db import DatabaseError, transaction

    from bemi import conf

    tracking = conf.tracking()  # a bad setting: TrackingError naming it
    rules, settings = json.dumps(tracking.sql_rules()), tracking.source_json()
    try:
        with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
            cursor.execute("SELECT pg_catalog.to_regclass('public._bemi_tracking') IS NOT NULL")
            if not cursor.fetchone()[0]:
                return False
            if _changes_live_here(connection):  # bemi's own tables, by oid: never tracked, whatever their name
                cursor.execute(
                    # The application's search_path: operators qualified (a planted public.||(oid[], oid[])
                    # would be an exact match, preferred to pg_catalog's polymorphic one).
                    "UPDATE public._bemi_tracking SET own_tables = ARRAY(SELECT DISTINCT u FROM pg_catalog.unnest("
                    "own_tables OPERATOR(pg_catalog.||) ARRAY(SELECT c.oid FROM pg_catalog.pg_class c "
                    # From the catalog: to_regclass() would need USAGE on schema bemi. Those of an earlier
                    # version still in public too, until the worker moves them (bemi/relocate.py).
                    "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
                    "WHERE n.nspname OPERATOR(pg_catalog.=) ANY ('{bemi,public}'::pg_catalog.name[]) "
                    "AND c.relname OPERATOR(pg_catalog.=) ANY ('{changes,_bemi_worker_checkpoints,"
                    "_bemi_worker_failures,_bemi_chain_cuts}'::pg_catalog.name[]) "
                    "AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog.\"char\"[]) "
                    "AND (n.nspname OPERATOR(pg_catalog.=) 'bemi' OR EXISTS (SELECT FROM pg_catalog.pg_roles r "
                    "WHERE r.oid OPERATOR(pg_catalog.=) c.relowner AND (r.rolsuper OR r.rolreplication))))) u)")
            cursor.execute(
                "UPDATE public._bemi_tracking SET rules = %s::jsonb, settings = %s::jsonb, "
                "updated_at = pg_catalog.now(), updated_by = %s::text "
                "WHERE rules IS DISTINCT FROM %s::jsonb OR settings IS DISTINCT FROM %s::jsonb",
                [rules, settings, by, rules, settings],
            )
            return cursor.rowcount > 0
    except DatabaseError as exc:
        notice = (f"bemi: could not store the tracking settings ({exc}); the stored ones stay in force "
                  "until a role that may update public._bemi_tracking runs migrate bemi")
        tell(notice)
        return False


def _changes_live_here(connection: Any) -> bool:
    """Does the worker write ``changes`` into this database (Django's routing of BemiChange says so)?"""
    from django.db import router

    from bemi.models import BemiChange

    return (router.db_for_write(BemiChange) or "default") == connection.alias


# Aliases whose functions a migration of the running `migrate` has installed (emptied by pre_migrate):
# 0007 and 0008 then have nothing to add, and no notice of the install is printed twice.
_installed_now: set[str] = set()


def forget_installs(sender: Any = None, using: str = "default", **kwargs: Any) -> None:
    """pre_migrate: a new `migrate` starts; what an earlier one in this process installed counts for nothing."""
    _installed_now.discard(using)


def install(apps: Any, schema_editor: Any) -> None:
    """The tracking rule and the settings first, then the triggers that follow them."""
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    _installed_now.add(connection.alias)
    with connection.cursor() as cursor:
        cursor.execute(INSTALLED_BY_SUPERUSER)
        found = cursor.fetchone()
    if found is not None:
        notice = (f"bemi: already installed by superuser {found[0]}; its functions are kept "
                  "(to reinstall, run bemi/sql/tracking.sql and bemi/sql/install.sql as a superuser)")
        tell(notice)
        store_tracking(connection)
        return
    run_sql_file(connection, "tracking.sql")
    store_tracking(connection)
    run_sql_file(connection, "install.sql")


UPGRADE_NOTICE = (
    "bemi: changes recorded before this version may hold credentials (session keys of django_session, "
    "password hashes of auth_user.password), now left out and masked for new changes. "
    "Run `python manage.py bemi_redact --dry-run`, then `python manage.py bemi_redact` to apply the "
    "ignored tables and masked columns to recorded history."
)


def upgrade(apps: Any, schema_editor: Any) -> None:
    """Migration 0004: install the tracking rule; say once that recorded history may hold credentials."""
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    reinstall(apps, schema_editor)
    if _has_recorded_history():
        tell(UPGRADE_NOTICE, blank_line=True)


def reinstall(apps: Any, schema_editor: Any) -> None:
    """Install this version's functions unless this `migrate` already did (0003, 0004, 0007, 0008).

    Migration 0007 (and any later one that changes bemi/sql): only 0001, 0003 and 0004 ran the SQL
    files, so an install that had passed them kept the old bodies (unpinned search_path, a marker
    honoured for any role, ...) whatever version was installed since. Idempotent (CREATE OR
    REPLACE); a new install runs 0001 to 0008 at once and installs, and says what it says, once."""
    if schema_editor.connection.alias in _installed_now:
        return
    install(apps, schema_editor)


def _has_recorded_history() -> bool:
    """Does the database the ``changes`` model reads from hold any change (an upgrade, not a new install)?"""
    from django.db import DatabaseError, connections, router, transaction

    from bemi.models import BemiChange

    alias = router.db_for_read(BemiChange) or "default"
    try:
        with transaction.atomic(using=alias):
            return BemiChange.objects.using(alias).exists()
    except DatabaseError:  # not in schema bemi (yet): a new install, or an earlier version's in public
        pass
    try:  # (moved into schema bemi at the worker's next start: bemi/relocate.py)
        with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
            cursor.execute("SELECT EXISTS (SELECT FROM public.changes)")
            return bool(cursor.fetchone()[0])
    except DatabaseError:
        return False


def sync_tracking(sender: Any = None, using: str = "default", **kwargs: Any) -> None:
    """After every ``migrate``: bring the stored settings and the triggers in line with the settings.

    Without this, a changed ``BEMI_*`` setting would only reach the database through a new migration.
    """
    from django.db import connections, router

    connection = connections[using]
    if connection.vendor != "postgresql" or not router.allow_migrate(using, "bemi"):
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_catalog.to_regclass('public._bemi_tracking') IS NOT NULL "
                       "AND pg_catalog.to_regprocedure('public._bemi_create_triggers()') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return  # not installed here (or uninstalled)
    if store_tracking(connection):
        notices = run_sql("CALL public._bemi_create_triggers(); CALL public._bemi_set_replica_identity();",
                          connection)
        message = f"bemi: tracking settings stored in database {using!r}; triggers brought in line"
        logger.info(message)
        if not notices:
            sys.stdout.write(f"  {message}\n")


def uninstall(apps: Any, schema_editor: Any) -> None:
    run_sql_file(schema_editor.connection, "uninstall.sql")


def install_over_published(apps: Any, schema_editor: Any) -> None:
    """Migration 0003: drop what the published bemi-django left in the way, then install ours."""
    if run_sql_file(schema_editor.connection, "upgrade_0_1_3.sql"):  # it dropped something: install again
        install(apps, schema_editor)
    else:
        reinstall(apps, schema_editor)
