"""The hash chain over stored changes: canonical bytes of a change and its link (pure, Django-free).

Every change the worker stores carries ``chain_link = sha256(previous link +
canonical bytes of the change)``, in commit order (``commit_position``,
``change_index``) per source ``database``. ``bemi_verify`` recomputes the links
from the stored rows; any change altered, removed or inserted afterwards makes
the recomputed chain differ from the stored links (docs/security.md).

The canonical bytes must come out the same from the worker's JSON text and from
what the destination gives back, and ``jsonb`` normalises key order,
whitespace, escapes, duplicate keys and numbers. So both sides hash a canonical
form of the *parsed* values: keys sorted, compact, strings as parsed, and
numbers as ``numeric`` keeps them (``1e2`` is ``100``, ``1.50`` stays
``1.50``, ``-0`` is ``0``), never through a float. The worker (bemi/worker/sink.py)
and any other writer (the NATS reader) call :class:`Chain`; the verifier
(bemi/verify.py) calls :func:`canonical_json` and :func:`change_bytes`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from decimal import Decimal
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from json.scanner import c_make_scanner  # type: ignore[attr-defined]
from typing import Any

__all__ = [
    "GENESIS", "LINK_BYTES", "Chain", "canonical_json", "change_bytes", "link", "epoch_micros", "parse_head",
]

#: The link before the first change of a chain.
GENESIS = bytes(32)
LINK_BYTES = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = _EPOCH - datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
# Python refuses to turn an int of more than 4,300 digits into text (sys.int_max_str_digits).
_INT_DIGITS = 4000
# Numbers that are not plain ints are kept as text behind a NUL: jsonb strings cannot hold
# NUL (and the worker replaces it), so such a marker never equals a string value.
_NUMBER = "\x00"


def _number(text: str) -> Any:
    """A JSON number as ``numeric`` keeps it: an int when it has no fractional digits, else its text."""
    value = Decimal(text)
    if value.is_zero():
        value = abs(value)  # numeric has no negative zero
    if value.as_tuple().exponent >= 0:  # type: ignore[operator]
        if value.adjusted() > _INT_DIGITS:
            raise ValueError("number too long for the fast path")
        return int(value)
    return _NUMBER + format(value, "f")


def _any_number(text: str) -> str:
    value = Decimal(text)
    if value.is_zero():
        value = abs(value)
    return _NUMBER + format(value, "f")


_decoder = json.JSONDecoder(parse_float=_number)
_loads_long = json.JSONDecoder(parse_float=_any_number, parse_int=_any_number).decode
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, check_circular=False).encode
# The C scanner and encoder called directly: the json module's Python wrappers (and the encoder it
# makes again on every call) cost as much as the parsing itself, on every stored change.
if c_make_scanner is not None and c_make_encoder is not None:
    _scan = c_make_scanner(_decoder)
    _encode = c_make_encoder(None, None, encode_basestring, None, ":", ",", True, False, True)

    def _canonical(text: str) -> str:
        try:
            value, end = _scan(text, 0)
        except StopIteration:  # leading whitespace, or not JSON: the full parser decides
            return _dumps(_decoder.decode(text))
        if end != len(text):
            return _dumps(_decoder.decode(text))
        return "".join(_encode(value, 0))
else:  # pragma: no cover (a Python without the json C accelerator)
    def _canonical(text: str) -> str:
        return _dumps(_decoder.decode(text))


def canonical_json(text: str) -> str:
    """JSON text -> its canonical form (the same for the worker's text and for ``jsonb``'s output).

    Ints of more than 4,000 digits take a slower form (every number as text), chosen
    the same way on both sides since it depends only on the values. A value nested
    too deeply for Python's parser (about a thousand levels) is chained by its
    size only: said in docs/security.md.
    """
    if text == "{}":
        return text
    try:
        return _canonical(text)
    except ValueError:
        try:
            return _dumps(_loads_long(text))
        except RecursionError:
            return f'"{_NUMBER}deep"'
    except RecursionError:
        return f'"{_NUMBER}deep"'


_sha256 = hashlib.sha256
_OPERATIONS = {op: encode_basestring(op) for op in ("CREATE", "UPDATE", "DELETE", "TRUNCATE")}


def epoch_micros(moment: datetime) -> int:
    """Microseconds since 1970-01-01 UTC (what ``EXTRACT(EPOCH FROM t) * 1000000`` gives back)."""
    return (moment - _EPOCH) // _MICROSECOND


def _text(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


def change_bytes(database: str, schema: str, table: str, primary_key: str | None, operation: str,
                 before: str, after: str, context: str, committed_at: int, queued_at: int,
                 transaction_id: int, position: int, commit_position: int, change_index: int) -> bytes:
    """The canonical bytes of one change: a JSON array of what the worker stores.

    ``before``, ``after``, ``context``: canonical JSON (:func:`canonical_json`);
    ``committed_at``, ``queued_at``: :func:`epoch_micros`. Not covered: ``id`` and
    ``created_at``, which the destination assigns.
    """
    return ("[" + _text(database) + "," + _text(schema) + "," + _text(table) + "," + _text(primary_key) + ","
            + _text(operation) + "," + before + "," + after + "," + context + "," + str(committed_at) + ","
            + str(queued_at) + "," + str(transaction_id) + "," + str(position) + "," + str(commit_position)
            + "," + str(change_index) + "]").encode("utf-8", "surrogatepass")


def link(previous: bytes, data: bytes) -> bytes:
    return hashlib.sha256(previous + data).digest()


def parse_head(text: str) -> bytes:
    """A head as published (64 hex digits, optionally ``\\x``-prefixed) -> its 32 bytes; ValueError otherwise."""
    value = text.strip().lower()
    if value.startswith("\\x"):
        value = value[2:]
    data = bytes.fromhex(value)
    if len(data) != LINK_BYTES:
        raise ValueError(f"a chain head is {LINK_BYTES * 2} hex digits, got {len(value)}")
    return data


class Chain:
    """The running chain of one writer: ``append`` gives each change its link, in commit order.

    ``mark()``/``reset(mark)`` undo appends whose rows were rolled back (a savepoint, a
    failed destination transaction), so the chain only ever holds stored changes.
    """

    __slots__ = ("head", "database", "_db", "_texts", "_json_in", "_json_out", "_at", "_queued", "_middle")

    def __init__(self, head: bytes, database: str) -> None:
        self.head = head
        self.database = database
        self._db = encode_basestring(database)
        self._texts: dict[tuple[str, str], str] = {}
        self._json_in: str | None = None  # the last context seen (shared by many rows)
        self._json_out = ""
        self._at: datetime | None = None
        self._queued = -1
        self._middle = ""  # ",context,committed_at,queued_at," of the last change

    def append(self, schema: str, table: str, primary_key: str | None, operation: str, before: str, after: str,
               context: str, committed_at: datetime, queued_at: int, transaction_id: int, position: int,
               commit_position: int, change_index: int, canonical: bool = False) -> bytes:
        """The link of the next change (``queued_at`` in epoch microseconds); advances the head.

        ``canonical``: ``before`` and ``after`` are known to be in canonical form already (the
        worker writes them so for tables of canonical types): hashed as they are, not parsed again."""
        names = self._texts.get((schema, table))
        if names is None:
            names = self._texts[schema, table] = f"[{self._db},{encode_basestring(schema)},{encode_basestring(table)},"
        if context is not self._json_in or committed_at is not self._at or queued_at != self._queued:
            # Shared by the changes of a transaction (of a batch: queued_at): one text for them. A
            # context equal to the last one (the next transaction of the same request or job) is
            # not parsed again.
            if context != self._json_in:
                self._json_out = canonical_json(context)
            self._json_in = context
            self._at, self._queued = committed_at, queued_at
            self._middle = f",{self._json_out},{(committed_at - _EPOCH) // _MICROSECOND},{queued_at},"
        op = _OPERATIONS.get(operation) or encode_basestring(operation)
        if not canonical:
            before = before if before == "{}" else canonical_json(before)
            after = after if after == "{}" else canonical_json(after)
        data = (f"{names}{'null' if primary_key is None else encode_basestring(primary_key)},{op},{before},{after}"
                f"{self._middle}{transaction_id},{position},{commit_position},{change_index}]"
                ).encode("utf-8", "surrogatepass")
        self.head = new = _sha256(self.head + data).digest()
        return new

    def mark(self) -> bytes:
        return self.head

    def reset(self, mark: bytes) -> None:
        self.head = mark
