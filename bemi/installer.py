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


# Installed by a superuser (psql -f install.sql, for the event triggers) and now
# migrated by a role that is not one: keep the superuser's functions (the
# install would refuse to run over functions another role owns).
INSTALLED_BY_SUPERUSER = """
    SELECT r.rolname FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) p.proowner
    WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure('public._bemi_create_table_trigger_func()')
      AND r.rolsuper AND r.rolname OPERATOR(pg_catalog.<>) current_user
      AND NOT (SELECT u.rolsuper FROM pg_catalog.pg_roles u WHERE u.rolname OPERATOR(pg_catalog.=) current_user)
"""


def install(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(INSTALLED_BY_SUPERUSER)
            found = cursor.fetchone()
        if found is not None:
            notice = (f"bemi: already installed by superuser {found[0]}; its functions are kept "
                      "(to reinstall, run bemi/sql/install.sql as a superuser)")
            logger.warning(notice)
            sys.stdout.write(f"  {notice}\n")
            return
    run_sql_file(connection, "install.sql")


def uninstall(apps: Any, schema_editor: Any) -> None:
    run_sql_file(schema_editor.connection, "uninstall.sql")


def install_over_published(apps: Any, schema_editor: Any) -> None:
    """Migration 0003: drop what the published bemi-django left in the way, then install ours."""
    run_sql_file(schema_editor.connection, "upgrade_0_1_3.sql")
    install(apps, schema_editor)
