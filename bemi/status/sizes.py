"""Sizes in bytes as a person writes and reads them (``--max-retained-bytes 1GB``, ``12.3 MB``)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3, "tb": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """``1073741824``, ``512MB``, ``1GB`` (PostgreSQL's units: powers of 1024) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?[bB]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1073741824, 512MB, 1GB)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover
