"""bemi-django: context-aware audit trail for Django and PostgreSQL.

The public names are imported lazily so that ``import bemi`` (for example
from ``settings.py``) never touches Django's app registry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "BemiMiddleware": "bemi.middleware",
    "get_bemi_context": "bemi.appcontext",
    "context": "bemi.appcontext",
    "set_context": "bemi.appcontext",
    "get_context": "bemi.appcontext",
    "BemiRecordMixin": "bemi.mixins",
    "BemiDatabaseRouter": "bemi.routers",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from bemi.appcontext import context, get_bemi_context, get_context, set_context
    from bemi.middleware import BemiMiddleware
    from bemi.mixins import BemiRecordMixin
    from bemi.routers import BemiDatabaseRouter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bemi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
