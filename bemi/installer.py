"""Install and uninstall the database side of bemi (the SQL in ``bemi/sql``).

Used by the ``bemi`` migration. Only PostgreSQL connections are touched; the
server's NOTICEs (e.g. "no privilege to create event triggers") are shown to
the person running ``migrate`` and logged, since they say what to run next.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from bemi import sql

logger = logging.getLogger("bemi")


def run_sql_file(connection: Any, name: str) -> list[str]:
    """Run one of our SQL files on a Django connection; return bemi's NOTICEs."""
    if connection.vendor != "postgresql":
        return []
    notices: list[str] = []
    raw = connection.connection
    handler = None
    if hasattr(raw, "add_notice_handler"):  # psycopg 3

        def handler(diagnostic: Any) -> None:
            if (diagnostic.message_primary or "").startswith("bemi:"):
                notices.append(diagnostic.message_primary)

        raw.add_notice_handler(handler)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql.read(name))
    finally:
        if handler is not None:
            raw.remove_notice_handler(handler)
    for notice in notices:
        logger.warning(notice)
        sys.stdout.write(f"  {notice}\n")
    return notices


def install(apps: Any, schema_editor: Any) -> None:
    run_sql_file(schema_editor.connection, "install.sql")


def uninstall(apps: Any, schema_editor: Any) -> None:
    run_sql_file(schema_editor.connection, "uninstall.sql")
