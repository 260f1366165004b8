"""pgoutput messages -> ``changes`` rows, each with the application context in force.

Pure (no I/O). Rules:

* a row change gets the context of the *latest* transactional ``_bemi``
  message before it in the same transaction; none -> ``{}``. Other prefixes
  (``_bemi_heartbeat``, anything foreign) and non-transactional messages are ignored;
* a context payload is untrusted: it must be UTF-8 JSON, an object, at most
  1 MB; otherwise ``{}`` is used, counted and logged (never an exception);
* transactions whose commit position is at or before ``skip_through`` (the
  destination checkpoint) produce no rows: they were written already;
* a relation is skipped when it is one of bemi's own tables (by oid, never by
  name: a table renamed ``changes`` is still tracked) or when the tracking
  settings (``bemi.tracking``) leave it out;
* per changed row (``bemi.tracking``): masked columns are replaced by a digest
  keyed per column (in ``primary_key`` too); an UPDATE that changed only ignored columns, or (optionally) nothing,
  is not recorded.
"""

from __future__ import annotations

import decimal
import functools
import json
import logging
import re
from operator import itemgetter
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, cast

from bemi import tables
from bemi import tracking as tr
from bemi.limits import MAX_CONTEXT_BYTES
from bemi.worker import pgoutput as po
from bemi.worker.shown import shown
from bemi.worker.values import JsonValues, dump_string

__all__ = ["ChangeRow", "Stitcher", "parse_context", "MAX_CONTEXT_BYTES"]

log = logging.getLogger("bemi.worker")

CONTEXT_PREFIX = "_bemi"
PRIMARY_KEY_MAX = 255


#: The partitions of ``changes`` (bemi/worker/partitions.py), for relations already dropped when read.
_CHANGES_PARTITION = re.compile(r"changes_(?:p[0-9]{8}(?:_[0-9]{12})?|default)\Z")


@dataclass(slots=True)
class ChangeRow:
    schema: str
    table: str
    primary_key: str | None
    operation: str
    before: str  # JSON text
    after: str  # JSON text
    context: str  # JSON text
    committed_at: datetime
    transaction_id: int
    position: int  # LSN of the change
    commit_position: int  # LSN of the transaction's commit record
    change_index: int  # order of the change inside its transaction (0-based)
    #: ``before`` and ``after`` are already in the chain's canonical form (bemi/chain.py): keys sorted,
    #: compact, every value as it parses back; the chain then hashes them as they are.
    canonical: bool = False


# -- context ------------------------------------------------------------------------------

class _Reject(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _Reject(f"{name} is not JSON")


def _dump(value: Any) -> str:
    """Serialise what ``json.loads`` gave back so that ``jsonb`` accepts it."""
    if isinstance(value, str):
        return dump_string(value)
    if isinstance(value, dict):
        return "{" + ",".join(dump_string(k) + ":" + _dump(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, decimal.Decimal):
        if not value.is_finite() or not -16000 < value.adjusted() < 130000:  # beyond PostgreSQL numeric
            return dump_string(str(value))
        return str(value)
    return str(value)  # int


def parse_context(content: bytes) -> tuple[str, str | None]:
    """A ``_bemi`` payload -> (context JSON text, problem or None).

    Numbers keep their exact text (decimals, no floats); NUL characters and
    lone surrogates in strings become U+FFFD because ``jsonb`` cannot store them.
    The same context is usually sent with many statements: small ones are cached.
    """
    if len(content) <= 16384:
        return _parse_context_cached(content)
    return _parse_context(content)


def _parse_context(content: bytes) -> tuple[str, str | None]:
    if len(content) > MAX_CONTEXT_BYTES:
        return "{}", f"context of {len(content)} bytes is larger than 1 MB"
    try:
        value = json.loads(content.decode("utf-8"), parse_float=decimal.Decimal, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return "{}", f"context is not valid JSON ({type(exc).__name__})"
    if not isinstance(value, dict):
        return "{}", f"context is a JSON {type(value).__name__}, not an object"
    try:
        return _dump(value), None
    except RecursionError:
        return "{}", "context is nested too deeply"


_parse_context_cached = functools.lru_cache(maxsize=512)(_parse_context)


# -- relations ----------------------------------------------------------------------------

@dataclass(slots=True)
class _Rel:
    relation: po.Relation
    keys: list[str]  # column names as JSON strings, followed by ':'
    formats: list[Callable[[bytes], str]]
    order: list[int]  # column positions in the order of their names (the chain's key order) when canonical
    sorted_keys: list[str]  # ``keys`` and ``formats`` in that order
    sorted_formats: list[Callable[[bytes], str]]
    pick: Callable[[list], Any] | None  # a tuple's values in that order (None: already in it)
    canonical: bool  # every column's JSON text is canonical as formatted (JsonValues.is_canonical)
    key_flags: list[bool]  # replica identity key columns (for 'K' old tuples)
    pk: list[int]  # positions of the primary key columns
    excluded: bool
    masked: frozenset[int]  # positions of masked columns
    ignored: frozenset[int]  # positions of ignore-change columns
    pk_column: int  # the one primary key column, not masked (-1: none, several, or masked)


PrimaryKeyLookup = Callable[[po.Relation], "list[str] | None"]


class Stitcher:
    """Feed it pgoutput messages in order; it appends change rows and reports commits."""

    def __init__(
        self,
        values: JsonValues,
        primary_key: PrimaryKeyLookup | None = None,
        skip_through: int = 0,
        tracking: tr.Tracking | None = None,
        own_tables: frozenset[int] = frozenset(),
        masking_key: bytes = b"",
        is_own: Callable[[int], "bool | None"] | None = None,
    ) -> None:
        self.values = values
        self.primary_key = primary_key
        self.skip_through = skip_through
        self.tracking = tracking  # None: every published table, every column as is
        self.own_tables = own_tables  # oids of bemi's own tables (destination in this database)
        self.is_own = is_own  # relid -> a partition of one of them? (asked once per Relation message)
        self.masking_key = masking_key
        self.skip_unchanged = bool(tracking and tracking.skip_unchanged_updates)
        self.skipped_updates = 0  # updates not recorded (ignored columns only, or no change)
        self.relations: dict[int, _Rel] = {}
        self.bad_contexts = 0
        self.skipped_messages = 0  # logical messages too malformed to read (skipped)
        self.bad_values = 0  # values a formatter failed on (stored as their text)
        self._begin: po.Begin | None = None
        self._skip = False
        self._context = "{}"
        self._index = 0
        self.last_xid: int | None = None  # xid of the transaction of the last Commit returned

    def reset(self) -> None:
        """Forget a transaction read only in part (the slot will hand it out again)."""
        self._begin = None
        self._skip = False

    @property
    def in_transaction(self) -> bool:
        """Between a Begin and its Commit."""
        return self._begin is not None

    def feed(self, lsn: int, data: bytes, out: list[ChangeRow]) -> po.Commit | None:
        """Decode one message; append its change rows to ``out``; return the Commit if it is one."""
        if data[0] == 0x49 and self._begin is not None:  # Insert, the bulk of most streams: short path
            if not self._skip:
                relid, new = po.decode_insert(data)
                self._insert(out, lsn, relid, new)
            return None
        if data[0] == 0x4D:  # a logical message: look at its header before copying any content
            self._message(data)
            return None
        msg = po.decode(data)
        kind = type(msg)
        if kind is po.Begin:
            self._begin = msg
            self._skip = msg.final_lsn <= self.skip_through
            self._context = "{}"
            self._index = 0
        elif kind is po.Commit:
            self.last_xid = self._begin.xid if self._begin is not None else None
            self._begin = None
            self._skip = False
            return msg
        elif kind is po.Relation:
            self._relation(msg)
        elif self._skip or self._begin is None:
            pass
        elif kind is po.Insert:
            self._row(out, lsn, msg.relid, "CREATE", None, False, msg.new)
        elif kind is po.Update:
            self._row(out, lsn, msg.relid, "UPDATE", msg.old, msg.old_is_key, msg.new)
        elif kind is po.Delete:
            self._row(out, lsn, msg.relid, "DELETE", msg.old, msg.old_is_key, None)
        elif kind is po.Truncate:
            for relid in msg.relids:
                rel = self.relations.get(relid)
                if rel is None or rel.excluded:
                    continue
                out.append(self._change(rel, lsn, "TRUNCATE", None, "{}", "{}"))
        return None

    # -- internals --------------------------------------------------------------------------

    def _message(self, data) -> None:
        """A ``_bemi`` context sets the context of the changes after it; other prefixes, non-transactional
        messages and messages outside a transaction being stored are skipped without reading their content;
        an oversized or invalid context is dropped (``{}``), counted and logged.

        Any role may emit a message (``pg_logical_emit_message`` is PUBLIC's), with any prefix and content:
        nothing here raises on one. One that cannot even be read is skipped and counted."""
        if self._skip or self._begin is None or len(data) < 2 or not data[1] & 1:
            return  # outside a transaction being stored, or non-transactional: never ours
        try:
            _transactional, lsn, prefix, start, length = po.message_header(data)
        except po.DecodeError as exc:
            self.skipped_messages += 1
            log.warning("skipping an unreadable logical message in transaction %s: %s (%d so far)",
                        self._begin.xid, shown(str(exc)), self.skipped_messages)
            return
        if prefix != CONTEXT_PREFIX:
            return
        problem: str | None
        if length > MAX_CONTEXT_BYTES:
            self._context, problem = "{}", f"context of {length} bytes is larger than 1 MB"
        elif length < 0 or start + length > len(data):
            self._context, problem = "{}", "context runs past the end of its message"
        else:
            self._context, problem = parse_context(bytes(data[start:start + length]))
        if problem:
            self.bad_contexts += 1
            if self.bad_contexts <= 100 or self.bad_contexts % 10_000 == 0:  # no log flood
                log.warning("ignoring the _bemi context at %s in transaction %s: %s (%d so far)",
                            po.int_to_lsn(lsn), self._begin.xid, problem, self.bad_contexts)

    def _relation(self, rel: po.Relation) -> None:
        names = [c.name for c in rel.columns]
        pk_names = self.primary_key(rel) if self.primary_key else None
        if not pk_names:
            # No primary key in the catalog (or the table is gone): fall back on the
            # replica identity key, unless that is every column (REPLICA IDENTITY FULL).
            flagged = [c.name for c in rel.columns if c.flags & 1]
            pk_names = flagged if 0 < len(flagged) < len(names) or rel.replica_identity in "di" else []
        pk = [names.index(n) for n in pk_names if n in names]
        tracking = self.tracking
        own = self.is_own(rel.relid) if self.is_own is not None else False
        if own is None:  # the relation is gone from the catalog: a partition of changes by its name
            own = rel.namespace == tables.SCHEMA and _CHANGES_PARTITION.match(rel.name) is not None
        excluded = (rel.relid in self.own_tables or own
                    or (tracking is not None and not tracking.tracks(rel.namespace, rel.name)))
        masked, ignored = (tracking.columns(rel.namespace, rel.name, names) if tracking is not None
                           else (frozenset(), frozenset()))
        formats = [self.values.format(c.type_oid) for c in rel.columns]
        for i in masked:  # a masked column's value is formatted straight into its marker (a key per column)
            formats[i] = self._masker(formats[i], tr.column_key(self.masking_key, rel.namespace, rel.name, names[i]))
        keys = [json.dumps(n, ensure_ascii=False) + ":" for n in names]
        # a masked value is a marker string: canonical whatever the column's type
        is_canonical = self.values.is_canonical
        canonical = all(i in masked or is_canonical(c.type_oid) for i, c in enumerate(rel.columns))
        # Objects of tables of canonical types are written with their keys in the order of the names (what
        # the chain's canonical form sorts them into), so that the chain hashes their text as it is.
        order = sorted(range(len(names)), key=names.__getitem__) if canonical else list(range(len(names)))
        self.relations[rel.relid] = _Rel(
            relation=rel,
            keys=keys,
            formats=formats,
            order=order,
            sorted_keys=[keys[i] for i in order],
            sorted_formats=[formats[i] for i in order],
            pick=None if order == list(range(len(order))) else _picker(order),
            canonical=canonical,
            key_flags=[bool(c.flags & 1) for c in rel.columns],
            pk=pk,
            excluded=excluded,
            masked=masked,
            ignored=ignored,
            pk_column=pk[0] if len(pk) == 1 and pk[0] not in masked else -1,
        )

    def _masker(self, fmt: Callable[[bytes], str], key: bytes) -> Callable[[bytes], str]:
        mask, canonical = tr.mask_text, tr.canonical

        def masked(value: bytes) -> str:
            return mask(key, canonical(fmt(value)))

        return masked

    def _object(self, rel: _Rel, values: list, key_only: bool = False, fallback: list | None = None) -> str:
        try:
            if not key_only and po.UNCHANGED not in values and len(values) == len(rel.keys):  # the common case
                return "{" + ",".join([
                    key + ("null" if value is None else fmt(value))
                    for key, fmt, value in zip(rel.sorted_keys, rel.sorted_formats,
                                               values if rel.pick is None else rel.pick(values))
                ]) + "}"
            return self._object_parts(rel, rel.formats, values, key_only, fallback)
        except Exception:
            # A value its type's format cannot read (a type shaped in a way we do not know): the row is
            # still stored, that value as its text, and counted. Nothing in a row stops the worker.
            return self._object_parts(rel, [self._safe(rel, i) for i in range(len(rel.formats))], values,
                                      key_only, fallback)

    def _safe(self, rel: _Rel, i: int) -> Callable[[bytes], str]:
        fmt = rel.formats[i]

        def safe(value: bytes) -> str:
            try:
                return fmt(value)
            except Exception as exc:
                self.bad_values += 1
                column = rel.relation.columns[i]
                if self.bad_values <= 100 or self.bad_values % 10_000 == 0:
                    log.warning("storing a value of %s.%s.%s (type oid %d) as its text: %s (%d so far)",
                                shown(rel.relation.namespace), shown(rel.relation.name), shown(column.name),
                                column.type_oid, shown(" ".join(str(exc).split()) or type(exc).__name__),
                                self.bad_values)
                if i in rel.masked:
                    return tr.mask_text(tr.column_key(self.masking_key, rel.relation.namespace, rel.relation.name,
                                                      column.name), bytes(value))
                return dump_string(bytes(value).decode("utf-8", "replace"))

        return safe

    def _object_parts(self, rel: _Rel, formats: list, values: list, key_only: bool, fallback: list | None) -> str:
        parts = []
        keys = rel.keys
        count = len(values)
        for i in rel.order:
            if i >= count or key_only and not rel.key_flags[i]:
                continue
            value = values[i]
            if value is po.UNCHANGED:
                # An unchanged TOASTed value is not sent: take it from the old row.
                value = fallback[i] if fallback is not None and i < len(fallback) else po.UNCHANGED
                if value is po.UNCHANGED:
                    continue  # unknown (no full old row): leave the key out rather than store NULL
            parts.append(keys[i] + ("null" if value is None else formats[i](value)))
        return "{" + ",".join(parts) + "}"

    def _primary_key(self, rel: _Rel, values: list | None, fallback: list | None) -> str | None:
        if not rel.pk or values is None:
            return None
        raw = []
        for i in rel.pk:
            value = values[i] if i < len(values) else None
            if value is po.UNCHANGED:
                value = fallback[i] if fallback is not None else None
            if value is po.UNCHANGED:
                value = None
            raw.append((i, value))
        if len(raw) == 1:
            i, value = raw[0]
            if value is None:
                return None
            if i in rel.masked:  # the column's marker (its formatter masks), without the JSON quotes
                return self._safe(rel, i)(value)[1:-1]
            text = value.decode("utf-8", "replace")
        else:
            text = "[" + ",".join("null" if v is None else self._safe(rel, i)(v) for i, v in raw) + "]"
        return text[:PRIMARY_KEY_MAX]

    def _insert(self, out: list, lsn: int, relid: int, new: list) -> None:
        """``_row`` for an INSERT, the bulk of most streams, with its steps inlined (same result)."""
        rel = self.relations.get(relid)
        if rel is None or rel.excluded or rel.pk_column < 0:
            self._row(out, lsn, relid, "CREATE", None, False, new)
            return
        try:  # an Insert's tuple holds no unchanged-TOAST marker (a short one: IndexError from pick)
            after = "{" + ",".join([
                key + ("null" if value is None else fmt(value))
                for key, fmt, value in zip(rel.sorted_keys, rel.sorted_formats, new if rel.pick is None else rel.pick(new))
            ]) + "}"
        except Exception:
            after = self._object(rel, new)
        value = new[rel.pk_column]
        begin = cast(po.Begin, self._begin)  # feed() calls this inside a transaction only
        index = self._index
        self._index = index + 1
        out.append(ChangeRow(
            rel.relation.namespace, rel.relation.name,
            None if value is None else value.decode("utf-8", "replace")[:PRIMARY_KEY_MAX],
            "CREATE", "{}", after, self._context, begin.commit_time, begin.xid, lsn, begin.final_lsn, index,
            rel.canonical,
        ))

    def _row(self, out: list, lsn: int, relid: int, op: str, old: list | None, old_is_key: bool, new: list | None) -> None:
        rel = self.relations.get(relid)
        if rel is None:
            raise po.DecodeError(f"change for relation {relid} before its Relation message")
        if rel.excluded:
            return
        full_old = old if old is not None and not old_is_key else None
        if full_old is not None and new is not None and (rel.ignored or self.skip_unchanged):
            # Which columns changed (an unchanged TOASTed value is not sent: it did not change)?
            changed = [i for i, (a, b) in enumerate(zip(full_old, new)) if b is not po.UNCHANGED and a != b]
            if (rel.ignored.issuperset(changed) if changed else self.skip_unchanged):
                self.skipped_updates += 1
                return
        before = "{}" if old is None else self._object(rel, old, key_only=old_is_key)
        after = "{}" if new is None else self._object(rel, new, fallback=full_old)
        if new is not None:
            pk = self._primary_key(rel, new, full_old)
        else:
            pk = self._primary_key(rel, old, None)
        out.append(self._change(rel, lsn, op, pk, before, after))

    def _change(self, rel: _Rel, lsn: int, op: str, pk: str | None, before: str, after: str) -> ChangeRow:
        begin = self._begin
        if begin is None:  # never: callers only get here inside a transaction
            raise po.DecodeError("change outside a transaction (no Begin message before it)")
        index = self._index
        self._index += 1
        return ChangeRow(
            schema=rel.relation.namespace,
            table=rel.relation.name,
            primary_key=pk,
            operation=op,
            before=before,
            after=after,
            context=self._context,
            committed_at=begin.commit_time,
            transaction_id=begin.xid,
            position=lsn,
            commit_position=begin.final_lsn,
            change_index=index,
            canonical=rel.canonical,
        )


def _picker(order: list[int]) -> Callable[[list], Any]:
    """values -> the values at ``order`` (a C itemgetter; a sequence even for one position)."""
    if len(order) == 1:
        only = order[0]

        def one(values: list) -> tuple:
            return (values[only],)

        return one
    return itemgetter(*order)
