"""System checks of the ``bemi`` app.

Configuration checks run with every ``manage.py check``. The database checks
(``wal_level``, server version) need a connection, so, like Django's own
database checks, they run with ``manage.py check --database ALIAS`` and before
``manage.py migrate``.

=========  =====================================================================
bemi.E001  ``BEMI_CONTEXT_FUNCTION`` cannot be imported or is not callable
bemi.W001  ``BEMI_CONTEXT_FUNCTION`` is set but ``bemi.BemiMiddleware`` is not in ``MIDDLEWARE``
bemi.E002  ``wal_level`` of a PostgreSQL database is not ``logical``
bemi.E003  PostgreSQL older than 14
bemi.W002  ``PUBLIC`` may execute ``pg_logical_emit_message``: any role can label its writes
bemi.W003  ``PUBLIC`` may ``CREATE`` in schema ``public``, where bemi installs (PostgreSQL 14 and older)
bemi.E005  psycopg older than 3.3 (the worker streams with START_REPLICATION)
bemi.W015  an inactive replication slot (or Debezium's publication) left by an earlier Bemi worker
bemi.W004  the application's role can UPDATE, DELETE or TRUNCATE ``changes`` (history can be rewritten)
bemi.W020  ``max_slot_wal_keep_size = -1`` on a database where bemi is installed: a stopped
           worker's slot keeps WAL until the disk is full
bemi.W021  bemi is installed (``migrate bemi`` ran) but the database has no pgoutput
           replication slot: the worker never started, and changes are not recorded
bemi.E011  ``BEMI_SLOT`` or ``BEMI_PUBLICATION`` is not a name (nor a dict of alias -> name)
bemi.W022  the database's slot name (``BEMI_SLOT``, default ``bemi``) is taken by a slot of another
           database on the same server
bemi.E010  a tracking setting (``BEMI_SCHEMAS``, ``BEMI_IGNORED_TABLES``...) is not a list or holds a malformed pattern
bemi.W010  a table or column named in a tracking setting matches no Django model's table or column
bemi.W011  ``BEMI_UNSAFE_TRACK_BUILTINS`` tracks a built-in that holds credentials
=========  =====================================================================

W002, W003, W004, W020 and W021 are advice for a production server, so, by
Django's convention, they run with ``manage.py check --deploy --database
ALIAS`` (``@register(..., deploy=True)``), not with every ``migrate``: a first
``migrate`` on a stock server prints none of them. See docs/security.md for
what W002 and W003 mean and why they are worth fixing; silence one with
``SILENCED_SYSTEM_CHECKS = ['bemi.W020']`` when it is deliberate, e.g. a managed
server whose settings you cannot change. ``manage.py bemi_status`` shows W020
and W021, and more (docs/operations.md).
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.migrations.recorder import MigrationRecorder
from django.utils.module_loading import import_string

from bemi import conf
from bemi.leftovers import find_leftovers
from bemi.middleware import BemiMiddleware

MIN_SERVER_VERSION = 140000


@register()
def check_context_function(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if conf.context_function_path() is None:
        return []
    try:
        conf.context_function()
    except ImproperlyConfigured as exc:
        return [Error(
            str(exc),
            hint="Set BEMI_CONTEXT_FUNCTION to the dotted path of a function get_bemi_context(request) -> dict.",
            id="bemi.E001",
        )]
    return []


MIDDLEWARE_PATHS = {"bemi.BemiMiddleware", "bemi.middleware.BemiMiddleware"}


def _has_bemi_middleware() -> bool:
    """Is BemiMiddleware (or a subclass of it) in MIDDLEWARE?"""
    entries = list(getattr(settings, "MIDDLEWARE", None) or [])
    if MIDDLEWARE_PATHS.intersection(entries):
        return True
    for entry in entries:
        try:
            middleware = import_string(entry)
        except ImportError:
            continue
        if isinstance(middleware, type) and issubclass(middleware, BemiMiddleware):
            return True
    return False


@register()
def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if conf.context_function_path() is None or _has_bemi_middleware():
        return []
    return [Warning(
        "BEMI_CONTEXT_FUNCTION is set but 'bemi.BemiMiddleware' is not in MIDDLEWARE, "
        "so requests never get an application context.",
        hint="Add 'bemi.BemiMiddleware' to MIDDLEWARE.",
        id="bemi.W001",
    )]


def _postgresql(databases: Any) -> Iterator[tuple[str, Any]]:
    """(alias, connection) of the PostgreSQL ones among the aliases Django's database checks were given."""
    for alias in databases or []:
        connection = connections[alias]
        if connection.vendor == "postgresql":
            yield alias, connection


@register(Tags.database)
def check_database(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """What bemi cannot work without (E002, E003): before every ``migrate``."""
    messages: list[CheckMessage] = []
    for alias, connection in _postgresql(databases):
        with connection.cursor() as cursor:
            cursor.execute(SERVER_FACTS)
            wal_level, version, _role, _emit_functions, _public_creates = cursor.fetchone()
        if version < MIN_SERVER_VERSION:
            messages.append(Error(
                f"Database {alias!r} runs PostgreSQL {version // 10000}; bemi needs PostgreSQL 14 or newer.",
                hint="Upgrade the PostgreSQL server to version 14 or newer.",
                id="bemi.E003",
            ))
        if wal_level != "logical":
            messages.append(Error(
                f"Database {alias!r} has wal_level = {wal_level!r}; bemi needs 'logical' to read changes "
                "from the write-ahead log.",
                hint="Run ALTER SYSTEM SET wal_level = logical; as a superuser, then restart PostgreSQL.",
                id="bemi.E002",
            ))
    return messages


@register(Tags.database, deploy=True)
def check_database_deploy(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Production advice (W002, W003, W020, W021): ``check --deploy --database ALIAS``, Django's convention."""
    messages: list[CheckMessage] = []
    for alias, connection in _postgresql(databases):
        with connection.cursor() as cursor:
            cursor.execute(SERVER_FACTS)
            wal_level, _version, role, emit_functions, public_creates = cursor.fetchone()
        if emit_functions:
            statements = " ".join(
                f"REVOKE EXECUTE ON FUNCTION {f} FROM PUBLIC; GRANT EXECUTE ON FUNCTION {f} TO {role};"
                for f in emit_functions
            )
            messages.append(Warning(
                f"Database {alias!r}: every role (PUBLIC) may execute pg_logical_emit_message, so any role that "
                "can connect can write a '_bemi' message and label its own transaction's changes as any user.",
                hint=f"As a superuser run: {statements} (see docs/security.md)",
                id="bemi.W002",
            ))
        if public_creates:
            messages.append(Warning(
                f"Database {alias!r}: every role (PUBLIC) may CREATE in schema public, where bemi installs its "
                "functions and whose tables it tracks (the default before PostgreSQL 15).",
                hint="As the database owner or a superuser run: REVOKE CREATE ON SCHEMA public FROM PUBLIC; "
                     "(see docs/security.md)",
                id="bemi.W003",
            ))
        if wal_level == "logical" and alias != "bemi" and _bemi_migrated(connection):
            messages.extend(_slot_checks(alias, connection))
    return messages


def _suggested_slot(connection: Any) -> str:
    """``bemi_<database name>`` as a valid slot name (lower case letters, digits and underscores)."""
    name = re.sub(r"[^a-z0-9_]", "_", str(connection.settings_dict.get("NAME") or "").lower())
    return f"bemi_{name}"[:63]


def _names(alias: str) -> tuple[str, str] | None:
    """``BEMI_SLOT`` and ``BEMI_PUBLICATION`` of ``alias``; None when malformed (bemi.E011 says so)."""
    try:
        return conf.slot(alias), conf.publication(alias)
    except ImproperlyConfigured:
        return None


@register()
def check_names(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """bemi.E011: ``BEMI_SLOT`` / ``BEMI_PUBLICATION`` must be names (or dicts of alias -> name)."""
    messages: list[CheckMessage] = []
    for read in (conf.slot, conf.publication):
        try:
            for alias in connections.settings:
                read(alias)
        except ImproperlyConfigured as exc:
            messages.append(Error(str(exc), hint="See docs/worker.md (two databases on one server).", id="bemi.E011"))
    return messages


@register(Tags.database)
def check_slot_of_another_database(app_configs: Any = None, databases: Any = None,
                                   **kwargs: Any) -> list[CheckMessage]:
    """bemi.W022: this database's slot name is taken by a slot of another database on the same server."""
    messages: list[CheckMessage] = []
    for alias, connection in _postgresql(databases):
        names = _names(alias)
        if alias == "bemi" or names is None:
            continue
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT s.database::pg_catalog.text FROM pg_catalog.pg_replication_slots s "
                "WHERE s.slot_name OPERATOR(pg_catalog.=) %s::pg_catalog.name "
                "AND s.database OPERATOR(pg_catalog.<>) pg_catalog.current_database()", [names[0]])
            found = cursor.fetchone()
        if found is not None:
            messages.append(Warning(
                f"Database {alias!r}: the replication slot {names[0]!r} belongs to database {found[0]!r} on the "
                "same server (a slot's name is the server's, its changes one database's): the bemi worker of "
                f"{alias!r} cannot use it, and bemi_status would look at the other database's.",
                hint=f"Give this database a slot of its own: BEMI_SLOT = {_suggested_slot(connection)!r} "
                     "(and BEMI_PUBLICATION) in settings, or a dict of alias -> name (docs/worker.md).",
                id="bemi.W022",
            ))
    return messages


def _bemi_migrated(connection: Any) -> bool:
    """Has ``migrate bemi`` run on this database? (The alias ``bemi`` is the destination: not asked.)"""
    recorder = MigrationRecorder(connection)
    return recorder.has_table() and recorder.migration_qs.filter(app="bemi").exists()


def _slot_checks(alias: str, connection: Any) -> list[CheckMessage]:
    # The application's connection (its search_path): operators qualified, literals typed.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_catalog.current_setting('max_slot_wal_keep_size', true), "
            "EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s "
            "WHERE s.plugin OPERATOR(pg_catalog.=) 'pgoutput'::pg_catalog.name "
            "AND s.database OPERATOR(pg_catalog.=) pg_catalog.current_database())"
        )
        keep, has_slot = cursor.fetchone()
    messages: list[CheckMessage] = []
    if keep == "-1":
        messages.append(Warning(
            f"Database {alias!r} has max_slot_wal_keep_size = -1 (unbounded): if the bemi worker stops, its "
            "replication slot keeps every WAL file until the disk is full and PostgreSQL stops.",
            hint="Bound it above the longest worker outage you accept, e.g. ALTER SYSTEM SET "
                 "max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); (past it the slot is invalidated and "
                 "changes are lost, but the database keeps running). Watch the worker with manage.py bemi_status "
                 "or its metrics (docs/operations.md).",
            id="bemi.W020",
        ))
    if not has_slot:
        slot = (_names(alias) or (conf.DEFAULT_SLOT,))[0]
        messages.append(Warning(
            f"Database {alias!r} has bemi installed but no pgoutput replication slot: the bemi worker has never "
            "started there, so changes are not recorded.",
            hint=f"Start the worker: python manage.py bemi_worker (it creates the slot {slot!r} and the changes "
                 "table on its first start). Changes made before the slot exists are never recorded.",
            id="bemi.W021",
        ))
    return messages


MIN_PSYCOPG = (3, 3)  # bemi.worker.source.MIN_PSYCOPG: START_REPLICATION through execute()


@register()
def check_psycopg(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """bemi.E005: the worker streams the slot over the replication protocol, which needs psycopg >= 3.3."""
    import psycopg

    version = tuple(int(p) for p in psycopg.__version__.split(".")[:2] if p.isdigit())
    if version >= MIN_PSYCOPG:
        return []
    return [Error(
        f"psycopg {psycopg.__version__} is installed; the bemi worker needs psycopg >= 3.3 "
        "(it reads the replication slot with START_REPLICATION).",
        hint="pip install 'psycopg[binary]>=3.3'",
        id="bemi.E005",
    )]


# One round trip. Names are quoted by PostgreSQL (regprocedure, quote_ident).
SERVER_FACTS = """
    SELECT pg_catalog.current_setting('wal_level'),
           pg_catalog.current_setting('server_version_num')::pg_catalog.int4,
           pg_catalog.quote_ident(current_user),
           ARRAY(SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text FROM pg_catalog.pg_proc p
                 WHERE p.proname OPERATOR(pg_catalog.=) 'pg_logical_emit_message'
                   AND p.pronamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace
                   AND pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE')
                 ORDER BY 1),
           pg_catalog.to_regnamespace('public') IS NOT NULL
             AND pg_catalog.has_schema_privilege('public', 'public', 'CREATE')
"""


@register(Tags.database)
def check_leftovers(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Slots and publications an earlier Bemi worker left (bemi/leftovers.py): a slot nobody reads keeps WAL."""
    messages: list[CheckMessage] = []
    for alias, connection in _postgresql(databases):
        names = _names(alias) or ()
        with connection.cursor() as cursor:
            leftovers = find_leftovers(cursor.cursor, in_use_slots=names[:1], in_use_publications=names[1:])
        for leftover in leftovers:
            messages.append(Warning(
                f"Database {alias!r}: {leftover.message}",
                hint="After switching from the published Bemi worker, see docs/upgrading.md#leftovers. "
                     "Silence with SILENCED_SYSTEM_CHECKS = ['bemi.W015'] if something else reads it.",
                id="bemi.W015",
            ))
    return messages


@register(Tags.database, deploy=True)
def check_append_only(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """bemi.W004: can the application's role rewrite history? (docs/retention.md#append-only)"""
    from django.db import router

    from bemi.grants import rewrite_privileges
    from bemi.models import BemiChange

    alias = router.db_for_read(BemiChange) or "default"
    if alias not in (databases or []) or connections[alias].vendor != "postgresql":
        return []
    with connections[alias].cursor() as cursor:
        privileges = rewrite_privileges(cursor)
        cursor.execute("SELECT pg_catalog.quote_ident(current_user)")
        role = cursor.fetchone()[0]
    if not privileges:
        return []
    return [Warning(
        f"The application's role {role!r} can {', '.join(privileges)} the changes table of database {alias!r}: "
        "the audit trail can be rewritten from the application.",
        hint="Let the worker's role own changes and the application only read it: as a superuser, python manage.py "
             "bemi_grants --app-role <app role> --worker-role <worker role> (docs/security.md). Add 'bemi.W004' to "
             "SILENCED_SYSTEM_CHECKS if one role on purpose does both.",
        id="bemi.W004",
    )]
# -- what is tracked (bemi/tracking.py, docs/tracking.md) --------------------------------------

def _builtin_why(name: str) -> str:
    from bemi.tracking import BUILTIN_CREDENTIALS

    if name == "django_session":
        return "its primary key is the session key, a bearer credential: whoever reads it can act as the user"
    return BUILTIN_CREDENTIALS.get(name, "it is the password column of AUTH_USER_MODEL")


@register()
def check_tracking(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    from bemi import tracking as tr

    try:
        tracking = conf.tracking()
    except tr.TrackingError as exc:
        return [Error(str(exc), hint="See docs/tracking.md for the settings and their patterns.", id="bemi.E010")]
    messages: list[CheckMessage] = []
    for name in tracking.unsafe_track_builtins:
        messages.append(Warning(
            f"BEMI_UNSAFE_TRACK_BUILTINS tracks {name!r} in full: "
            f"{_builtin_why(name)}. Anyone who may read "
            "`changes` (bemi.view_bemichange in the admin) sees it.",
            hint=f"Remove {name!r} from BEMI_UNSAFE_TRACK_BUILTINS unless you really mean it.", id="bemi.W011"))
    messages += _unknown_names(tracking)
    return messages


def _model_tables() -> dict[tuple[str, str], set[str]]:
    """(schema, table) -> columns of every Django model (schema public unless db_table says 'schema"."table')."""
    from django.apps import apps

    tables: dict[tuple[str, str], set[str]] = {}
    for model in apps.get_models(include_auto_created=True):
        db_table = model._meta.db_table
        schema, table = ("public", db_table)
        if '"."' in db_table:
            schema, table = db_table.split('"."', 1)
        columns = tables.setdefault((schema.strip('"'), table.strip('"')), set())
        columns.update(f.column for f in model._meta.local_fields if f.column)
    return tables


def _unknown_names(tracking: Any) -> list[CheckMessage]:
    source = tracking.source
    tables = _model_tables()
    messages: list[CheckMessage] = []
    user_tables = set(source.get("ignored_tables") or ())
    for pattern in tracking.ignored_tables:
        if pattern.text in user_tables and not any(pattern.matches_table(s, t) for s, t in tables):
            messages.append(Warning(
                f"BEMI_IGNORED_TABLES: {pattern.text!r} matches no table of a Django model.",
                hint="Check the spelling (the table name, e.g. 'myapp_todo', not the model name); "
                     "a table without a model is fine: silence with SILENCED_SYSTEM_CHECKS = ['bemi.W010'].",
                id="bemi.W010"))
    for setting, patterns, given in (
        ("BEMI_IGNORED_COLUMNS", tracking.ignored_columns, source.get("ignored_columns") or ()),
        ("BEMI_MASKED_COLUMNS", tracking.masked_columns, source.get("masked_columns") or ()),
    ):
        for pattern in patterns:
            if pattern.text not in given:
                continue
            matched = [cols for (s, t), cols in tables.items() if pattern.matches_table(s, t)]
            if not matched:
                problem = "matches no table of a Django model"
            elif not any(pattern.matches_column(c) for cols in matched for c in cols):
                problem = "matches no column of the tables it names"
            else:
                continue
            messages.append(Warning(
                f"{setting}: {pattern.text!r} {problem}.",
                hint="Patterns are table.column or schema.table.column with the database names "
                     "(db_table, db_column, e.g. 'auth_user.password').",
                id="bemi.W010"))
    return messages
