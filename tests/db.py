"""libpq DSNs of the test databases (the private cluster of this run, see tests/settings.py)."""

from __future__ import annotations

from django.db import connections


def db_dsn(dbname: str | None = None, alias: str = "default") -> str:
    """A DSN for the database behind a Django alias, or for another database of its server."""
    s = connections[alias].settings_dict
    return f"host={s['HOST']} port={s['PORT']} dbname={dbname or s['NAME']} user={s['USER']}"
