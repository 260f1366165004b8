"""Is this SQL statement a write that should carry the application context?

Every statement Django runs passes through here while a context is set, so
reads must pay almost nothing: a regular expression finds the first keyword
(after whitespace, comments and opening parentheses) and settles most
statements on its own. Only ``WITH`` (a data-modifying CTE?) and text with
more than one statement go to sqlparse. Results are cached per SQL string,
because Django sends the same SQL text over and over.
"""

from __future__ import annotations

import re
from functools import lru_cache

import sqlparse
from sqlparse import tokens as T

__all__ = ["is_tracked_write", "WRITE_KEYWORDS"]

WRITE_KEYWORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})

# Leading whitespace, "-- line" and "/* block */" comments and "(" before the first word.
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/|\()*([A-Za-z]+)", re.S)

# Longer SQL (e.g. a 10,000-row bulk INSERT) is classified without caching:
# the fast path only reads its beginning, and caching would pin big strings.
_CACHE_MAX_LEN = 8192


def is_tracked_write(sql: str) -> bool:
    """True for INSERT, UPDATE, DELETE, MERGE and a ``WITH`` that modifies data."""
    if len(sql) > _CACHE_MAX_LEN:
        return _classify(sql)
    return _classify_cached(sql)


def _classify(sql: str) -> bool:
    match = _FIRST_WORD.match(sql)
    if match is None:
        return False
    word = match.group(1).upper()
    if word in WRITE_KEYWORDS:
        return True
    if word == "WITH":
        return _has_write(sql)
    # A read, DDL, COPY, SET...: only a second statement in the same text can write.
    if ";" in sql.rstrip().rstrip(";"):
        return _has_write(sql)
    return False


_classify_cached = lru_cache(maxsize=4096)(_classify)


def _has_write(sql: str) -> bool:
    """Any DML keyword that writes, outside literals and comments (sqlparse)."""
    for statement in sqlparse.parse(sql):
        previous = ""
        for token in statement.flatten():
            if token.is_whitespace or token.ttype in T.Comment:
                continue
            value = token.normalized.upper() if token.ttype in T.Keyword else ""
            if token.ttype in T.Keyword.DML and value in WRITE_KEYWORDS:
                # "FOR UPDATE" / "FOR NO KEY UPDATE" are row locks of a SELECT.
                if not (value == "UPDATE" and previous in ("FOR", "KEY")):
                    return True
            previous = value
    return False
