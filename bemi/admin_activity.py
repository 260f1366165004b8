"""The admin's activity page: who changed what, by context, table, operation and time, grouped by transaction.

Every filter is one the indexes of ``changes`` answer: context values by
containment (GIN ``jsonb_path_ops``), table and operation and time by their
btree indexes. Pages are read by keyset (newest first, after the last change
shown) with ``LIMIT``: no ``COUNT(*)`` and no ``OFFSET``, so the hundredth
page costs what the first does.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, QueryDict
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from bemi.admin_html import diff_table, value_text
from bemi.admin_revert import model_for
from bemi.conf import activity_context_keys
from bemi.models import BemiChange

PAGE_SIZE = 100
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "TRUNCATE")


@dataclass
class Filters:
    """The page's filters, read from the query string (unknown or malformed values are ignored, and said)."""

    context: dict[str, str] = field(default_factory=dict)
    table: str = ""
    operation: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    after: tuple[dt.datetime, int, int] | None = None  # keyset: the last change of the previous page
    errors: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, data: QueryDict, keys: list[str]) -> "Filters":
        found = cls()
        for key in keys:
            value = data.get(f"ctx.{key}", "").strip()
            if value:
                found.context[key] = value
        for raw in data.getlist("ctx"):  # any other key: ctx=key=value
            key, sep, value = raw.partition("=")
            if sep and key.strip() and value.strip():
                found.context[key.strip()] = value.strip()
        found.table = data.get("table", "").strip()
        operation = data.get("operation", "").strip().upper()
        if operation in OPERATIONS:
            found.operation = operation
        elif operation:
            found.errors.append(f"Unknown operation {operation!r}.")
        found.since = found._moment(data.get("since", ""), "since")
        found.until = found._moment(data.get("until", ""), "until")
        found.after = found._keyset(data.get("after", ""))
        return found

    def _moment(self, raw: str, name: str) -> dt.datetime | None:
        raw = raw.strip()
        if not raw:
            return None
        try:
            parsed = parse_datetime(raw) or (parse_datetime(raw + "T00:00") if len(raw) == 10 else None)
        except ValueError:
            parsed = None
        if parsed is None:
            self.errors.append(f"{name}: not a date and time ({raw!r}); use YYYY-MM-DD or YYYY-MM-DDTHH:MM.")
            return None
        return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)

    def _keyset(self, raw: str) -> tuple[dt.datetime, int, int] | None:
        parts = raw.split("|")
        if len(parts) != 3:
            return None
        try:
            moment = dt.datetime.fromisoformat(parts[0])
            return (moment, int(parts[1]), int(parts[2])) if timezone.is_aware(moment) else None
        except ValueError:
            return None


def activity(filters: Filters, page_size: int | None = None) -> QuerySet:
    """The changes the filters select, newest first, from the page's keyset on, ``page_size + 1`` of them."""
    changes = BemiChange.objects.all()
    for key, raw in filters.context.items():
        changes = changes.context_value(key, raw)
    if filters.table:
        schema, dot, table = filters.table.rpartition(".")
        changes = changes.filter(table=table, **({"schema": schema} if dot else {}))
    if filters.operation:
        changes = changes.filter(operation=filters.operation)
    if filters.since:
        changes = changes.filter(committed_at__gte=filters.since)
    if filters.until:
        changes = changes.filter(committed_at__lt=filters.until)
    if filters.after:
        at, position, index = filters.after
        changes = changes.filter(committed_at__lte=at).filter(  # the first bound lets the index start there
            Q(committed_at__lt=at)
            | Q(committed_at=at, commit_position__lt=position)
            | Q(committed_at=at, commit_position=position, change_index__lt=index)
        )
    return changes.desc()[: (page_size or PAGE_SIZE) + 1]


def activity_view(request: HttpRequest, admin_site: Any) -> HttpResponse:
    keys = activity_context_keys()
    filters = Filters.read(request.GET, keys)
    rows = list(activity(filters))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    next_query = None
    if more:
        last = rows[-1]
        query = request.GET.copy()
        query["after"] = f"{last.committed_at.isoformat()}|{last.commit_position}|{last.change_index}"
        next_query = query.urlencode()
    first_query = request.GET.copy()
    first_query.pop("after", None)
    context = {
        **admin_site.each_context(request),
        "title": "Activity",
        "subtitle": None,
        "opts": BemiChange._meta,
        "keys": keys,
        "filters": filters,
        "key_values": [(key, filters.context.get(key, "")) for key in keys],
        "other_context": [f"{k}={v}" for k, v in filters.context.items() if k not in keys],
        "operations": OPERATIONS,
        "transactions": group(rows, keys),
        "next_query": next_query,
        "first_query": first_query.urlencode() if filters.after else None,
        "shown": len(rows),
    }
    request.current_app = admin_site.name
    return TemplateResponse(request, "bemi/admin/activity.html", context)


def group(rows: list[BemiChange], keys: list[str]) -> list[dict]:
    """Consecutive changes of one transaction together, each with its diff and the link to its object's history."""
    transactions: list[dict] = []
    for change in rows:
        identity = (change.database, change.transaction_id, change.commit_position)
        if not transactions or transactions[-1]["identity"] != identity:
            context = change.context or {}
            transactions.append({
                "identity": identity,
                "committed_at": change.committed_at,
                "transaction_id": change.transaction_id,
                "columns": [value_text(context[k]) if k in context else "" for k in keys],
                "other": ", ".join(f"{k}: {value_text(v)}" for k, v in context.items() if k not in keys and k != "SQL"),
                "changes": [],
            })
        transactions[-1]["changes"].append({
            "change": change,
            "diff": diff_table(change),
            "history_url": history_url(change),
            "change_url": _url("admin:bemi_bemichange_change", change.pk),
        })
    return transactions


def history_url(change: BemiChange) -> str | None:
    """The admin History page of the changed object, when its model is registered with a history view."""
    model = model_for(change.schema, change.table)
    if model is None or change.primary_key is None:
        return None
    return _url(f"admin:{model._meta.app_label}_{model._meta.model_name}_history", change.primary_key)


def _url(name: str, *args: Any) -> str | None:
    try:
        return reverse(name, args=args)
    except NoReverseMatch:
        return None
