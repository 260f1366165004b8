"""The application context of the current thread or asyncio task.

(Not named ``context.py``: a submodule ``bemi.context`` would shadow the
public ``bemi.context()`` as soon as it is imported.)

One ``ContextVar`` holds an immutable :class:`Frame`. Setting a context
pushes a new frame instead of changing the current one, so a thread, an
asyncio task or a request can never see (or clobber) another one's values,
and leaving a ``with bemi.context(...)`` block restores exactly the frame
that was there before.

Inside a request the middleware pushes a frame bound *lazily* to the
request: ``BEMI_CONTEXT_FUNCTION`` runs at the request's first tracked
write (not when the request starts), so a user authenticated late, e.g. by
Django REST Framework inside the view, is seen. The result is cached for
the rest of the request.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any, Callable, TypeVar

from bemi import conf

__all__ = [
    "context",
    "get_bemi_context",
    "get_context",
    "set_context",
    "ContextError",
    "Frame",
    "RequestBinding",
    "bind_request",
    "current_frame",
    "reset_context",
]

F = TypeVar("F", bound=Callable[..., Any])


class ContextError(Exception):
    """The context cannot be attached; ``cause`` names the kind of failure (logged once per cause)."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


def get_bemi_context(request: Any) -> Any:
    """Call the function named by ``BEMI_CONTEXT_FUNCTION`` with ``request``.

    Raises ``ImproperlyConfigured`` if the setting is unset, cannot be
    imported or is not callable.
    """
    return conf.context_function()(request)


class RequestBinding:
    """A request's context: ``get_bemi_context(request)`` evaluated once, on first use."""

    __slots__ = ("request", "_done", "_value", "_error", "_lock", "_owner")

    def __init__(self, request: Any) -> None:
        self.request = request
        self._done = False
        self._value: Any = None
        self._error: ContextError | None = None
        self._lock = threading.RLock()
        self._owner: int | None = None

    @property
    def evaluated(self) -> bool:
        return self._done

    def resolve(self) -> Any:
        """The context function's result (cached). ``None`` while it is being evaluated.

        A write made *by* the context function itself (re-entrant call in the
        same thread) gets no context instead of recursing.
        """
        if self._done:
            if self._error is not None:
                raise self._error
            return self._value
        with self._lock:
            if self._done:
                return self.resolve()
            if self._owner == threading.get_ident():
                return None
            self._owner = threading.get_ident()
            try:
                self._value = get_bemi_context(self.request)
            except Exception as exc:  # the app must never break because of tracking
                self._error = ContextError(
                    "context-function", f"BEMI_CONTEXT_FUNCTION raised {type(exc).__name__}: {exc}"
                )
            finally:
                self._owner = None
                self._done = True
        return self.resolve()

    def peek(self) -> Any:
        """The context without caching it (so ``get_context()`` never freezes it early)."""
        if self._done:
            return self.resolve()
        if self._owner == threading.get_ident():
            return None
        return get_bemi_context(self.request)


class Frame:
    """One immutable layer of context: explicit ``values`` over an optional request binding.

    ``cache`` belongs to the execute wrapper, which keeps the serialised JSON
    of this frame there so that repeated writes do not serialise again.
    """

    __slots__ = ("values", "request", "cache")

    def __init__(self, values: Any, request: RequestBinding | None = None) -> None:
        self.values = values
        self.request = request
        self.cache: dict[Any, Any] = {}

    def resolve(self, peek: bool = False) -> dict[str, Any] | None:
        """The dict to send (request context, then explicit values over it).

        ``None`` means no context. Raises ``ContextError`` for a non-dict.
        """
        base: Any = None
        if self.request is not None:
            base = self.request.peek() if peek else self.request.resolve()
            if base is None and not self.values:
                return None
            if base is not None and not isinstance(base, Mapping):
                raise ContextError(
                    "not-a-dict", f"BEMI_CONTEXT_FUNCTION returned {type(base).__name__}, not a dict"
                )
        values = self.values
        if values is None:
            return None
        if not isinstance(values, Mapping):
            raise ContextError("not-a-dict", f"the context is a {type(values).__name__}, not a dict")
        if base:
            return {**base, **values}
        return dict(values)


_current: ContextVar[Frame | None] = ContextVar("bemi_context", default=None)


def current_frame() -> Frame | None:
    """The frame of this thread or task (``None``: no context)."""
    return _current.get()


def get_context() -> dict[str, Any]:
    """A copy of the context that writes would carry now (``{}`` when none).

    Inside a request whose context function has not run yet, it is called
    but its result is not cached, so a user authenticated later is still seen.
    """
    frame = _current.get()
    if frame is None:
        return {}
    try:
        resolved = frame.resolve(peek=True)
    except ContextError:
        return {}
    return dict(resolved) if resolved else {}


def set_context(values: Mapping[str, Any] | None) -> Token:
    """Replace the context of the current thread or task; ``None`` clears it.

    The dict is copied. Returns a token for :func:`reset_context`. Prefer
    ``with bemi.context(...)``, which restores the previous context on exit.
    Inside a request this replaces the request's context too; use
    ``bemi.context()`` to add keys on top of it.
    """
    if values is None:
        return _current.set(None)
    return _current.set(Frame(dict(values) if isinstance(values, Mapping) else values))


def reset_context(token: Token) -> None:
    """Restore the context that was current before the ``set_context`` call that returned ``token``."""
    _current.reset(token)


def bind_request(request: Any) -> Token:
    """Start a request's context (used by the middleware); evaluated at the first tracked write."""
    if conf.context_function_path() is None:
        return _current.set(None)
    return _current.set(Frame({}, RequestBinding(request)))


def _push(values: Mapping[str, Any]) -> Token:
    parent = _current.get()
    if parent is None:
        return _current.set(Frame(dict(values)))
    merged = {**parent.values, **values} if isinstance(parent.values, Mapping) else dict(values)
    return _current.set(Frame(merged, parent.request))


class context:
    """Add keys to the context for a block or a function; nesting merges and restores.

    Usable as ``with bemi.context(job="import"):``, ``async with ...`` and as a
    decorator of sync and async functions. Keys that are not identifiers can
    be given as a dict: ``bemi.context({"user-id": 1}, job="import")``.
    """

    def __init__(self, values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        self.values = {**(values or {}), **kwargs}
        self._tokens: list[Token] = []

    def __enter__(self) -> dict[str, Any]:
        self._tokens.append(_push(self.values))
        return self.values

    def __exit__(self, *exc_info: Any) -> None:
        _current.reset(self._tokens.pop())

    async def __aenter__(self) -> dict[str, Any]:
        return self.__enter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        self.__exit__(*exc_info)

    def __call__(self, func: F) -> F:
        values = self.values
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with context(values):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with context(values):  # a fresh instance per call: safe across threads
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
