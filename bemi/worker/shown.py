"""Names and texts from the databases as the worker's log shows them.

Table, schema and column names, primary keys and server messages come from
roles the worker does not trust: a table named ``"x\\n2026-12-02 ... ERROR
..."`` would otherwise write a second, forged line into the log. Text that
is printable and has no backslash is shown as it is; anything else as
Python's ``repr`` (quoted, control and format characters escaped), so one
log call stays one line and an escape shown is never the name's own text.
"""

from __future__ import annotations

__all__ = ["shown", "qualified"]


def shown(text: object) -> str:
    """``text`` safe for one log line: as it is when printable, else ``repr`` (quoted, escapes visible)."""
    value = text if isinstance(text, str) else str(text)
    if value.isprintable() and "\\" not in value:
        return value
    return repr(value)


def qualified(schema: str, name: str) -> str:
    """``schema.table`` with each part ``shown``."""
    return f"{shown(schema)}.{shown(name)}"
