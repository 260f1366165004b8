"""JSON with exact numbers: what ``changes`` holds, read and written back without losing a digit.

The worker stores each ``numeric`` value as PostgreSQL writes it
(``12345678901234567.80``, ``1.20``), and ``jsonb`` keeps those digits. Python's
``json`` reads every number with a fraction or an exponent as a ``float``,
which keeps 17 significant digits and drops trailing zeros, so an audit trail
of money would come back changed. Here such numbers are read as ``Decimal``
(integers stay ``int``) and a ``Decimal`` is written as a JSON number with the
same digits, so a value read from ``changes`` and sent back (a filter, a
revert, ``bemi_redact``) is the value the column held. Pure (no Django):
the worker's masking uses it too; ``bemi.models.ExactJSONField`` puts it on
``BemiChange.before`` and ``after``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Iterator

__all__ = ["ExactJSONDecoder", "ExactJSONEncoder", "dumps", "loads", "number_text"]


class ExactJSONDecoder(json.JSONDecoder):
    """``json.JSONDecoder`` reading numbers with a fraction or an exponent as ``Decimal``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parse_float", Decimal)
        super().__init__(*args, **kwargs)


def number_text(value: Decimal) -> str:
    """A finite ``Decimal`` as a JSON number in positional notation (``0.0000001``, not ``1E-7``), as PostgreSQL writes it."""
    return format(value, "f")


class ExactJSONEncoder(json.JSONEncoder):
    """``json.JSONEncoder`` writing a ``Decimal`` as a JSON number with its own digits.

    A NaN or infinite ``Decimal`` has no JSON number; it is written as the
    string ``to_jsonb`` gives a ``numeric`` NaN or infinity (``"NaN"``,
    ``"Infinity"``, ``"-Infinity"``). Without any ``Decimal`` in the value,
    this is ``json.JSONEncoder`` (its C speed-up included); with one, the
    output is compact (``indent`` is not applied).
    """

    def encode(self, o: Any) -> str:
        if not _has_decimal(o):
            return super().encode(o)
        return self._encode(o)

    def iterencode(self, o: Any, _one_shot: bool = False) -> Iterator[str]:
        if not _has_decimal(o):
            return super().iterencode(o, _one_shot)
        return iter([self._encode(o)])

    def _encode(self, o: Any) -> str:
        if isinstance(o, Decimal):
            if o.is_finite():
                return number_text(o)
            return super().encode("NaN" if o.is_nan() else ("-Infinity" if o < 0 else "Infinity"))
        if isinstance(o, dict):
            items = [super(ExactJSONEncoder, self).encode(_key(key)) + self.key_separator + self._encode(value)
                     for key, value in o.items()]
            return "{" + self.item_separator.join(items) + "}"
        if isinstance(o, (list, tuple)):
            return "[" + self.item_separator.join(self._encode(value) for value in o) + "]"
        return super().encode(o)


def _key(key: Any) -> str:
    """A key as ``json.dumps`` writes it (``True`` -> ``"true"``, ``1`` -> ``"1"``); a Decimal by its digits."""
    if isinstance(key, str):
        return key
    if isinstance(key, Decimal):
        return number_text(key) if key.is_finite() else str(key)
    return next(iter(json.loads(json.dumps({key: None}))))


def _has_decimal(o: Any) -> bool:
    if isinstance(o, Decimal):
        return True
    if isinstance(o, dict):
        return any(isinstance(k, Decimal) or _has_decimal(v) for k, v in o.items())
    if isinstance(o, (list, tuple)):
        return any(_has_decimal(v) for v in o)
    return False


def loads(text: str | bytes) -> Any:
    """JSON text -> Python, numbers with a fraction or an exponent as ``Decimal``."""
    return json.loads(text, cls=ExactJSONDecoder)


def dumps(value: Any, **kwargs: Any) -> str:
    """Python -> JSON text, a ``Decimal`` as a number with its digits."""
    return json.dumps(value, cls=ExactJSONEncoder, **kwargs)
