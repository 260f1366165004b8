"""``bemi.BemiMiddleware``: bind each request's context, and always clear it afterwards.

The middleware does not call ``BEMI_CONTEXT_FUNCTION`` itself: it binds the
request, and the execute wrapper calls the function at the request's first
tracked write (then caches it), so authentication done inside the view
(Django REST Framework) is seen. Works in sync (WSGI) and async (ASGI)
middleware stacks without a thread switch.
"""

from __future__ import annotations

from typing import Any, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from bemi.appcontext import bind_request, reset_context

__all__ = ["BemiMiddleware"]


class BemiMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self._acall(request)
        token = bind_request(request)
        try:
            return self.get_response(request)
        finally:
            reset_context(token)

    async def _acall(self, request: Any) -> Any:
        token = bind_request(request)
        try:
            return await self.get_response(request)
        finally:
            reset_context(token)
