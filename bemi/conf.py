"""Settings of the ``bemi`` app: one accessor per setting, with its default.

Accessors read ``django.conf.settings`` on every call (cheap) so that
``override_settings`` in tests and settings changed at run time are honoured.
"""

from __future__ import annotations

from typing import Any, Callable

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from bemi.limits import DEFAULT_MAX_CONTEXT_BYTES, DEFAULT_MAX_SQL_BYTES, MAX_CONTEXT_BYTES

__all__ = ["MAX_CONTEXT_BYTES", "max_context_bytes", "max_sql_bytes", "context_function_path", "context_function"]

_resolved: dict[str, Callable[[Any], Any]] = {}


_max_sql_bytes: list[int] = []  # cached: read on every new context (an unset setting costs ~10 us to look up)


def max_sql_bytes() -> int:
    """``BEMI_MAX_SQL_BYTES``: at most this many bytes of the statement (as JSON) in the context's ``"SQL"``.

    Default 4096 (``bemi.limits.DEFAULT_MAX_SQL_BYTES``); longer SQL is cut
    and ends with ``... [truncated by bemi]``. The whole context stays under
    ``max_context_bytes()`` whatever this says. Read once, again after
    ``override_settings`` changes it.
    """
    if _max_sql_bytes:
        return _max_sql_bytes[0]
    value = getattr(settings, "BEMI_MAX_SQL_BYTES", DEFAULT_MAX_SQL_BYTES)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ImproperlyConfigured(f"BEMI_MAX_SQL_BYTES must be a non-negative int, not {value!r}.")
    _max_sql_bytes.append(value)
    return value


_max_context_bytes: list[int] = []


def max_context_bytes() -> int:
    """``BEMI_MAX_CONTEXT_BYTES``: the largest context JSON (the dict and its ``"SQL"``) the wrapper sends.

    Default 16,384 (``bemi.limits.DEFAULT_MAX_CONTEXT_BYTES``); at most
    ``MAX_CONTEXT_BYTES`` (1,000,000), what the worker accepts. The SQL is cut
    to fit; a dict larger on its own is not sent (a warning). Read once, again
    after ``override_settings`` changes it.
    """
    if _max_context_bytes:
        return _max_context_bytes[0]
    value = getattr(settings, "BEMI_MAX_CONTEXT_BYTES", DEFAULT_MAX_CONTEXT_BYTES)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_CONTEXT_BYTES:
        raise ImproperlyConfigured(
            f"BEMI_MAX_CONTEXT_BYTES must be an int from 1 to {MAX_CONTEXT_BYTES} (what the worker accepts), "
            f"not {value!r}.")
    _max_context_bytes.append(value)
    return value


def _setting_changed(setting: str, **kwargs: Any) -> None:
    if setting == "BEMI_MAX_SQL_BYTES":
        _max_sql_bytes.clear()
    if setting == "BEMI_MAX_CONTEXT_BYTES":
        _max_context_bytes.clear()


setting_changed.connect(_setting_changed, dispatch_uid="bemi.conf.max_sql_bytes")


def context_function_path() -> Any:
    """``BEMI_CONTEXT_FUNCTION``: dotted path to ``get_bemi_context(request) -> dict`` (default: unset).

    The function itself is accepted too.
    """
    return getattr(settings, "BEMI_CONTEXT_FUNCTION", None) or None


def context_function() -> Callable[[Any], Any]:
    """The callable named by ``BEMI_CONTEXT_FUNCTION``, imported once per path.

    Raises ``ImproperlyConfigured`` with the reason when it is unset, cannot
    be imported or is not callable.
    """
    path = context_function_path()
    if path is None:
        raise ImproperlyConfigured(
            "BEMI_CONTEXT_FUNCTION is not set. Set it to the dotted path of a function "
            "get_bemi_context(request) -> dict, e.g. 'your_project.utils.get_bemi_context'."
        )
    if not isinstance(path, str):
        if callable(path):
            return path
        raise ImproperlyConfigured(f"BEMI_CONTEXT_FUNCTION must be a dotted path or a function, not {path!r}.")
    func = _resolved.get(path)
    if func is None:
        try:
            func = import_string(path)
        except ImportError as exc:
            raise ImproperlyConfigured(f"BEMI_CONTEXT_FUNCTION {path!r} cannot be imported: {exc}") from exc
        if not callable(func):
            raise ImproperlyConfigured(f"BEMI_CONTEXT_FUNCTION {path!r} is not callable ({type(func).__name__}).")
        _resolved[path] = func
    return func


def partition_interval() -> str:
    """``BEMI_PARTITION_INTERVAL``: ``'day'``, ``'week'`` or ``'month'`` (default), one partition of
    ``changes`` per period of ``committed_at`` (docs/retention.md)."""
    from bemi.worker.partitions import DEFAULT_INTERVAL, INTERVALS

    value = getattr(settings, "BEMI_PARTITION_INTERVAL", None) or DEFAULT_INTERVAL
    if value not in INTERVALS:
        raise ImproperlyConfigured(f"BEMI_PARTITION_INTERVAL must be one of {', '.join(INTERVALS)}; got {value!r}")
    return value


def retention() -> Any:
    """``BEMI_RETENTION``: a ``timedelta`` or a number of days; history older than that is dropped by the
    running worker (default: None, keep everything). Parsed by ``bemi.worker.partitions.parse_retention``."""
    from bemi.worker.partitions import parse_retention

    value = getattr(settings, "BEMI_RETENTION", None)
    try:
        return parse_retention(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"BEMI_RETENTION: {exc}") from exc
# -- the worker's replication slot and publication (docs/worker.md) ---------------------------------

DEFAULT_SLOT = "bemi"
DEFAULT_PUBLICATION = "bemi"


def _name_for(setting: str, alias: str, default: str) -> str:
    value = getattr(settings, setting, None)
    if value is None:
        return default
    if isinstance(value, dict):
        value = value.get(alias, default)
    if not isinstance(value, str) or not value or len(value.encode()) > 63:
        raise ImproperlyConfigured(
            f"{setting} must be a name (at most 63 bytes) or a dict of database alias -> name, e.g. "
            f"{setting} = 'bemi_myapp' or {{'default': 'bemi_myapp'}}; got {value!r}")
    return value


def slot(alias: str = "default") -> str:
    """``BEMI_SLOT``: the worker's replication slot for the database ``alias`` (default ``'bemi'``).

    A slot belongs to one database but its name to the whole server: two
    databases on one server need two names. A string names the slot of every
    tracked alias; a dict maps aliases to names (an alias it lacks: ``'bemi'``).
    Read by ``bemi_worker``, ``bemi_status`` and the system checks.
    """
    return _name_for("BEMI_SLOT", alias, DEFAULT_SLOT)


def publication(alias: str = "default") -> str:
    """``BEMI_PUBLICATION``: the worker's publication in the database ``alias`` (default ``'bemi'``), like ``BEMI_SLOT``."""
    return _name_for("BEMI_PUBLICATION", alias, DEFAULT_PUBLICATION)


# -- what is tracked (bemi/tracking.py, docs/tracking.md) ------------------------------------------

def user_password_columns() -> tuple[str, ...]:
    """The password column of a custom ``AUTH_USER_MODEL`` (a built-in masked column, like auth_user.password)."""
    from django.apps import apps

    label = getattr(settings, "AUTH_USER_MODEL", "auth.User")
    try:
        model = apps.get_model(label)
        field = model._meta.get_field("password")
    except Exception:
        return ()
    table, column = model._meta.db_table, getattr(field, "column", None) or "password"
    if table == "auth_user" or "." in table or '"' in table:
        return ()
    return (f"{table}.{column}",)


def tracking() -> Any:
    """The ``BEMI_*`` tracking settings as a validated ``bemi.tracking.Tracking``.

    Raises ``bemi.tracking.TrackingError`` (a ValueError) naming the setting that is wrong.
    """
    from bemi.tracking import Tracking

    return Tracking.build(
        schemas=getattr(settings, "BEMI_SCHEMAS", None),
        ignored_tables=getattr(settings, "BEMI_IGNORED_TABLES", None),
        ignored_columns=getattr(settings, "BEMI_IGNORED_COLUMNS", None),
        masked_columns=getattr(settings, "BEMI_MASKED_COLUMNS", None),
        unsafe_track_builtins=getattr(settings, "BEMI_UNSAFE_TRACK_BUILTINS", None),
        skip_unchanged_updates=getattr(settings, "BEMI_SKIP_UNCHANGED_UPDATES", False),
        extra_masked_columns=user_password_columns(),
    )


def masking_secret() -> str:
    """``BEMI_MASKING_KEY``, else ``SECRET_KEY``: what masked values are digested with."""
    return getattr(settings, "BEMI_MASKING_KEY", None) or settings.SECRET_KEY


DEFAULT_ACTIVITY_CONTEXT_KEYS = ["user_id", "path", "job"]


def activity_context_keys() -> list[str]:
    """``BEMI_ACTIVITY_CONTEXT_KEYS``: the context keys the admin's activity page filters on and shows as columns."""
    value = getattr(settings, "BEMI_ACTIVITY_CONTEXT_KEYS", DEFAULT_ACTIVITY_CONTEXT_KEYS)
    if not isinstance(value, (list, tuple)) or not all(isinstance(k, str) and k for k in value):
        raise ImproperlyConfigured(f"BEMI_ACTIVITY_CONTEXT_KEYS must be a list of context keys, not {value!r}.")
    return list(value)
