"""Is this SQL statement a write that should carry the application context?

Every statement Django runs passes through here while a context is set, so
reads must pay almost nothing: when the text starts with its first keyword
(Django's SQL always does) that keyword settles most statements on its own.
Everything else (comments first, ``WITH``, ``EXPLAIN``, more than one
statement) goes through a small lexer that reads PostgreSQL's syntax where
it hides code: nested ``/* /* */ */`` comments, ``E'\\''`` strings,
``$tag$`` strings, quoted identifiers. Results are cached per SQL string,
because Django sends the same SQL text over and over.

Two questions, two answers:

* :func:`is_tracked_write`: does the statement itself write (``INSERT``,
  ``UPDATE``, ``DELETE``, ``MERGE``, a data-modifying ``WITH``, an
  ``EXPLAIN`` of one)? Those carry the context.
* :func:`may_write`: could it change a tracked row at all, through a
  function (``SELECT f()``), a procedure, a trigger, ``COPY``, DDL that
  rewrites a table? Everything may, except the few statements that can run
  no code that writes (transaction control, ``SET``, ``SHOW``...). After a
  context ended inside a transaction, such a statement first resets the
  transaction's context to ``{}`` (bemi/wrapper.py): when unsure, reset.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["is_tracked_write", "may_write", "WRITE_KEYWORDS", "NEVER_WRITE_KEYWORDS"]

WRITE_KEYWORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})

#: First keywords of statements that cannot run code that writes a table. ``SET`` and
#: ``RESET`` take constants; transaction control, cursors' FETCH/MOVE/CLOSE read or
#: release; EXPLAIN without ANALYZE only plans (planning runs immutable functions only,
#: and those may not write). Anything else (SELECT, VALUES, CALL, DO, COPY, DDL...) may.
NEVER_WRITE_KEYWORDS = frozenset({
    "SET", "RESET", "SHOW", "BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE",
    "FETCH", "MOVE", "CLOSE", "DEALLOCATE", "DISCARD", "LISTEN", "UNLISTEN",
})

# The first keyword when the text starts with it (after white space only): the fast path.
_LEADING_WORD = re.compile(r"\s*([A-Za-z]+)")

# One token of PostgreSQL's lexical syntax (block comments are opened here, closed by hand: they nest).
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<line>--[^\n]*)
  | (?P<block>/\*)
  | (?P<estring>[Ee]'(?:[^'\\]|\\.|'')*(?:'|\Z))
  | (?P<string>'(?:[^']|'')*(?:'|\Z))
  | (?P<quoted>"(?:[^"]|"")*(?:"|\Z))
  | (?P<dollar>\$(?:[^\W\d$]\w*)?\$)
  | (?P<word>[^\W\d]\w*(?:\$\w*)*)
  | (?P<semicolon>;)
  | (?P<other>.)
""", re.X | re.S)

# Longer SQL (e.g. a 10,000-row bulk INSERT) is classified without caching:
# the fast path only reads its beginning, and caching would pin big strings.
_CACHE_MAX_LEN = 8192


def is_tracked_write(sql: str) -> bool:
    """True for INSERT, UPDATE, DELETE, MERGE, a ``WITH`` that modifies data and an ``EXPLAIN`` of them."""
    if len(sql) > _CACHE_MAX_LEN:
        return _classify(sql)
    return _classify_cached(sql)


def may_write(sql: str) -> bool:
    """False only when no statement of ``sql`` can run code that writes (see ``NEVER_WRITE_KEYWORDS``)."""
    if len(sql) > _CACHE_MAX_LEN:
        return _may_write(sql)
    return _may_write_cached(sql)


def _only_one_statement(sql: str) -> bool:
    return ";" not in sql.rstrip().rstrip(";")


def _classify(sql: str) -> bool:
    match = _LEADING_WORD.match(sql)
    if match is not None:
        word = match.group(1).upper()
        if word in WRITE_KEYWORDS:
            return True
        if word not in ("WITH", "EXPLAIN") and _only_one_statement(sql):
            return False  # a read, DDL, COPY, SET...
    return any(_writes(words) for words in _statements(sql))


def _may_write(sql: str) -> bool:
    match = _LEADING_WORD.match(sql)
    if match is not None:
        word = match.group(1).upper()
        if word not in NEVER_WRITE_KEYWORDS:
            return True
        if _only_one_statement(sql):
            return False
    return any(words[0] not in NEVER_WRITE_KEYWORDS for words in _statements(sql))


_classify_cached = lru_cache(maxsize=4096)(_classify)
_may_write_cached = lru_cache(maxsize=1024)(_may_write)


def _writes(words: list[str]) -> bool:
    """Does one statement (its keywords and names, upper case) write? ``FOR [NO KEY] UPDATE`` locks only."""
    if not words:
        return False
    if words[0] in WRITE_KEYWORDS:
        return True
    if words[0] not in ("WITH", "EXPLAIN"):
        return False
    previous = ""
    for word in words[1:]:
        if word in WRITE_KEYWORDS and not (word == "UPDATE" and previous in ("FOR", "KEY")):
            return True
        previous = word
    return False


def _statements(sql: str) -> list[list[str]]:
    """The words (keywords and unquoted names, upper case) of each statement, outside comments and literals.

    ``[""]`` stands for a statement that starts with something else than a word
    (``(`` aside, which is skipped): ``may_write`` counts it as one that may write.
    Unterminated comments and literals run to the end of the text, as in PostgreSQL.
    """
    statements: list[list[str]] = []
    words: list[str] = []
    started = False  # anything but white space, comments and "(" seen in this statement
    pos, n = 0, len(sql)
    while pos < n:
        match = _TOKEN.match(sql, pos)
        assert match is not None  # "other" matches any character
        kind = match.lastgroup
        end = match.end()
        if kind == "block":
            depth = 1
            while depth and end < n:
                opening, closing = sql.find("/*", end), sql.find("*/", end)
                if closing < 0:
                    end = n
                    break
                if 0 <= opening < closing:
                    depth, end = depth + 1, opening + 2
                else:
                    depth, end = depth - 1, closing + 2
        elif kind == "dollar":
            closing = sql.find(match.group(), end)
            end = n if closing < 0 else closing + len(match.group())
            if not started:
                words.append("")
            started = True
        elif kind == "word":
            words.append(match.group().upper())
            started = True
        elif kind == "semicolon":
            if words:
                statements.append(words)
            words, started = [], False
        elif kind in ("estring", "string", "quoted", "other"):
            if kind == "other" and match.group() == "(" and not started:
                pass
            elif not started:
                words.append("")
                started = True
        pos = end
    if words:
        statements.append(words)
    return statements
