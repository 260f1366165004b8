"""A table of the tracked (source) database as its catalog names it.

Revert and table-level time travel write or read a source table by names that
come from the catalog, never from a recorded change, and quote them with
``psycopg.sql.Identifier``.
"""

from __future__ import annotations

from typing import Any, Sequence

from psycopg import sql


class SourceTableError(Exception):
    """The table is missing on this database, or has no single-column primary key."""


class SourceTable:
    """A source table as the catalog names it: quoted name, primary key column, writable columns.

    Every identifier is quoted by ``psycopg.sql.Identifier`` (Django's
    ``quote_name`` does not double an embedded ``"``: a column named
    ``x") = (SELECT 1); DELETE FROM victim; --`` would run the ``DELETE``), and
    the names are the catalog's, not the recorded change's. ``%`` in a name is
    doubled: the composed text goes through Django's cursor with parameters.
    """

    def __init__(self, cursor: Any, connection: Any, schema: str, name: str, caller: str = "revert") -> None:
        self.name = name
        self._raw = connection.connection  # the psycopg connection (for quoting)
        self.qualified = self.ident(schema, name)  # for messages until the catalog answers
        cursor.execute(
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
            "WHERE n.nspname OPERATOR(pg_catalog.=) %s::name AND c.relname OPERATOR(pg_catalog.=) %s::name "
            "AND c.relkind IN ('r', 'p')",
            [schema, name],
        )
        found = cursor.fetchone()
        if found is None:
            raise SourceTableError(
                f"Table {self.qualified} does not exist on this database: pass {caller}(using=<alias of the source database>).")
        oid, schema, name = found
        self.qualified = self.ident(schema, name)
        cursor.execute(
            "SELECT a.attname, a.attgenerated OPERATOR(pg_catalog.<>) '' FROM pg_catalog.pg_attribute a "
            "WHERE a.attrelid OPERATOR(pg_catalog.=) %s::oid AND a.attnum OPERATOR(pg_catalog.>) 0 "
            "AND NOT a.attisdropped ORDER BY a.attnum",
            [oid],
        )
        self.columns = [column for column, generated in cursor.fetchall() if not generated]
        cursor.execute(
            "SELECT a.attname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a "
            "ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) ANY(i.indkey) "
            "WHERE i.indrelid OPERATOR(pg_catalog.=) %s::oid AND i.indisprimary",
            [oid],
        )
        keys = [r[0] for r in cursor.fetchall()]
        if len(keys) != 1:
            raise SourceTableError(f"Table {self.qualified} has no single-column primary key; {caller} works row by row and needs one.")
        self.pk = keys[0]

    def ident(self, *names: str) -> str:
        """``"schema"."name"`` or ``"column"``, quoted by psycopg, ready for a query with parameters."""
        return sql.Identifier(*names).as_string(self._raw).replace("%", "%%")

    def query(self, template: str, columns: Sequence[str] = ()) -> str:
        """``template`` with ``{table}``, ``{where_pk}``, ``{columns}`` and ``{r_columns}`` filled in."""
        return sql.SQL(template).format(
            table=sql.SQL(self.qualified),
            where_pk=self.where_pk(),
            columns=sql.SQL(", ").join(sql.SQL(self.ident(c)) for c in columns),
            r_columns=sql.SQL(", ").join(sql.SQL("r.{}").format(sql.SQL(self.ident(c))) for c in columns),
        ).as_string(self._raw)

    def compose(self, template: str, **names: str) -> str:
        """``template`` with ``{table}`` (this table), ``{pk}`` and each of ``names`` quoted as one identifier."""
        identifiers = {key: sql.SQL(self.ident(value)) for key, value in names.items()}
        return sql.SQL(template).format(
            table=sql.SQL(self.qualified), pk=sql.SQL(self.ident(self.pk)), **identifiers
        ).as_string(self._raw)

    def where_pk(self) -> sql.Composable:
        """``pk = <the text primary key converted to the column's type>`` (keeps the index usable)."""
        return sql.SQL(
            "{pk} = (SELECT r.{pk} FROM pg_catalog.jsonb_populate_record(NULL::{table}, "
            "pg_catalog.jsonb_build_object(%s::text, %s::text)) r)"
        ).format(pk=sql.SQL(self.ident(self.pk)), table=sql.SQL(self.qualified))

    def known(self, values: dict) -> list[str]:
        return [c for c in self.columns if c in values]
