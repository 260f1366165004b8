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
from datetime import datetime
from functools import lru_cache

from bemi.worker.stitch import ChangeRow

__all__ = ["VERSION", "FIELDS", "subject_token", "subject", "message_id", "encode"]

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


def document_head(source: str, database: str) -> str:
    return f'{{"v":{VERSION},"source":{_dumps(source)},"database":{_dumps(database)}'


def iso(moment: datetime) -> str:
    return moment.isoformat()
