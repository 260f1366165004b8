"""The ``changes`` table, printed as the Bemi documentation's psql command prints it.

psql from the server's bin folder runs the command itself when it is there;
otherwise the same query's text values are laid out the way psql lays them
out (aligned format), so the output looks the same either way.
"""

from __future__ import annotations

import os
import subprocess

import psycopg

COLUMNS = ["primary_key", "table", "operation", "before", "after", "context", "committed_at"]
QUERY = "SELECT " + ", ".join(f'"{c}"' for c in COLUMNS) + ' FROM bemi.changes ORDER BY "committed_at";'
# The same rows as PostgreSQL's text, for the layout done here when psql is missing.
_TEXT_QUERY = "SELECT " + ", ".join(f'"{c}"::text' for c in COLUMNS) + ' FROM bemi.changes ORDER BY "committed_at"'


def command_line(uri: str) -> str:
    return f"psql {uri} -c \\\n  '{QUERY}'"


def changes_table(uri: str, bindir: str) -> str:
    """The output of ``psql URI -c QUERY`` (by psql when available)."""
    psql = os.path.join(bindir, "psql")
    if os.access(psql, os.X_OK):
        done = subprocess.run([psql, "-X", "-P", "pager=off", uri, "-c", QUERY], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout
    return query_as_psql(uri)


def query_as_psql(uri: str) -> str:
    """The rows of ``QUERY`` laid out as psql's aligned output."""
    with psycopg.connect(uri, autocommit=True) as conn:
        rows = conn.execute(_TEXT_QUERY).fetchall()
    return format_aligned(COLUMNS, rows)


def format_aligned(names: list[str], rows: list[tuple[str | None, ...]]) -> str:
    """psql's default layout: centred headers, left-aligned text, ``(N rows)``, a blank line."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    header = " | ".join(_centre(n, w) for n, w in zip(names, widths))
    lines = [f" {header} ", "+".join("-" * (w + 2) for w in widths)]
    for row in cells:
        padded = [v.ljust(w) for v, w in zip(row, widths)]
        padded[-1] = row[-1]
        lines.append(" " + " | ".join(padded))
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines) + "\n\n"


def _centre(text: str, width: int) -> str:
    left = (width - len(text)) // 2
    return " " * left + text + " " * (width - len(text) - left)
