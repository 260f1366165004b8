"""Decode pgoutput (logical replication protocol version 1) messages.

(The worker asks for version 2, streaming: bemi.worker.unstream turns streamed transactions back into
version 1 messages before they get here.)

Pure functions over bytes, no I/O: each ``data`` value returned by
``pg_logical_slot_peek_binary_changes(..., 'proto_version', '1', ...)`` is one
message, decoded here into a small dataclass. Reference: "Logical Replication
Message Formats" in the PostgreSQL documentation. All integers are big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

__all__ = [
    "Begin", "Commit", "Relation", "Column", "TypeMsg", "Origin", "Insert", "Update",
    "Delete", "Truncate", "Message", "Tuple", "decode", "DecodeError", "lsn_to_int",
    "int_to_lsn", "pg_timestamp", "decode_insert", "message_header", "MAX_PREFIX_BYTES",
]

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")

#: a tuple column: ``None`` for NULL, ``UNCHANGED`` for an unchanged TOASTed
#: value that pgoutput did not send, else the value's text (bytes).
UNCHANGED = object()
Tuple = list  # list[bytes | None | UNCHANGED]


class DecodeError(ValueError):
    """The bytes are not a pgoutput message we understand."""


@dataclass(slots=True)
class Begin:
    final_lsn: int  # LSN of the transaction's commit record
    commit_time: datetime
    xid: int


@dataclass(slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int  # just past the commit record: where the slot may advance to
    commit_time: datetime


@dataclass(slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(slots=True)
class Column:
    flags: int  # 1: part of the replica identity key
    name: str
    type_oid: int
    typmod: int


@dataclass(slots=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str  # d(efault), n(othing), f(ull), i(ndex)
    columns: list[Column]


@dataclass(slots=True)
class TypeMsg:
    oid: int
    namespace: str
    name: str


@dataclass(slots=True)
class Insert:
    relid: int
    new: Tuple


@dataclass(slots=True)
class Update:
    relid: int
    old: Tuple | None  # full old row ('O') or key only ('K'), None if not sent
    old_is_key: bool
    new: Tuple


@dataclass(slots=True)
class Delete:
    relid: int
    old: Tuple
    old_is_key: bool


@dataclass(slots=True)
class Truncate:
    options: int  # 1: CASCADE, 2: RESTART IDENTITY
    relids: list[int]


@dataclass(slots=True)
class Message:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


def pg_timestamp(micros: int) -> datetime:
    """A PostgreSQL TimestampTz (microseconds since 2000-01-01 UTC) as a datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


#: The last commit time converted: a transaction's Begin and Commit carry the same one.
_last_time: tuple[int, datetime] = (0, PG_EPOCH)


def _commit_time(micros: int) -> datetime:
    global _last_time
    last = _last_time  # one tuple, replaced whole: safe to read from any thread
    if last[0] == micros:
        return last[1]
    when = pg_timestamp(micros)
    _last_time = (micros, when)
    return when


def lsn_to_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(b"\0", pos)
    return data[pos:end].decode("utf-8", "replace"), end + 1


def _tuple(data: bytes, pos: int) -> tuple[Tuple, int]:
    (ncols,) = _I16.unpack_from(data, pos)
    pos += 2
    values: Tuple = []
    append = values.append
    for _ in range(ncols):
        kind = data[pos]
        pos += 1
        if kind == 0x74:  # 't' text
            (length,) = _I32.unpack_from(data, pos)
            pos += 4
            if length < 0 or pos + length > len(data):
                raise DecodeError("tuple value runs past the end of the message")
            append(data[pos:pos + length])
            pos += length
        elif kind == 0x6E:  # 'n' null
            append(None)
        elif kind == 0x75:  # 'u' unchanged TOAST
            append(UNCHANGED)
        elif kind == 0x62:  # 'b' binary (only with the 'binary' option, which we never ask for)
            raise DecodeError("binary tuple data is not supported")
        else:
            raise DecodeError(f"unknown tuple column kind {kind!r}")
    return values, pos


def _begin(data: bytes) -> Begin:
    final_lsn, ts = struct.unpack_from(">Qq", data, 1)
    (xid,) = _U32.unpack_from(data, 17)
    return Begin(final_lsn, _commit_time(ts), xid)


def _commit(data: bytes) -> Commit:
    flags = data[1]
    commit_lsn, end_lsn, ts = struct.unpack_from(">QQq", data, 2)
    return Commit(flags, commit_lsn, end_lsn, _commit_time(ts))


def _relation(data: bytes) -> Relation:
    (relid,) = _U32.unpack_from(data, 1)
    namespace, pos = _string(data, 5)
    name, pos = _string(data, pos)
    identity = chr(data[pos])
    (ncols,) = _I16.unpack_from(data, pos + 1)
    pos += 3
    columns = []
    for _ in range(ncols):
        flags = data[pos]
        colname, pos = _string(data, pos + 1)
        type_oid, typmod = struct.unpack_from(">Ii", data, pos)
        pos += 8
        columns.append(Column(flags, colname, type_oid, typmod))
    return Relation(relid, namespace or "pg_catalog", name, identity, columns)


def _insert(data: bytes) -> Insert:
    (relid,) = _U32.unpack_from(data, 1)
    if data[5] != 0x4E:  # 'N'
        raise DecodeError("insert without a new tuple")
    new, _ = _tuple(data, 6)
    return Insert(relid, new)


def decode_insert(data: bytes) -> tuple[int, Tuple]:
    """An Insert message as (relation id, new tuple), without building an Insert object."""
    try:
        (relid,) = _U32.unpack_from(data, 1)
        if data[5] != 0x4E:
            raise DecodeError("insert without a new tuple")
        return relid, _tuple(data, 6)[0]
    except (struct.error, IndexError) as exc:
        raise DecodeError(f"truncated or malformed 'I' message: {exc}") from exc


def _update(data: bytes) -> Update:
    (relid,) = _U32.unpack_from(data, 1)
    pos = 5
    old = None
    old_is_key = False
    if data[pos] in (0x4B, 0x4F):  # 'K' key, 'O' old tuple
        old_is_key = data[pos] == 0x4B
        old, pos = _tuple(data, pos + 1)
    if data[pos] != 0x4E:
        raise DecodeError("update without a new tuple")
    new, _ = _tuple(data, pos + 1)
    return Update(relid, old, old_is_key, new)


def _delete(data: bytes) -> Delete:
    (relid,) = _U32.unpack_from(data, 1)
    kind = data[5]
    if kind not in (0x4B, 0x4F):
        raise DecodeError("delete without an old tuple")
    old, _ = _tuple(data, 6)
    return Delete(relid, old, kind == 0x4B)


def _truncate(data: bytes) -> Truncate:
    (count,) = _U32.unpack_from(data, 1)
    options = data[5]
    relids = list(struct.unpack_from(f">{count}I", data, 6))
    return Truncate(options, relids)


def _message(data: bytes) -> Message:
    flags = data[1]
    (lsn,) = _U64.unpack_from(data, 2)
    prefix, pos = _string(data, 10)
    (length,) = _I32.unpack_from(data, pos)
    pos += 4
    return Message(bool(flags & 1), lsn, prefix, bytes(data[pos:pos + length]))


#: Longest logical message prefix whose text ``message_header`` reads; longer ones are nobody's we read.
MAX_PREFIX_BYTES = 1024


def message_header(data) -> tuple[bool, int, str | None, int, int]:
    """A logical message's (transactional, lsn, prefix, content offset, content length), without
    copying its content (``data`` may be a ``memoryview`` of a large message).

    Any role may emit a message with any prefix (``pg_logical_emit_message`` is PUBLIC's): a prefix
    longer than ``MAX_PREFIX_BYTES`` is not read at all and comes back as ``None`` (with offset and
    length 0), so no prefix, however long, makes this fail or copy much."""
    try:
        flags = data[1]
        (lsn,) = _U64.unpack_from(data, 2)
        limit = min(len(data), 10 + MAX_PREFIX_BYTES + 1)
        head = bytes(data[10:limit])  # at most MAX_PREFIX_BYTES + 1 copied, whatever the message's size
        nul = head.find(0)
        if nul < 0:
            if limit < len(data):  # longer than we read: not ours, whatever it is
                return bool(flags & 1), lsn, None, 0, 0
            raise DecodeError("logical message prefix without its terminating NUL")
        prefix = head[:nul].decode("utf-8", "replace")
        end = 10 + nul
        (length,) = _I32.unpack_from(data, end + 1)
    except (struct.error, IndexError) as exc:
        raise DecodeError(f"truncated or malformed 'M' message: {exc}") from exc
    return bool(flags & 1), lsn, prefix, end + 5, length


def _type(data: bytes) -> TypeMsg:
    (oid,) = _U32.unpack_from(data, 1)
    namespace, pos = _string(data, 5)
    name, _ = _string(data, pos)
    return TypeMsg(oid, namespace or "pg_catalog", name)


def _origin(data: bytes) -> Origin:
    (lsn,) = _U64.unpack_from(data, 1)
    name, _ = _string(data, 9)
    return Origin(lsn, name)


_DECODERS = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("R"): _relation,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
    ord("Y"): _type,
    ord("O"): _origin,
}


def decode(data: bytes):
    """One pgoutput message (bytes) -> its dataclass."""
    if not data:
        raise DecodeError("empty message")
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        raise DecodeError(f"unknown pgoutput message type {chr(data[0])!r}")
    try:
        return decoder(data)
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"truncated or malformed {chr(data[0])!r} message: {exc}") from exc
