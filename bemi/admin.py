"""History views in the Django admin.

* ``BemiChangeAdmin``: a read-only list of every change (filters by table,
  operation and date, search in the context), each with a before/after diff.
  Search ``key=value`` matches the context by containment (indexed).
  Registered on ``admin.site`` when ``django.contrib.admin`` is installed;
  only users with the ``bemi.view_bemichange`` permission (superusers) see it.
  Remove it with ``admin.site.unregister(BemiChange)``.
* ``BemiHistoryAdminMixin``: put it before ``admin.ModelAdmin`` in your own
  admin and the object page's "History" button lists that row's changes,
  newest first, with who/where (the context) and the diff of each.
"""

from __future__ import annotations

import json
import re
from typing import Any

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from bemi.models import BemiChange

VALUE_LIMIT = 300


def _value(value: Any) -> str:
    """A JSON value as a person reads it (strings without quotes), cut when long."""
    if value is None:
        return "—"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= VALUE_LIMIT else text[:VALUE_LIMIT] + "…"


def who_and_where(change: BemiChange) -> str:
    """The context without the SQL statement: ``user_id: 7 · method: PUT · path: /todo/1``."""
    items = [(k, v) for k, v in (change.context or {}).items() if k != "SQL"]
    return " · ".join(f"{k}: {_value(v)}" for k, v in items) or "—"


def diff_table(change: BemiChange) -> SafeString:
    """The changed columns as an HTML table: column, before, after."""
    diff = change.diff()
    if not diff:
        return format_html('<span class="bemi-nodiff">{}</span>', "no column changed")
    rows = format_html_join(
        "",
        '<tr><th scope="row">{}</th><td class="bemi-before">{}</td><td class="bemi-after">{}</td></tr>',
        ((column, _value(old), _value(new)) for column, (old, new) in diff.items()),
    )
    return format_html(
        '<table class="bemi-diff"><thead><tr><th>Column</th><th>Before</th><th>After</th></tr></thead>'
        "<tbody>{}</tbody></table>",
        rows,
    )


class BemiChangeAdmin(admin.ModelAdmin):
    list_display = ("committed_at", "operation", "table", "primary_key", "who_and_where", "changed_columns")
    list_filter = ("table", "operation", ("committed_at", admin.DateFieldListFilter))
    search_fields = ("context", "primary_key")
    list_per_page = 50
    ordering = ("-committed_at", "-commit_position", "-change_index")  # newest first
    show_full_result_count = False
    fields = (
        "committed_at", "operation", "table", "primary_key", "who_and_where", "diff", "sql",
        "database", "schema", "transaction_id", "position", "queued_at", "created_at", "id",
    )
    readonly_fields = fields

    @admin.display(description="who / where")
    def who_and_where(self, change: BemiChange) -> str:
        return who_and_where(change)

    @admin.display(description="changed columns")
    def changed_columns(self, change: BemiChange) -> str:
        return ", ".join(change.diff()) or "—"

    @admin.display(description="changes")
    def diff(self, change: BemiChange) -> SafeString:
        return diff_table(change)

    @admin.display(description="SQL")
    def sql(self, change: BemiChange) -> str:
        return (change.context or {}).get("SQL") or "—"

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        """``key=value`` searches the context by containment (GIN index); anything else as text."""
        match = re.fullmatch(r"\s*([\w.-]+)=(.+?)\s*", search_term)
        if match is None:
            return super().get_search_results(request, queryset, search_term)
        key, raw = match.groups()
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        condition = Q(context__contains={key: raw})
        if value != raw:
            condition |= Q(context__contains={key: value})
        return queryset.filter(condition), False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class BemiHistoryAdminMixin:
    """Replace the admin's "History" page of an object with its Bemi changes."""

    bemi_history_template = "bemi/admin/object_history.html"
    bemi_history_per_page = 50

    def history_view(self, request: HttpRequest, object_id: str, extra_context: dict | None = None) -> HttpResponse:
        model = self.model  # type: ignore[attr-defined]
        opts = model._meta
        obj = self.get_object(request, unquote(object_id))  # type: ignore[attr-defined]
        if obj is None:
            return self._get_obj_does_not_exist_redirect(request, opts, object_id)  # type: ignore[attr-defined]
        if not self.has_view_or_change_permission(request, obj):  # type: ignore[attr-defined]
            raise PermissionDenied
        changes = BemiChange.objects.record(model, obj.pk).desc()
        page = Paginator(changes, self.bemi_history_per_page).get_page(request.GET.get("p"))
        entries = [
            {
                "change": change,
                "who": who_and_where(change),
                "diff": diff_table(change),
                "sql": (change.context or {}).get("SQL"),
                "url": _change_url(change),
            }
            for change in page
        ]
        context = {
            **self.admin_site.each_context(request),  # type: ignore[attr-defined]
            "title": f"Change history: {obj}",
            "subtitle": None,
            "object": obj,
            "opts": opts,
            "module_name": str(opts.verbose_name_plural).capitalize(),
            "entries": entries,
            "page": page,
            "preserved_filters": self.get_preserved_filters(request),  # type: ignore[attr-defined]
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name  # type: ignore[attr-defined]
        return TemplateResponse(request, self.bemi_history_template, context)


def _change_url(change: BemiChange) -> str | None:
    try:
        return reverse("admin:bemi_bemichange_change", args=[change.pk])
    except NoReverseMatch:
        return None


if not admin.site.is_registered(BemiChange):
    admin.site.register(BemiChange, BemiChangeAdmin)
