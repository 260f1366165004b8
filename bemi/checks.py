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
=========  =====================================================================
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.utils.module_loading import import_string

from bemi import conf
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


@register(Tags.database)
def check_database(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for alias in databases or []:
        connection = connections[alias]
        if connection.vendor != "postgresql":
            continue
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('wal_level'), current_setting('server_version_num')::int")
            wal_level, version = cursor.fetchone()
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
