"""The execute wrapper that puts the application context into the WAL.

For each INSERT, UPDATE, DELETE, MERGE or data-modifying ``WITH`` that runs
while a context is set, the wrapper sends

    SELECT pg_catalog.pg_logical_emit_message(true, '_bemi', %s::text); <the statement>

in one query string, with the context JSON as a *bound parameter* (never
pasted into SQL text), then calls ``cursor.nextset()`` so that ``rowcount``,
``fetchone()`` and ``RETURNING`` rows are the user's statement's. The message
is transactional: it is in the WAL, just before the row changes, only if
the statement's transaction commits.

Where one query string cannot hold two statements (``executemany``, a cursor
with server-side binding, psycopg2) the message is sent as its own statement
on the same connection and transaction (an atomic block is opened in
autocommit mode).

Tracking must never break the application: any failure while building the
context runs the statement unchanged and logs one warning per cause.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Callable

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections, transaction
from django.db.backends.signals import connection_created

from bemi.conf import max_context_bytes, max_sql_bytes
from bemi.appcontext import ContextError, Frame, current_frame
from bemi.statements import is_tracked_write, may_write

__all__ = ["bemi_execute_wrapper", "install_execute_wrapper", "uninstall_execute_wrapper", "build_payload"]

logger = logging.getLogger("bemi")

# Qualified: the application's session search_path includes public, where
# other roles may have planted a better-matching pg_logical_emit_message.
EMIT = "SELECT pg_catalog.pg_logical_emit_message(true, '_bemi', %s::text); "
EMIT_NAMED = "SELECT pg_catalog.pg_logical_emit_message(true, '_bemi', %(__bemi_context)s::text); "
EMIT_ALONE = "SELECT pg_catalog.pg_logical_emit_message(true, '_bemi', %s::text)"
PARAM_KEY = "__bemi_context"
TRUNCATED = "... [truncated by bemi]"
_INTRANS = 2  # libpq PQTRANS_INTRANS, same value in psycopg 3 and psycopg2
_INERROR = 3  # libpq PQTRANS_INERROR

_warned: set[str] = set()


def _warn_once(cause: str, message: str) -> None:
    if cause not in _warned:
        _warned.add(cause)
        logger.warning("bemi: context not attached (%s): %s. Statements still run; "
                       "this warning is logged once per cause.", cause, message)


# -- installation ----------------------------------------------------------------


def install_execute_wrapper() -> None:
    """Attach the wrapper to every PostgreSQL connection, now and whenever one is opened."""
    connection_created.connect(_on_connection_created, dispatch_uid="bemi.wrapper")
    for conn in connections.all(initialized_only=True):
        _attach(conn)


def uninstall_execute_wrapper() -> None:
    """Detach from the connections of this thread and stop attaching (benchmarks, tests)."""
    connection_created.disconnect(dispatch_uid="bemi.wrapper")
    for conn in connections.all(initialized_only=True):
        while bemi_execute_wrapper in conn.execute_wrappers:
            conn.execute_wrappers.remove(bemi_execute_wrapper)


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    _attach(connection)


def _attach(conn: Any) -> None:
    # First in the list (outermost): Django's ``connection.execute_wrapper()``
    # context manager pops the *last* wrapper on exit, so appending ours while
    # a user's block is open would get ours removed and theirs left behind.
    if conn.vendor == "postgresql" and bemi_execute_wrapper not in conn.execute_wrappers:
        conn.execute_wrappers.insert(0, bemi_execute_wrapper)


# -- the wrapper -------------------------------------------------------------------


def bemi_execute_wrapper(execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: dict) -> Any:
    frame = current_frame()
    if frame is None:
        if LABELLED in context["connection"].__dict__:  # a context was sent earlier: has it ended?
            return _without_context(execute, sql, params, many, context)
        return execute(sql, params, many, context)
    if type(sql) is not str or not is_tracked_write(sql):
        return execute(sql, params, many, context)
    db = context["connection"]
    raw = context["cursor"].cursor
    try:
        payload = None
        if not _must_skip(db, raw):
            may_emit, utf8 = _connection_facts(db)
            if may_emit:
                payload = build_payload(frame, sql, utf8)
    except ContextError as exc:
        _warn_once(exc.cause, str(exc))
        payload = None
    except Exception as exc:  # never break the application
        _warn_once("internal", f"{type(exc).__name__}: {exc}")
        payload = None
    if payload is None:
        if LABELLED in db.__dict__:
            return _without_context(execute, sql, params, many, context)
        return execute(sql, params, many, context)
    db.__dict__[LABELLED] = True
    return _send(execute, sql, params, many, context, db, raw, payload)


# The worker labels a change with the latest ``_bemi`` message of its
# transaction. So once a transaction carried a context, a later tracked write
# without one sends ``{}`` ("no context"), or it would inherit the earlier one.
# ``LABELLED`` in the Django connection's __dict__: a context was sent and its
# transaction may still be open. Cleared at the first statement without a
# context that finds no transaction open (the status is read before the
# statement runs, so the first statement of a new transaction always does).
LABELLED = "_bemi_labelled"
NO_CONTEXT = "{}"


def _without_context(execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: dict) -> Any:
    db = context["connection"]
    raw = context["cursor"].cursor
    try:
        if _transaction_status(raw) != _INTRANS:
            db.__dict__.pop(LABELLED, None)  # that transaction ended: nothing to undo
            return execute(sql, params, many, context)
        # Any statement that may run code that writes (SELECT f(), CALL, COPY, SQL given as psycopg.sql
        # objects, which cannot be read here...): when unsure, reset.
        if (type(sql) is str and not may_write(sql)) or _must_skip(db, raw) or not _connection_facts(db)[0]:
            return execute(sql, params, many, context)
    except Exception as exc:  # never break the application
        _warn_once("internal", f"{type(exc).__name__}: {exc}")
        return execute(sql, params, many, context)
    db.__dict__.pop(LABELLED, None)  # from here on the transaction's latest context is {}
    return _send(execute, sql, params, many, context, db, raw, NO_CONTEXT)


def _send(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict, db: Any, raw: Any, payload: str
) -> Any:
    """Run ``sql`` after the message ``payload``, in one query string when the cursor allows it."""
    if many or type(sql) is not str or not _one_string_holds_two(raw):
        return _execute_after_message(execute, sql, params, many, context, db, raw, payload)

    if params is None:  # psycopg will now interpolate: keep literal % signs literal
        sql, params = EMIT + sql.replace("%", "%%"), [payload]
    elif isinstance(params, Mapping):
        sql, params = EMIT_NAMED + sql, {**params, PARAM_KEY: payload}
    else:
        sql, params = EMIT + sql, [payload, *params]
    result = execute(sql, params, many, context)
    raw.nextset()  # from the message's SELECT to the user's statement
    if db.queries_logged:
        _log_only_users_statement(raw, payload)
    return result


def _log_only_users_statement(raw: Any, payload: str) -> None:
    """Make Django's query log (DEBUG, ``CaptureQueriesContext``, debug toolbar) show the user's SQL.

    Django reads the last query from psycopg's cursor; cut our message's
    SELECT off its front. Only done while queries are logged.
    """
    query = getattr(raw, "_query", None)
    text = getattr(query, "query", None)
    if query is None or not isinstance(text, bytes):
        return
    try:
        from psycopg import sql as pgsql

        head = (b"SELECT pg_catalog.pg_logical_emit_message(true, '_bemi', "
                + pgsql.Literal(payload).as_bytes(raw) + b"::text); ")
        if text.startswith(head):
            query.query = text[len(head):]
    except Exception:  # cosmetic only
        pass


def _execute_after_message(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict, db: Any, raw: Any, payload: str
) -> Any:
    """The message as its own statement, in the same transaction as the user's."""
    if db.get_autocommit():
        with transaction.atomic(using=db.alias):
            raw.execute(EMIT_ALONE, [payload])
            return execute(sql, params, many, context)
    raw.execute(EMIT_ALONE, [payload])
    return execute(sql, params, many, context)


_client_cursor_types: dict[type, bool] = {}


def _one_string_holds_two(raw: Any) -> bool:
    """Only psycopg 3's client-side-binding cursor runs ``a; b`` with parameters."""
    cls = type(raw)
    known = _client_cursor_types.get(cls)
    if known is None:
        try:
            import psycopg

            known = issubclass(cls, psycopg.ClientCursor)
        except ImportError:
            known = False
        _client_cursor_types[cls] = known
    return known


def _must_skip(db: Any, raw: Any) -> bool:
    """Failed transaction (the statement will fail anyway) or a named, server-side cursor."""
    if db.needs_rollback or getattr(raw, "name", None):
        return True
    return _transaction_status(raw) == _INERROR


def _transaction_status(raw: Any) -> int:
    """libpq's PQtransactionStatus of the cursor's connection (0 idle, 2 in a transaction, 3 failed)."""
    conn = raw.connection
    pgconn = getattr(conn, "pgconn", None)  # psycopg 3; psycopg2 has get_transaction_status()
    return pgconn.transaction_status if pgconn is not None else conn.get_transaction_status()


# Asked once per physical connection, at its first tracked write: may this role
# call pg_logical_emit_message (any role may, unless someone revoked it; a
# failing message would take the user's statement in the same query string down
# with it), and is the server encoding UTF8 (then the JSON keeps non-ASCII
# characters as they are)? The function's text variant is found by name: its
# signature depends on the version (PostgreSQL 17 added ``flush boolean DEFAULT false``).
# Every name qualified (this runs with the application's search_path, public
# included): `oid = regnamespace` would pick a planted public.=(oid, regnamespace).
CONNECTION_FACTS = """
    SELECT current_user, p.oid::pg_catalog.regprocedure::pg_catalog.text,
           pg_catalog.has_function_privilege(p.oid, 'EXECUTE'),
           pg_catalog.current_setting('server_encoding') OPERATOR(pg_catalog.=) 'UTF8'
    FROM pg_catalog.pg_proc p
    WHERE p.proname OPERATOR(pg_catalog.=) 'pg_logical_emit_message'
      AND p.pronamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid
      AND p.proargtypes[2] OPERATOR(pg_catalog.=) 'text'::pg_catalog.regtype::pg_catalog.oid
"""


def _connection_facts(db: Any) -> tuple[bool, bool]:
    """``(may_emit, server_utf8)`` of the current physical connection, cached on the Django wrapper."""
    raw_conn = db.connection
    cached = db.__dict__.get("_bemi_connection_facts")
    if cached is not None and cached[0] is raw_conn:
        return cached[1]
    cursor = raw_conn.cursor()
    try:
        cursor.execute(CONNECTION_FACTS)
        role, function, may_emit, utf8 = cursor.fetchone()
    finally:
        cursor.close()
    if not may_emit:
        _warn_once(
            "no-privilege",
            f"role {role!r} may not execute pg_logical_emit_message; run GRANT EXECUTE ON FUNCTION "
            f"{function} TO {role};",
        )
    facts = (bool(may_emit), bool(utf8))
    db.__dict__["_bemi_connection_facts"] = (raw_conn, facts)
    return facts


# -- the payload -------------------------------------------------------------------


class _Encoder(DjangoJSONEncoder):
    """Django's encoder (datetime, Decimal, UUID, lazy strings...) plus sets as lists."""

    def default(self, o: Any) -> Any:
        if isinstance(o, (set, frozenset)):
            try:
                return sorted(o)
            except TypeError:
                return list(o)
        return super().default(o)


# Reused encoders (an encoder keeps no state between calls).
_ENCODERS = {utf8: _Encoder(ensure_ascii=not utf8, allow_nan=False) for utf8 in (True, False)}


def _dumps(value: Any, utf8: bool) -> str:
    return _ENCODERS[utf8].encode(value)


def _nbytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def build_payload(frame: Frame, sql: str, utf8: bool) -> str | None:
    """The context JSON for one statement: the frame's dict plus ``"SQL"``.

    Equal to ``json.dumps({**context, "SQL": sql})``; the dict part is
    serialised once per frame and the SQL spliced in. ``None``: no context.
    """
    cache = frame.cache
    payload = cache.get((utf8, sql))  # Django repeats its SQL: a loop of create() is one lookup
    if payload is not None:
        return payload
    head = cache.get(utf8)
    if head is None:
        head = _serialise_head(frame, utf8)
        if frame.request is not None and not frame.request.evaluated:
            return None  # a write made by the context function itself: no context, cache nothing
        cache[utf8] = head
    prefix, prefix_bytes, utf8_head = head
    if prefix is None:
        return None
    payload = _splice(prefix, prefix_bytes, sql, utf8_head)
    if len(payload) <= _PAYLOAD_CACHE_MAX_LEN and len(cache) < _PAYLOAD_CACHE_SIZE:
        cache[(utf8, sql)] = payload
    return payload


_PAYLOAD_CACHE_SIZE = 64  # entries per frame
_PAYLOAD_CACHE_MAX_LEN = 16384


def _splice(prefix: str, prefix_bytes: int, sql: str, utf8: bool) -> str:
    sql_json = _sql_json(sql, utf8)
    size = _nbytes(sql_json)
    total = max_context_bytes()
    room = total - prefix_bytes - 1
    limit = max_sql_bytes()
    if size > limit or size > room:
        if room < limit:  # the context itself is large: worth a warning (BEMI_MAX_SQL_BYTES cuts silently)
            _warn_once("sql-truncated", f"the SQL in the context was cut to keep it under {total} bytes "
                       "(BEMI_MAX_CONTEXT_BYTES)")
        sql_json = _truncated_sql_json(sql, min(limit, room), utf8)
    return prefix + sql_json + "}"


def _serialise_head(frame: Frame, utf8: bool) -> tuple[str | None, int, bool]:
    """``'{"user_id": 1, "SQL": '``: the JSON before the SQL value, its size in bytes."""
    try:
        values = frame.resolve()
    except ContextError as exc:
        _warn_once(exc.cause, str(exc))
        return None, 0, utf8
    if values is None:
        return None, 0, utf8
    values.pop("SQL", None)  # ours wins
    try:
        text = _dumps(values, utf8)
    except Exception as exc:
        _warn_once("unserialisable", f"{type(exc).__name__}: {exc}")
        return None, 0, utf8
    prefix = text[:-1] + (', "SQL": ' if values else '"SQL": ')
    try:
        size = _nbytes(prefix)
    except UnicodeEncodeError:  # lone surrogates: only valid as \u escapes
        return _serialise_head(frame, False) if utf8 else (None, 0, utf8)
    total = max_context_bytes()
    if size + len('""}') > total:
        _warn_once("too-large", f"the context is {size} bytes of JSON, over the {total} bytes limit "
                   "(BEMI_MAX_CONTEXT_BYTES)")
        return None, 0, utf8
    return prefix, size, utf8


def _sql_json(sql: str, utf8: bool) -> str:
    text = json.dumps(sql, ensure_ascii=not utf8)
    if utf8 and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(sql)
    return text


def _truncated_sql_json(sql: str, budget: int, utf8: bool) -> str:
    """The longest ``sql[:n] + TRUNCATED`` whose JSON fits in ``budget`` bytes (``""`` if none does)."""
    n = min(len(sql), budget)
    text = _sql_json(sql[:n] + TRUNCATED, utf8)
    excess = _nbytes(text) - budget
    if excess <= 0:
        return text
    guess = max(0, n - excess)  # exact for ASCII; multi-byte characters and escapes need a search
    text = _sql_json(sql[:guess] + TRUNCATED, utf8)
    if _nbytes(text) <= budget:
        best, lo, hi = text, guess + 1, n - 1
    else:
        best, lo, hi = '""', 0, guess - 1
    while lo <= hi:  # bisect: the largest n that fits
        mid = (lo + hi) // 2
        text = _sql_json(sql[:mid] + TRUNCATED, utf8)
        if _nbytes(text) <= budget:
            best, lo = text, mid + 1
        else:
            hi = mid - 1
    return best
