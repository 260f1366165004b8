"""The project's ``BEMI_CONTEXT_FUNCTION``: who and where, attached to every change."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest


def get_bemi_context(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    return {
        "user_id": user.id if user is not None and user.is_authenticated else None,
        "method": request.method,
        "path": request.path,
    }
