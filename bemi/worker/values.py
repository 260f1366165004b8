"""Column text values (as pgoutput sends them) -> JSON, exactly as ``to_jsonb()`` shows them.

pgoutput sends every value as the text its type's output function produces in
the decoding session (our source session runs with ``TimeZone=UTC``,
``DateStyle=ISO``, ``IntervalStyle=postgres``, ``extra_float_digits=1``,
``bytea_output=hex``: the defaults of a UTC session). ``to_jsonb`` starts from
the same text and only changes its *shape*:

* numbers (int2/4/8, float4/8, numeric) stay numbers, written as-is so that
  ``numeric`` with many digits and ``bigint`` 2^63-1 are exact; ``NaN`` and
  infinities become strings;
* booleans become ``true``/``false``; ``json``/``jsonb`` are nested as JSON;
* ``date``/``timestamp``/``timestamptz`` use the XSD form
  (``2023-12-11T17:09:09.12+00:00``); infinities stay ``"infinity"``;
* arrays become (nested) JSON arrays of their elements, each shaped by its own type;
* composite values become objects of their fields, each shaped by its own type;
* everything else (text, uuid, bytea ``"\\x..."``, enums, intervals, ...) is
  the output text as a JSON string.

The result of each value is a JSON *fragment* (text), so no number ever goes
through a float. Loaders are psycopg ``Loader`` classes registered in a
psycopg ``AdaptersMap``: psycopg's own array loader parses array syntax
(quoting, escaping, dimensions, NULLs) and calls our element loaders, and its
record loader splits composite values into their fields' text.

Timestamps are reshaped as text rather than through ``datetime`` because
Python's ``datetime`` cannot hold what PostgreSQL can (``infinity``, BC dates,
years after 9999); a loader raising there would stop the worker on a valid row.
"""

from __future__ import annotations

import re
from json.encoder import encode_basestring  # the C encoder of json.dumps(str, ensure_ascii=False)
from dataclasses import dataclass
from typing import Any, Callable

import psycopg
from psycopg import pq
from psycopg.adapt import AdaptersMap, Loader
from psycopg.postgres import types as pg_types
from psycopg.types.composite import RecordLoader

__all__ = ["TypeSpec", "JsonValues", "BUILTIN_TYPES", "sanitize_json_text", "dump_string"]

Fragment = str  # a JSON value, as text
Format = Callable[[bytes], Fragment]


@dataclass(frozen=True)
class TypeSpec:
    """How ``to_jsonb`` shapes values of one type."""

    category: str  # bool, number, json, jsonb, date, timestamp, timestamptz, array, vector, composite, string
    elem_oid: int = 0  # arrays and vectors: element type
    delimiter: str = ","  # arrays: element delimiter (';' for box)
    fields: tuple[tuple[str, int], ...] = ()  # composites: (name, type oid) of each field


# Built-in types by category (psycopg's names: bpchar is char(n), "char" the one-byte type).
# Each comes with its array type; other types (domains, enums, composites, arrays of
# those, and built-ins not listed here) are looked up in the catalog once (``resolve``).
_CATEGORIES: dict[str, tuple[str, ...]] = {
    "bool": ("bool",),
    "number": ("int2", "int4", "int8", "float4", "float8", "numeric"),
    "json": ("json",),
    "jsonb": ("jsonb",),
    "date": ("date",),
    "timestamp": ("timestamp",),
    "timestamptz": ("timestamptz",),
    "string": (
        "bytea", '"char"', "name", "text", "oid", "bpchar", "varchar", "uuid",
        "time", "timetz", "interval", "inet", "cidr", "box",
    ),
}


def _builtin_types() -> dict[int, TypeSpec]:
    specs: dict[int, TypeSpec] = {}
    for category, names in _CATEGORIES.items():
        for name in names:
            info = pg_types[name]
            specs[info.oid] = TypeSpec(category)
            specs[info.array_oid] = TypeSpec("array", info.oid, info.delimiter)  # box[]: ';'
    # int2vector and oidvector are arrays to to_jsonb, but their text is "1 2 3" (no braces, spaces).
    for name, elem in (("int2vector", "int2"), ("oidvector", "oid")):
        info = pg_types[name]
        specs[info.oid] = TypeSpec("vector", pg_types[elem].oid)
        specs[info.array_oid] = TypeSpec("array", info.oid, info.delimiter)
    return specs


BUILTIN_TYPES: dict[int, TypeSpec] = _builtin_types()
_CANONICAL = frozenset(("string", "bool", "date", "timestamp", "timestamptz"))
_INTEGERS = frozenset(pg_types[name].oid for name in ("int2", "int4", "int8"))

# -- JSON text helpers -------------------------------------------------------------------

_JSON_ESCAPE = re.compile(
    r"\\(u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)", re.S
)


def _fix_escape(match: re.Match) -> str:
    esc = match.group(1)
    if len(esc) == 5:  # a single \uXXXX
        code = int(esc[1:], 16)
        if code == 0 or 0xD800 <= code <= 0xDFFF:
            return "\\ufffd"
    return match.group(0)


def sanitize_json_text(text: str) -> str:
    """JSON text -> the same JSON that ``jsonb`` accepts.

    ``json`` columns (and the context) may hold the escape ``\\u0000`` or a lone
    surrogate escape, which ``jsonb`` rejects; each becomes ``\\ufffd``
    (U+FFFD REPLACEMENT CHARACTER). Escapes are matched left to right in
    pairs, so an escaped backslash followed by ``u0000`` is left alone.
    """
    if "\\u" not in text:
        return text
    return _JSON_ESCAPE.sub(_fix_escape, text)


_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def dump_string(text: str) -> Fragment:
    """A Python string as a JSON string that ``jsonb`` accepts (NUL and lone surrogates -> U+FFFD)."""
    if _BAD_CHARS.search(text):
        text = _BAD_CHARS.sub("\ufffd", text)
    return encode_basestring(text)


# -- scalar formats ----------------------------------------------------------------------

_TZ_HOURS_ONLY = re.compile(r"([+-]\d\d)( BC)?$")


def _make_formats(encoding: str) -> dict[str, Format]:
    def string(data: bytes) -> Fragment:
        # Decoded server text holds no NUL and (decoding with "replace") no lone surrogate.
        return encode_basestring(data.decode(encoding, "replace"))

    def boolean(data: bytes) -> Fragment:
        return "true" if data == b"t" else "false"

    def number(data: bytes) -> Fragment:
        text = data.decode("ascii", "replace")
        if "N" in text or "n" in text:  # NaN, Infinity, -Infinity
            return '"' + text + '"'
        return text

    def json_value(data: bytes) -> Fragment:
        return sanitize_json_text(data.decode(encoding, "replace"))

    def jsonb_value(data: bytes) -> Fragment:
        return data.decode(encoding, "replace")

    def date(data: bytes) -> Fragment:
        return '"' + data.decode("ascii", "replace") + '"'

    def timestamp(data: bytes) -> Fragment:
        text = data.decode("ascii", "replace")
        if text[0].isdigit():
            text = text.replace(" ", "T", 1)
        return '"' + text + '"'

    def timestamptz(data: bytes) -> Fragment:
        text = data.decode("ascii", "replace")
        if text[0].isdigit():
            text = _TZ_HOURS_ONLY.sub(r"\1:00\2", text.replace(" ", "T", 1))
        return '"' + text + '"'

    return {
        "string": string, "bool": boolean, "number": number, "json": json_value,
        "jsonb": jsonb_value, "date": date, "timestamp": timestamp, "timestamptz": timestamptz,
    }


def _dump_nested(items: list[Any]) -> Fragment:
    return "[" + ",".join(
        "null" if x is None else (x if isinstance(x, str) else _dump_nested(x)) for x in items
    ) + "]"


_TEXT = pg_types["text"]

# psycopg's text-format array loader (the C one when available), specialised per element type.
# (text[]'s registered loader is a subclass of it with ``base_oid`` = text.)
def _array_loader_base() -> type:
    text_array_loader = psycopg.adapters.get_loader(_TEXT.array_oid, pq.Format.TEXT)
    if text_array_loader is None:  # psycopg registers it at import
        raise ImportError(f"psycopg has no text-format loader for text[] (oid {_TEXT.array_oid})")
    return text_array_loader.__mro__[1]


_ARRAY_LOADER_BASE: type = _array_loader_base()


class JsonValues:
    """Type oid -> a function turning the value's text into its ``to_jsonb`` JSON fragment.

    ``resolve(oid)`` is asked (once per type) about types that are not built in
    (domains, enums, arrays of those...); returning ``None`` means "a string".
    """

    def __init__(self, resolve: Callable[[int], TypeSpec | None] | None = None, encoding: str = "utf-8"):
        self._resolve = resolve
        self._formats = _make_formats(encoding)
        self._adapters = AdaptersMap(psycopg.adapters)
        # for records: every field as its raw text (bytes), shaped afterwards by the field's type
        self._record_adapters = AdaptersMap(psycopg.adapters)
        self._record_adapters.register_loader(_TEXT.oid, _RawLoader)
        self._cache: dict[int, Format] = {}

    def spec(self, oid: int) -> TypeSpec:
        spec = BUILTIN_TYPES.get(oid)
        if spec is None and self._resolve is not None:
            spec = self._resolve(oid)
        return spec or TypeSpec("string")

    def is_canonical(self, oid: int) -> bool:
        """Is every fragment of this type already in the chain's canonical form (bemi/chain.py), i.e.
        does it parse and serialise back to the same text? Strings (escaped by the C encoder the
        canonical form uses), booleans, dates and timestamps, integers and arrays of those are;
        ``numeric`` and floats are not (the canonical form keeps a fraction as text, ``1e2`` as ``100``),
        nor ``json``/``jsonb`` (their keys are sorted) or composites."""
        spec = self.spec(oid)
        if spec.category == "array":
            return self.is_canonical(spec.elem_oid)
        return spec.category in _CANONICAL or oid in _INTEGERS

    def format(self, oid: int) -> Format:
        fmt = self._cache.get(oid)
        if fmt is None:
            fmt = self._cache[oid] = self._make(oid)
        return fmt

    def _make(self, oid: int) -> Format:
        spec = self.spec(oid)
        if spec.category == "composite" and spec.fields:
            return self._composite(spec)
        if spec.category == "vector":
            return self._vector(self.format(spec.elem_oid))
        if spec.category != "array":
            return self._formats.get(spec.category, self._formats["string"])
        element = self.format(spec.elem_oid)
        loader_cls = type("ElementFragmentLoader", (Loader,), {"load": lambda self, data, f=element: f(bytes(data))})
        self._adapters.register_loader(spec.elem_oid, loader_cls)
        array_cls = type(
            "FragmentArrayLoader", (_ARRAY_LOADER_BASE,),
            {"base_oid": spec.elem_oid, "delimiter": spec.delimiter.encode()},
        )
        array_loader = array_cls(oid, self._adapters)
        load = array_loader.load

        def array(data: bytes) -> Fragment:
            return _dump_nested(load(data))

        return array

    @staticmethod
    def _vector(element: Format) -> Format:
        def vector(data: bytes) -> Fragment:
            return "[" + ",".join([element(item) for item in data.split()]) + "]"

        return vector

    def _composite(self, spec: TypeSpec) -> Format:
        keys = [encode_basestring(name) + ":" for name, _oid in spec.fields]
        formats = [self.format(oid) for _name, oid in spec.fields]
        split = RecordLoader(pg_types["record"].oid, self._record_adapters).load

        def composite(data: bytes) -> Fragment:
            values = split(data)
            if len(values) != len(keys):  # the type changed since this row was written
                return self._formats["string"](data)
            return "{" + ",".join(
                key + ("null" if value is None else fmt(value)) for key, fmt, value in zip(keys, formats, values)
            ) + "}"

        return composite


class _RawLoader(Loader):
    def load(self, data) -> bytes:
        return bytes(data)
