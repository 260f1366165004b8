"""The cursor hook that puts the application context into the WAL.

For each INSERT, UPDATE, DELETE, MERGE or data-modifying ``WITH`` that runs
while a context is set, the cursor sends

    SELECT pg_catalog.pg_logical_emit_message(true, '_bemi', %s::text); <the statement>

in one query string, the context JSON quoted by psycopg's own adapter (as a
client-side cursor quotes its parameters; never formatted in by hand, and
quoted once per distinct message, not per call), then calls ``nextset()`` so that ``rowcount``,
``fetchone()`` and ``RETURNING`` rows are the user's statement's. The message
is transactional: it is in the WAL, just before the row changes, only if
the statement's transaction commits.

Where one query string cannot hold two statements (``executemany``, a cursor
with server-side binding, a pipeline) the message is queued as its own
statement in a psycopg pipeline with the user's: one implicit transaction,
one round trip, no ``BEGIN``/``COMMIT`` of ours.

The hook sits *below* Django: the cursors of each psycopg connection are
made of a subclass of its cursor class (``cursor_factory`` itself is left
as configured), not an entry in ``connection.execute_wrappers``. So the application's execute wrappers and
Django's query log see the user's statement and parameters only, and
``execute_wrappers`` is what it is without bemi.

The user's statement is sent exactly once, and its outcome (result or
exception) is the caller's. Deciding what to send never breaks it: a failure
there sends the statement unchanged and logs one warning per cause.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import TYPE_CHECKING, Any, Callable

import psycopg
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections
from django.db.backends.signals import connection_created

from bemi.conf import max_context_bytes, max_sql_bytes
from bemi.appcontext import ContextError, Frame, current_frame
from bemi.statements import is_tracked_write, may_write

__all__ = ["BemiCursor", "cursor_class", "install_execute_wrapper", "is_hooked", "uninstall_execute_wrapper", "build_payload"]

logger = logging.getLogger("bemi")

# Qualified: the application's session search_path includes public, where
# other roles may have planted a better-matching pg_logical_emit_message.
EMIT_HEAD = "SELECT pg_catalog.pg_logical_emit_message(true, '_bemi', "
EMIT = EMIT_HEAD + "%s::text); "
EMIT_ALONE = EMIT_HEAD + "%s::text)"
TRUNCATED = "... [truncated by bemi]"
_IDLE = psycopg.pq.TransactionStatus.IDLE
_INTRANS = psycopg.pq.TransactionStatus.INTRANS
_INERROR = psycopg.pq.TransactionStatus.INERROR

_warned: set[str] = set()


def _warn_once(cause: str, message: str) -> None:
    if cause not in _warned:
        _warned.add(cause)
        logger.warning("bemi: context not attached (%s): %s. Statements still run; "
                       "this warning is logged once per cause.", cause, message)


# -- installation ----------------------------------------------------------------


def install_execute_wrapper() -> None:
    """Hook every PostgreSQL connection, now and whenever one is opened."""
    connection_created.connect(_on_connection_created, dispatch_uid="bemi.wrapper")
    for conn in connections.all(initialized_only=True):
        _attach(conn)


def uninstall_execute_wrapper() -> None:
    """Unhook the connections of this thread and stop hooking new ones (benchmarks, tests)."""
    connection_created.disconnect(dispatch_uid="bemi.wrapper")
    for conn in connections.all(initialized_only=True):
        raw = getattr(conn, "connection", None)
        if isinstance(raw, psycopg.Connection):
            raw.__dict__.pop("cursor", None)


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    _attach(connection)


def _attach(conn: Any) -> None:
    raw = getattr(conn, "connection", None)
    if conn.vendor == "postgresql" and isinstance(raw, psycopg.Connection) and "cursor" not in raw.__dict__:
        raw.__dict__["cursor"] = _HookedCursorMethod(raw)


def is_hooked(raw: Any) -> bool:
    """Are the cursors of this psycopg connection bemi's?"""
    return isinstance(raw.__dict__.get("cursor"), _HookedCursorMethod)


class _HookedCursorMethod:
    """``connection.cursor()`` of one psycopg connection, making its cursor class bemi's subclass.

    Set on the connection instance (shadowing ``Connection.cursor``), so that
    ``connection.cursor_factory`` stays what Django or the project configured
    (Django's own tests compare it), and named cursors are untouched.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self._raw = weakref.ref(raw)  # no reference cycle: the connection is freed when Django drops it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raw = self._raw()
        assert raw is not None
        if args or kwargs.get("name"):
            return type(raw).cursor(raw, *args, **kwargs)
        factory = raw.cursor_factory
        raw.cursor_factory = cursor_class(factory)  # for psycopg's own cursor(): one thread uses a connection
        try:
            return type(raw).cursor(raw, **kwargs)
        finally:
            raw.cursor_factory = factory


_CLASSES: dict[type, type] = {}


def cursor_class(base: type) -> type:
    """``base`` (Django's ``Cursor``, ``ServerBindingCursor`` or the project's own) with bemi's hook."""
    if issubclass(base, BemiCursor):
        return base
    made = _CLASSES.get(base)
    if made is None:
        made = _CLASSES[base] = _make_class(base)
    return made


def _make_class(base: type) -> type:
    return type(base.__name__, (BemiCursor, base), {
        "__module__": __name__,
        "__doc__": f"{base.__module__}.{base.__qualname__} whose writes carry the application context.",
        "_bemi_base": base,
        "_bemi_one_string": issubclass(base, psycopg.ClientCursor),
    })


# -- the cursor --------------------------------------------------------------------

# The worker labels a change with the latest ``_bemi`` message of its
# transaction. So once a transaction carried a context, a later tracked write
# without one sends ``{}`` ("no context"), or it would inherit the earlier one.
# ``LABELLED`` on the psycopg connection: a context was sent and its
# transaction may still be open. Cleared at the first statement without a
# context that finds no transaction open (the status is read before the
# statement runs, so the first statement of a new transaction always does).
LABELLED = "_bemi_labelled"
FACTS = "_bemi_facts"
NO_CONTEXT = "{}"

if TYPE_CHECKING:
    _CursorBase = psycopg.ClientCursor[Any]
else:
    _CursorBase = object


class BemiCursor(_CursorBase):
    """Mixed in front of the connection's cursor class by :func:`cursor_class`."""

    _bemi_base: type
    _bemi_one_string: bool

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        conn = self._conn
        frame = current_frame()
        if frame is None and LABELLED not in conn.__dict__:
            return super().execute(query, params, **kwargs)
        payload = _message(conn, frame, query)
        if payload is None:
            return super().execute(query, params, **kwargs)
        if not self._bemi_one_string or type(query) is not str or conn._pipeline is not None or kwargs:
            return _apart(conn, payload, lambda: super(BemiCursor, self).execute(query, params, **kwargs))
        try:
            head, head_escaped, head_bytes = _message_head(conn, payload)
        except Exception as exc:  # never break the application: the statement goes unchanged
            _warn_once("internal", f"{type(exc).__name__}: {exc}")
            return super().execute(query, params, **kwargs)
        # The JSON is quoted once per message text (not per call), as psycopg would quote it.
        query = (head if params is None else head_escaped) + query
        try:
            super().execute(query, params)
        finally:  # Django logs the query also when it fails
            query = getattr(self, "_query", None)
            if query is not None and query.query.startswith(head_bytes):
                query.query = query.query[len(head_bytes):]
        self.nextset()  # from the message's SELECT to the user's statement
        return self

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        conn = self._conn
        frame = current_frame()
        if frame is None and LABELLED not in conn.__dict__:
            return super().executemany(query, params_seq, **kwargs)
        payload = _message(conn, frame, query)
        if payload is None:
            return super().executemany(query, params_seq, **kwargs)
        return _apart(conn, payload, lambda: super(BemiCursor, self).executemany(query, params_seq, **kwargs))


_PIPELINE = psycopg.Pipeline.is_supported()


def _apart(conn: Any, payload: str, send: Callable[[], Any]) -> Any:
    """The message as its own statement, then ``send()`` the user's, in one transaction.

    In a psycopg pipeline (the user's, riding it: a Sync of ours would end its
    implicit transaction; or one of ours): one implicit transaction even in
    autocommit, as psycopg runs an ``executemany()`` batch. Without pipeline
    support in libpq (< 14) only an open transaction can hold both.
    """
    if conn._pipeline is not None:
        _emit_alone(conn, payload)
        return send()
    if _PIPELINE:
        with conn.pipeline():
            _emit_alone(conn, payload)
            return send()
    if not conn.autocommit:
        _emit_alone(conn, payload)
        return send()
    _warn_once("no-pipeline", "libpq has no pipeline mode (libpq < 14): executemany() and server-side binding "
                              "in autocommit mode run without context")
    return send()


def _emit_alone(conn: Any, payload: str) -> None:
    psycopg.Cursor(conn).execute(EMIT_ALONE, (payload,))


HEAD = "_bemi_head"


def _message_head(conn: Any, payload: str) -> tuple[str, str, bytes]:
    """``SELECT pg_logical_emit_message(..., '<payload>'::text); ``: as sent, with ``%`` doubled, and as bytes.

    Kept on the connection for the last payload (a loop of writes repeats it).
    """
    kept = conn.__dict__.get(HEAD)
    if kept is not None and (kept[0] is payload or kept[0] == payload):
        return kept[1]
    literal = psycopg.sql.Literal(payload).as_bytes(conn)
    head_bytes = _EMIT_HEAD_BYTES + literal + _EMIT_TAIL_BYTES
    head = head_bytes.decode(conn.info.encoding)
    made = (head, head.replace("%", "%%"), head_bytes)
    conn.__dict__[HEAD] = (payload, made)
    return made


_EMIT_HEAD_BYTES = EMIT_HEAD.encode()
_EMIT_TAIL_BYTES = b"::text); "


def _message(conn: Any, frame: Frame | None, query: Any) -> str | None:
    """The ``_bemi`` message to send before ``query``, or ``None``. Never raises."""
    try:
        status = conn.pgconn.transaction_status
        if frame is None:
            return _no_context(conn, query, status)
        if type(query) is not str or not is_tracked_write(query):
            return None
        payload = None
        if status != _INERROR:  # the statement will fail anyway
            may_emit, utf8 = _connection_facts(conn, status)
            if may_emit:
                payload = build_payload(frame, query, utf8)
    except ContextError as exc:
        _warn_once(exc.cause, str(exc))
        payload = None
    except Exception as exc:  # never break the application
        _warn_once("internal", f"{type(exc).__name__}: {exc}")
        return None
    if payload is None:
        return _no_context(conn, query, status) if LABELLED in conn.__dict__ else None
    conn.__dict__[LABELLED] = True
    return payload


def _no_context(conn: Any, query: Any, status: Any) -> str | None:
    """A statement without context after a transaction carried one: ``{}`` at its first tracked write."""
    try:
        if status != _INTRANS:
            conn.__dict__.pop(LABELLED, None)  # that transaction ended: nothing to undo
            return None
        # Any statement that may run code that writes (SELECT f(), CALL, COPY, SQL given as psycopg.sql
        # objects, which cannot be read here...): when unsure, reset.
        if (type(query) is str and not may_write(query)) or not _connection_facts(conn, status)[0]:
            return None
    except Exception as exc:  # never break the application
        _warn_once("internal", f"{type(exc).__name__}: {exc}")
        return None
    conn.__dict__.pop(LABELLED, None)  # from here on the transaction's latest context is {}
    return NO_CONTEXT


# Asked once per physical connection, at its first tracked write: may this role
# call pg_logical_emit_message (any role may, unless someone revoked it; a
# failing message would take the user's statement in the same query string down
# with it)? The function's text variant is found by name: its signature depends
# on the version (PostgreSQL 17 added ``flush boolean DEFAULT false``). Every
# name qualified (this runs with the application's search_path, public
# included): `oid = regnamespace` would pick a planted public.=(oid, regnamespace).
CONNECTION_FACTS = """
    SELECT current_user, p.oid::pg_catalog.regprocedure::pg_catalog.text,
           pg_catalog.has_function_privilege(p.oid, 'EXECUTE')
    FROM pg_catalog.pg_proc p
    WHERE p.proname OPERATOR(pg_catalog.=) 'pg_logical_emit_message'
      AND p.pronamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid
      AND p.proargtypes[2] OPERATOR(pg_catalog.=) 'text'::pg_catalog.regtype::pg_catalog.oid
"""


def _connection_facts(conn: Any, status: Any) -> tuple[bool, bool]:
    """``(may_emit, server_utf8)`` of this psycopg connection, asked once and kept on it.

    Inside the user's transaction the question runs in a savepoint, so that
    even its failure (a statement timeout, a cancel) leaves the transaction
    as it was; the answer is not kept then, and the statement goes without
    context. Inside the user's psycopg pipeline it is not asked (its answer
    would end the pipeline's implicit transaction): no context until then.
    """
    facts = conn.__dict__.get(FACTS)
    if facts is not None:
        return facts
    if conn._pipeline is not None:  # fetching the answer would Sync the user's pipeline: ask later
        return (False, False)
    # The server reports its encoding at connection start: no query needed.
    utf8 = conn.pgconn.parameter_status(b"server_encoding") == b"UTF8"
    cursor = psycopg.Cursor(conn)
    try:
        if status == _INTRANS or not conn.autocommit:  # in (or about to begin) the user's transaction
            cursor.execute("SAVEPOINT _bemi_facts")
            try:
                cursor.execute(CONNECTION_FACTS)
                row = cursor.fetchone()
            except Exception:
                cursor.execute("ROLLBACK TO SAVEPOINT _bemi_facts")
                raise
            finally:
                cursor.execute("RELEASE SAVEPOINT _bemi_facts")
        else:
            cursor.execute(CONNECTION_FACTS)
            row = cursor.fetchone()
    finally:
        cursor.close()
    if row is None:
        raise RuntimeError("pg_catalog.pg_logical_emit_message(boolean, text, text) not found")
    role, function, may_emit = row
    if not may_emit:
        _warn_once(
            "no-privilege",
            f"role {role!r} may not execute pg_logical_emit_message; run GRANT EXECUTE ON FUNCTION "
            f"{function} TO {role};",
        )
    facts = (bool(may_emit), utf8)
    conn.__dict__[FACTS] = facts
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
