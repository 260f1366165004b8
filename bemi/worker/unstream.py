"""Streamed in-progress transactions (protocol version 2) back into whole ones.

With ``streaming 'on'`` the walsender sends a transaction whose decoded changes
outgrow its ``logical_decoding_work_mem`` in blocks (Stream Start ... Stream
Stop) before it commits, instead of spilling it to its own disk and sending it
at its commit. Why the worker asks for it: its own write of a large transaction
into ``changes`` (in the source database) is then decoded, and dropped, while
the worker writes it, not all at once at its commit in front of the next
change to record.

Everything downstream (stitching, the sink, the exactly-once checkpoint) wants
whole transactions in commit order, so they get them: the messages of each
streamed transaction are appended to a temporary file of its own (memory stays
flat whatever its size: each file holds a small write buffer), and at its
Stream Commit they are handed out as an ordinary Begin, the messages in the
order they came (in protocol version 1 format: without their xid), Commit. A
Stream Abort of the transaction drops its file; of a subtransaction, it cuts the
file back to where that subtransaction's first change was, as PostgreSQL's own
apply worker does (a subtransaction and those started inside it come after its
first change, and the parent's later changes come after its abort).

The files live as long as the replication connection: after a reconnect the
server streams an unfinished transaction again from its first change, whatever
position the worker confirmed, because a transaction is skipped only by the
position of its commit.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from typing import IO

from bemi.worker import pgoutput as po

__all__ = ["Unstreamer", "STREAM_KINDS"]

#: Stream Start, Stream Stop, Stream Commit, Stream Abort.
STREAM_KINDS = frozenset(b"SEcA")
#: Messages that carry the xid of their (sub)transaction after their kind inside a stream block.
_WITH_XID = frozenset(b"IUDTRYM")

_XID = struct.Struct(">I")
_START = struct.Struct(">IB")  # 'S': xid, first segment
_STREAM_COMMIT = struct.Struct(">IBQQq")  # 'c': xid, flags, commit LSN, end LSN, commit time
_ABORT = struct.Struct(">II")  # 'A': xid, subtransaction xid
_RECORD = struct.Struct(">QIB")  # in a file: LSN, length of the message, its kind (the rest follows)
_RECORD_HEAD = struct.Struct(">QI")
_BEGIN = struct.Struct(">cQqI")  # 'B': final LSN, commit time, xid
_COMMIT = struct.Struct(">cBQQq")  # 'C': flags, commit LSN, end LSN, commit time

#: Write buffer of each transaction's file: what one streamed transaction costs in memory.
BUFFER_BYTES = 64 * 1024


class StreamError(ValueError):
    """The server's stream blocks do not fit together (a segment of a transaction not started here)."""


class _Spool:
    """The messages of one streamed transaction, in a temporary file, and where each subtransaction starts."""

    __slots__ = ("file", "size", "subxacts", "order")

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(prefix="bemi-stream-", buffering=BUFFER_BYTES)  # in TMPDIR
        self.size = 0
        self.subxacts: dict[int, int] = {}  # subtransaction xid -> file offset of its first change
        self.order: list[int] = []  # those xids in the order of their first change

    def add(self, lsn: int, data) -> None:
        """A message of the block (``data``: kind, xid, the rest), kept without its xid."""
        (subxid,) = _XID.unpack_from(data, 1)
        if subxid not in self.subxacts:
            self.subxacts[subxid] = self.size
            self.order.append(subxid)
        rest = data[5:]  # a view: written without a copy
        # The kind ends the record's head, so the message reads back in one piece: kind + rest.
        self.file.write(_RECORD.pack(lsn, len(rest) + 1, data[0]))
        self.file.write(rest)
        self.size += _RECORD.size + len(rest)

    def abort_subtransaction(self, subxid: int) -> None:
        offset = self.subxacts.get(subxid)
        if offset is None:  # no change of it reached this file
            return
        cut = self.order.index(subxid)
        for gone in self.order[cut:]:
            del self.subxacts[gone]
        del self.order[cut:]
        self.file.seek(offset)
        self.file.truncate()
        self.size = offset

    def replay(self) -> Iterator[tuple[int, bytes]]:
        file = self.file
        file.seek(0)
        read = file.read
        unpack = _RECORD_HEAD.unpack
        size = _RECORD_HEAD.size
        while head := read(size):  # to the end of the file (an abort may have cut it short)
            lsn, length = unpack(head)
            yield lsn, read(length)

    def close(self) -> None:
        self.file.close()


class Unstreamer:
    """Takes the stream messages (and the messages inside stream blocks) of one replication connection."""

    def __init__(self) -> None:
        self.spools: dict[int, _Spool] = {}
        self.current: _Spool | None = None  # the transaction of the open stream block
        self.current_xid = 0
        self.aborted = 0  # streamed transactions that rolled back

    def keep(self, lsn: int, data) -> bool:
        """A change (or relation, type, logical message) inside the open stream block: kept in its
        transaction's file (True); anything else is for :meth:`take` (False)."""
        current = self.current
        if current is None or data[0] not in _WITH_XID:
            return False
        try:
            current.add(lsn, data)
        except struct.error as exc:
            raise po.DecodeError(f"truncated message {chr(data[0])!r} in a stream block: {exc}") from exc
        return True

    def take(self, lsn: int, data) -> Iterator[tuple[int, bytes]]:
        """A stream message, or another message inside a stream block; what to hand on (a whole
        transaction at its Stream Commit, else nothing)."""
        kind = data[0]
        try:
            if self.current is not None:
                if self.keep(lsn, data):
                    return iter(())
                if kind == 0x45:  # 'E' Stream Stop
                    self.current = None
                    return iter(())
                if kind == 0x4F:  # 'O' the origin of the block's transaction: no xid, nothing we record
                    return iter(())
                raise StreamError(f"message {chr(kind)!r} inside the stream block of transaction {self.current_xid}")
            if kind == 0x53:  # 'S' Stream Start
                xid, first = _START.unpack_from(data, 1)
                spool = self.spools.get(xid)
                if spool is None:
                    if not first:
                        raise StreamError(f"a later segment of transaction {xid}, whose first was not received")
                    spool = self.spools[xid] = _Spool()
                self.current, self.current_xid = spool, xid
                return iter(())
            if kind == 0x63:  # 'c' Stream Commit
                xid, flags, commit_lsn, end_lsn, when = _STREAM_COMMIT.unpack_from(data, 1)
                return self._commit(xid, flags, commit_lsn, end_lsn, when)
            if kind == 0x41:  # 'A' Stream Abort
                xid, subxid = _ABORT.unpack_from(data, 1)
                spool = self.spools.get(xid)
                if spool is not None:
                    if subxid == xid:
                        del self.spools[xid]
                        spool.close()
                        self.aborted += 1
                    else:
                        spool.abort_subtransaction(subxid)
                return iter(())
            if kind == 0x45:
                raise StreamError("Stream Stop outside a stream block")
        except struct.error as exc:
            raise po.DecodeError(f"truncated stream message {chr(kind)!r}: {exc}") from exc
        raise StreamError(f"unexpected message {chr(kind)!r}")

    def _commit(self, xid: int, flags: int, commit_lsn: int, end_lsn: int, when: int) -> Iterator[tuple[int, bytes]]:
        spool = self.spools.pop(xid, None)
        yield commit_lsn, _BEGIN.pack(b"B", commit_lsn, when, xid)
        if spool is not None:
            try:
                yield from spool.replay()
            finally:
                spool.close()
        yield commit_lsn, _COMMIT.pack(b"C", flags, commit_lsn, end_lsn, when)

    def close(self) -> None:
        """Drop every file (the connection is gone: the server will stream those transactions again)."""
        for spool in self.spools.values():
            spool.close()
        self.spools.clear()
        self.current = None
