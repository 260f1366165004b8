"""Counts in messages: ``counted(1, "change")`` is ``1 change``, ``counted(2, "change")`` ``2 changes`` (pure)."""

from __future__ import annotations

__all__ = ["counted"]


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` and the noun in the number it takes (``plural`` when not just ``noun + 's'``)."""
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"
