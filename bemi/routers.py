"""Send the audit trail to a separate destination database.

With ``DATABASE_ROUTERS = ['bemi.BemiDatabaseRouter']`` and a ``'bemi'``
alias in ``DATABASES``, reads and writes of the ``bemi`` app's models
(``BemiChange``) go to that alias, where the worker writes ``changes``.

Unlike the published router, ``allow_migrate`` does not hide the ``bemi``
migration: it installs the trigger functions on every *source* database and
is skipped only on the destination alias, where there is nothing to track.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model

APP_LABEL = "bemi"
DESTINATION_ALIAS = "bemi"


class BemiDatabaseRouter:
    def _is_bemi(self, model: type[Model] | Model) -> bool:
        return model._meta.app_label == APP_LABEL

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        return DESTINATION_ALIAS if self._is_bemi(model) else None

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        return DESTINATION_ALIAS if self._is_bemi(model) else None

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        if self._is_bemi(obj1) or self._is_bemi(obj2):
            return self._is_bemi(obj1) and self._is_bemi(obj2)
        return None

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None, **hints: Any) -> bool | None:
        if app_label == APP_LABEL:
            return db != DESTINATION_ALIAS
        return None
