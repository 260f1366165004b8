"""Format v1 of a change on the stream: subject, message id and JSON document (pure, no I/O).

The stream is an interface for other consumers too (docs/scale-out.md): one
message per stored change, a JSON object with ``"v": 1`` and the fields of a
row of ``changes`` (``before``, ``after`` and ``context`` as JSON objects, the
times as ISO 8601 with offset, ``chain_link`` as hex or null), plus ``source``,
the identity of the source database. Its subject is
``<prefix>.<database>.<schema>.<table>``, each name a token in which every
character other than ``A-Z a-z 0-9 _ -`` is written ``%XX`` (its UTF-8 bytes),
so a name with a dot or a ``*`` stays one token. The message id
``<source>:<commit_position>:<change_index>`` lets JetStream drop a change
published twice (a reader restarted within the stream's duplicate window).

The document is built by concatenation from the stitcher's JSON texts (they are
already JSON); numbers in them are kept as written, which the chain needs
(bemi/chain.py). Readers of the document must accept fields they do not know.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from json.scanner import c_make_scanner  # type: ignore[attr-defined]
from typing import Any

from bemi.worker.sink import copy_text
from bemi.worker.stitch import ChangeRow

__all__ = ["VERSION", "FIELDS", "subject_token", "subject", "message_id", "encode", "read_copy_line"]

VERSION = 1
#: The fields of a v1 document, in the order encode() writes them.
FIELDS = ("v", "source", "database", "schema", "table", "primary_key", "operation", "before", "after", "context",
          "committed_at", "queued_at", "transaction_id", "position", "commit_position", "change_index",
          "chain_link")

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@lru_cache(maxsize=4096)
def subject_token(name: str) -> str:
    """One subject token for a name (never empty, never with ``.``, ``*``, ``>`` or spaces)."""
    if name and all(c in _SAFE for c in name):
        return name
    token = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
                    for c in name)
    return token or "%"


def subject(prefix: str, database: str, schema: str, table: str) -> str:
    return f"{prefix}.{subject_token(database)}.{subject_token(schema)}.{subject_token(table)}"


def message_id(source: str, commit_position: int, change_index: int) -> str:
    return f"{source}:{commit_position}:{change_index}"


def encode(row: ChangeRow, head: str, queued_at: str, link: bytes | None) -> bytes:
    """The v1 document of one change. ``head``: the ``"v"``, ``"source"`` and ``"database"`` members,
    the same for every change of a reader (:func:`document_head`); ``queued_at``: ISO 8601."""
    pk = "null" if row.primary_key is None else _dumps(row.primary_key)
    chain = "null" if link is None else f'"{link.hex()}"'
    return (f'{head},"schema":{_dumps(row.schema)},"table":{_dumps(row.table)},"primary_key":{pk},'
            f'"operation":"{row.operation}","before":{row.before},"after":{row.after},"context":{row.context},'
            f'"committed_at":"{row.committed_at.isoformat()}","queued_at":"{queued_at}",'
            f'"transaction_id":{row.transaction_id},"position":{row.position},'
            f'"commit_position":{row.commit_position},"change_index":{row.change_index},"chain_link":{chain}}}'
            ).encode("utf-8", "surrogatepass")


def encode_too_large(row: ChangeRow, head: str, queued_at: str, size: int, limit: int) -> bytes:
    """In place of a change too large to publish: its identity and ``"error"`` (the ingesters keep it
    as a dead letter; the change itself is in the source database's WAL no longer, so say what it was)."""
    error = (f"the change ({size} bytes) is larger than the NATS server's max_payload ({limit} bytes); "
             "raise max_payload (docs/scale-out.md)")
    pk = "null" if row.primary_key is None else _dumps(row.primary_key)
    return (f'{head},"schema":{_dumps(row.schema)},"table":{_dumps(row.table)},"primary_key":{pk},'
            f'"operation":"{row.operation}","before":{{}},"after":{{}},"context":{{}},'
            f'"committed_at":"{row.committed_at.isoformat()}","queued_at":"{queued_at}",'
            f'"transaction_id":{row.transaction_id},"position":{row.position},'
            f'"commit_position":{row.commit_position},"change_index":{row.change_index},"chain_link":null,'
            f'"error":{_dumps(error)}}}').encode("utf-8", "surrogatepass")


def document_head(source: str, database: str) -> str:
    return f'{{"v":{VERSION},"source":{_dumps(source)},"database":{_dumps(database)}'


def iso(moment: datetime) -> str:
    return moment.isoformat()


# -- reading (the ingesters' fast path) -------------------------------------------------------

try:  # optional (the nats extra): reads and writes JSON about twice as fast as the json module
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the installation
    _orjson = None  # type: ignore[assignment]
_FLAT = frozenset((str, int, bool, type(None)))
_decoder = json.JSONDecoder()
_scan = c_make_scanner(_decoder) if c_make_scanner is not None else _decoder.scan_once  # type: ignore[attr-defined]
_WHITESPACE = " \t\n\r"
_OBJECTS = frozenset(("before", "after", "context"))
_OPERATIONS = frozenset(("CREATE", "UPDATE", "DELETE", "TRUNCATE"))
_ISO = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d{1,6})?([+-]\d\d(:?\d\d)?|Z)\Z")
_HEX_DIGITS = "0123456789abcdef"
_INT8 = 2 ** 63
_INT4 = 2 ** 31
#: What a number with a fraction or exponent (or NaN) parses to on the fast path: not JSON-encodable,
#: so such an object is taken as written instead (1.50 must stay 1.50).
_AS_WRITTEN = object()
_decoder_fast = json.JSONDecoder(parse_float=lambda _text: _AS_WRITTEN, parse_constant=lambda _text: _AS_WRITTEN)
# The C scanner and encoder called directly, as bemi/chain.py does (the wrappers cost as much as the work).
if c_make_scanner is not None and c_make_encoder is not None:
    _scan_fast = c_make_scanner(_decoder_fast)
    _c_encode = c_make_encoder(None, None, encode_basestring, None, ":", ",", False, False, True)

    def _decode(text: str) -> Any:
        value, end = _scan_fast(text, 0)  # StopIteration: not JSON
        if end != len(text) and text[end:].strip(_WHITESPACE):
            raise ValueError("extra data")
        return value

    def _encode(value: Any) -> str:
        return "".join(_c_encode(value, 0))  # TypeError on _AS_WRITTEN
else:  # pragma: no cover (a Python without the json C accelerator)
    _decode = _decoder_fast.decode  # type: ignore[assignment]
    _encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode  # type: ignore[assignment]


def _members(text: str) -> dict[str, Any] | None:
    """The top-level members of a JSON object, with the texts of before/after/context as written
    (a JSON parser would turn 1.50 into 1.5); None when ``text`` is not one JSON object."""
    n = len(text)
    i = 0
    while i < n and text[i] in _WHITESPACE:
        i += 1
    if i >= n or text[i] != "{":
        return None
    i += 1
    out: dict[str, Any] = {}
    try:
        while True:
            while i < n and text[i] in _WHITESPACE:
                i += 1
            if i < n and text[i] == "}" and not out:
                i += 1
                break
            if i >= n or text[i] != '"':
                return None
            key, i = _scan(text, i)
            while i < n and text[i] in _WHITESPACE:
                i += 1
            if i >= n or text[i] != ":":
                return None
            i += 1
            while i < n and text[i] in _WHITESPACE:
                i += 1
            start = i
            value, i = _scan(text, i)
            if key in out:
                return None  # a duplicate member: ambiguous, the careful path decides
            out[key] = (value, text[start:i]) if key in _OBJECTS else value
            while i < n and text[i] in _WHITESPACE:
                i += 1
            if i < n and text[i] == ",":
                i += 1
                continue
            if i < n and text[i] == "}":
                i += 1
                break
            return None
    except (StopIteration, ValueError, RecursionError):
        return None
    while i < n and text[i] in _WHITESPACE:
        i += 1
    return out if i == n else None


_seen: dict[str, str | None] = {}  # texts checked before: names and times repeat from change to change


def _text(value: Any) -> str | None:
    """A varchar(255) column's value in COPY text, or None when it is not a string that fits."""
    if type(value) is not str:
        return None
    known = _seen.get(value, False)
    if known is not False:
        return known  # type: ignore[return-value]
    if len(_seen) > 20_000:
        _seen.clear()
    out = _seen[value] = None if len(value) > 255 or "\x00" in value else copy_text(value)
    return out


def _moment(value: Any) -> bool:
    """An ISO 8601 time with its offset (what PostgreSQL would also take as ``now`` or ``yesterday``: not)."""
    if type(value) is not str:
        return False
    known = _seen.get("\x00t" + value)
    if known is None:
        if len(_seen) > 20_000:
            _seen.clear()
        known = _seen["\x00t" + value] = "1" if _ISO.match(value) else ""
    return bool(known)


def _copy_json(value: Any) -> str:
    """A JSON object's text (integers and strings only) in COPY text: the encoder escapes every control
    character, so only backslashes need doubling (``str.translate`` costs 30 times as much). TypeError
    on a number with a fraction (:data:`_AS_WRITTEN`)."""
    if not value:
        return "{}"
    return _encode(value).replace("\\", "\\\\")


def _orjson_copy(value: dict) -> str | None:
    """orjson's text of a flat object (strings, integers, booleans, nulls) in COPY text; None for anything
    else: orjson reads a number with a fraction (or an integer past 64 bits) as a float, which would
    not be written back as it was, and nested values are not looked into here."""
    if not value:
        return "{}"
    for v in value.values():
        if type(v) not in _FLAT:
            return None
    return _orjson.dumps(value).decode().replace("\\", "\\\\")


def read_copy_line(data: bytes) -> tuple[str, str, str, str] | None:
    """A v1 document -> (its line of COPY text in the order of sink.COPY_CHANGES, table, operation,
    committed_at); None when it is not a valid v1 change (the ingester's careful path says why)."""
    if _orjson is not None:  # the common case (flat rows), twice as fast; the json module otherwise
        try:
            m = _orjson.loads(data)
        except _orjson.JSONDecodeError:
            m = None  # (the json module decides: it reads what orjson refuses, as lone surrogates)
        if type(m) is dict:
            context, before, after = m.get("context"), m.get("before"), m.get("after")
            if type(context) is dict and type(before) is dict and type(after) is dict:
                fast = (_orjson_copy(context), _orjson_copy(before), _orjson_copy(after))
                if fast[0] is not None and fast[1] is not None and fast[2] is not None:
                    return _copy_line(m, fast)
    try:
        text = data.decode("utf-8")
        m = _decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError, StopIteration):
        return None
    if type(m) is not dict:
        return None
    context, before, after = m.get("context"), m.get("before"), m.get("after")
    if type(context) is not dict or type(before) is not dict or type(after) is not dict:
        return None
    try:  # integers and strings only: the same value as written, in a few microseconds
        texts = (_copy_json(context), _copy_json(before), _copy_json(after))
    except TypeError:  # a number with a fraction: its text as written (slower)
        members = _members(text)
        if members is None:
            return None
        texts = (copy_text(members["context"][1]), copy_text(members["before"][1]),
                 copy_text(members["after"][1]))
    return _copy_line(m, texts)


def _copy_line(m: dict[str, Any], texts: tuple[str | None, ...]) -> tuple[str, str, str, str] | None:
    """The checks of every other field of a v1 document, and its line of COPY text (``texts``: its
    context, before and after in COPY text)."""
    get = m.get
    version = get("v")
    if version != VERSION or type(version) is not int or "error" in m:
        return None
    database, schema, table = _text(get("database")), _text(get("schema")), _text(get("table"))
    pk = get("primary_key", False)
    if pk is None:
        pk = "\\N"
    elif type(pk) is not str or len(pk) > 255 or "\x00" in pk:
        return None
    else:
        pk = copy_text(pk)
    operation = get("operation")
    committed_at, queued_at = get("committed_at"), get("queued_at")
    xid, position = get("transaction_id"), get("position")
    commit_position, change_index = get("commit_position"), get("change_index")
    link = get("chain_link", False)
    if (database is None or schema is None or table is None or operation not in _OPERATIONS
            or not _moment(committed_at) or not _moment(queued_at)
            or type(xid) is not int or type(position) is not int or type(commit_position) is not int
            or type(change_index) is not int or not -_INT8 <= xid < _INT8 or not -_INT8 <= position < _INT8
            or not -_INT8 <= commit_position < _INT8 or not -_INT4 <= change_index < _INT4):
        return None
    if link is None:
        chain = "\\N"
    elif type(link) is str and not len(link) % 2 and not link.strip(_HEX_DIGITS):  # lower-case pairs
        chain = "\\\\x" + link
    else:
        return None
    return (f"{database}\t{operation}\t{texts[0]}\t{committed_at}\t{queued_at}\t{xid}\t{position}\t"
            f"{commit_position}\t{change_index}\t{chain}\t{pk}\t{schema}\t{table}\t{texts[1]}\t{texts[2]}\n",
            str(m["table"]), str(operation), str(committed_at))
