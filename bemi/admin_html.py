"""How values, diffs and contexts read in the admin pages (history, activity, revert, recover).

A masked value (``BEMI_MASKED_COLUMNS``) is stored as a digest: it is shown
as "masked", never as the digest's text, so a page says *that* it changed and
nothing about what it was.
"""

from __future__ import annotations

from typing import Any

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from bemi import exactjson
from bemi.models import BemiChange
from bemi.tracking import MASK_PREFIX

VALUE_LIMIT = 300
MASKED = "masked"


def is_masked(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(MASK_PREFIX)


def value_text(value: Any) -> str:
    """A JSON value as a person reads it (strings without quotes), cut when long; a masked one as "masked"."""
    if value is None:
        return "—"
    if is_masked(value):
        return MASKED
    text = value if isinstance(value, str) else exactjson.dumps(value, ensure_ascii=False)  # 1.20 stays 1.20
    return text if len(text) <= VALUE_LIMIT else text[:VALUE_LIMIT] + "…"


def _cell(value: Any, css: str) -> SafeString:
    if is_masked(value):
        return format_html('<td class="{} bemi-masked" title="{}">{}</td>', css, "stored as a digest: the value is not recorded", MASKED)
    return format_html('<td class="{}">{}</td>', css, value_text(value))


def who_and_where(change: BemiChange) -> str:
    """The context without the SQL statement: ``user_id: 7 · method: PUT · path: /todo/1``."""
    items = [(k, v) for k, v in (change.context or {}).items() if k != "SQL"]
    return " · ".join(f"{k}: {value_text(v)}" for k, v in items) or "—"


def diff_table(change: BemiChange) -> SafeString:
    """The changed columns as an HTML table: column, before, after (a changed masked value: "masked" on both sides)."""
    diff = change.diff()
    if not diff:
        return format_html('<span class="bemi-nodiff">{}</span>', "no column changed")
    rows = format_html_join(
        "", "<tr><th scope=\"row\">{}</th>{}{}</tr>",
        ((column, _cell(old, "bemi-before"), _cell(new, "bemi-after")) for column, (old, new) in diff.items()),
    )
    return format_html(
        '<table class="bemi-diff"><thead><tr><th>Column</th><th>Before</th><th>After</th></tr></thead>'
        "<tbody>{}</tbody></table>",
        rows,
    )


def values_table(values: dict, current: dict | None) -> SafeString:
    """What a revert writes: column, the value now, the value it writes."""
    now = current or {}
    rows = format_html_join(
        "", "<tr><th scope=\"row\">{}</th>{}{}</tr>",
        ((column, _cell(now.get(column), "bemi-before"), _cell(value, "bemi-after")) for column, value in values.items()),
    )
    return format_html(
        '<table class="bemi-diff bemi-writes"><thead><tr><th>Column</th><th>Now</th><th>Written</th></tr></thead>'
        "<tbody>{}</tbody></table>",
        rows,
    )
