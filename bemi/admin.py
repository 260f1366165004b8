"""History views in the Django admin.

* ``BemiChangeAdmin``: a read-only list of every change (filters by table,
  operation and date, search in the context), each with a before/after diff.
  Search ``key=value`` matches the context by containment (indexed).
  Registered on ``admin.site`` when ``django.contrib.admin`` is installed;
  only users with the ``bemi.view_bemichange`` permission (superusers) see it.
  Remove it with ``admin.site.unregister(BemiChange)``.
  Its action "Revert selected changes" and its "Activity" page (who did what,
  grouped by transaction): ``bemi.admin_revert``, ``bemi.admin_activity``.
* ``BemiHistoryAdminMixin``: put it before ``admin.ModelAdmin`` in your own
  admin and the object page's "History" button lists that row's changes,
  newest first, with who/where (the context) and the diff of each; the
  change list gets a "Recover deleted" page.
"""

from __future__ import annotations

import json
import re
from typing import Any

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Exists, Model, OuterRef, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from bemi import admin_activity, admin_html, admin_revert
from bemi.admin_html import diff_table, value_text, who_and_where
from bemi.models import BemiChange
from bemi.timetravel import model_schema_table

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
    actions = ["revert_selected"]
    change_list_template = "bemi/admin/changes_change_list.html"  # adds "Activity" to the object tools

    def get_urls(self) -> list:
        site = self.admin_site
        return [
            path("revert/", site.admin_view(lambda request: admin_revert.revert_view(request, site)),
                 name="bemi_bemichange_revert"),
            path("activity/", site.admin_view(self.activity_view), name="bemi_bemichange_activity"),
            *super().get_urls(),
        ]

    def activity_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return admin_activity.activity_view(request, self.admin_site)

    @admin.action(description="Revert selected changes…", permissions=["revert"])
    def revert_selected(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse:
        return admin_revert.confirmation(request, self.admin_site, queryset, request.get_full_path())

    def has_revert_permission(self, request: HttpRequest) -> bool:
        return admin_revert.may_revert(request.user)

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
    bemi_recover_per_page = 50
    change_list_template = "bemi/admin/change_list.html"  # adds "Recover deleted" to the object tools

    def get_urls(self) -> list:
        opts = self.model._meta  # type: ignore[attr-defined]
        return [
            path("recover/", self.admin_site.admin_view(self.bemi_recover_view),  # type: ignore[attr-defined]
                 name=f"{opts.app_label}_{opts.model_name}_bemi_recover"),
            *super().get_urls(),  # type: ignore[misc]
        ]

    def bemi_recover_view(self, request: HttpRequest) -> HttpResponse:
        """The rows of this model deleted and not created again since, newest deletion first, to restore."""
        model = self.model  # type: ignore[attr-defined]
        if not self.has_view_permission(request):  # type: ignore[attr-defined]
            raise PermissionDenied
        filters = admin_activity.Filters.read(request.GET, [])
        deleted, more = recoverable(model, filters.after, self.bemi_recover_per_page)
        next_query = None
        if more:
            last = deleted[-1]
            next_query = f"after={last.committed_at.isoformat()}|{last.commit_position}|{last.change_index}"
        entries = [
            {"change": change, "who": who_and_where(change),
             "values": [(column, value_text(value), admin_html.is_masked(value)) for column, value in change.before.items()]}
            for change in deleted
        ]
        opts = model._meta
        context = {
            **self.admin_site.each_context(request),  # type: ignore[attr-defined]
            "title": f"Recover deleted {opts.verbose_name_plural}",
            "subtitle": None,
            "opts": opts,
            "module_name": str(opts.verbose_name_plural).capitalize(),
            "entries": entries,
            "next_query": next_query,
            "may_restore": admin_revert.may_revert(request.user),
            "revert_url": reverse(f"{self.admin_site.name}:bemi_bemichange_revert"),  # type: ignore[attr-defined]
            "here": request.get_full_path(),
        }
        request.current_app = self.admin_site.name  # type: ignore[attr-defined]
        return TemplateResponse(request, "bemi/admin/recover.html", context)

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
        revert_url = (reverse(f"{self.admin_site.name}:bemi_bemichange_revert")  # type: ignore[attr-defined]
                      if admin_revert.may_revert(request.user) else None)
        entries = [
            {
                "change": change,
                "who": who_and_where(change),
                "diff": diff_table(change),
                "sql": (change.context or {}).get("SQL"),
                "url": _change_url(change),
                "revert_url": f"{revert_url}?{urlencode({'id': str(change.pk), 'next': request.get_full_path()})}"
                if revert_url and change.operation in ("CREATE", "UPDATE", "DELETE") else None,
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


def recoverable(model: type[Model], after: tuple | None, size: int) -> tuple[list[BemiChange], bool]:
    """The latest DELETE of each row of ``model`` not created again since (no later change, no row now).

    Newest first, one keyset page: ``NOT EXISTS`` a later change of the row (the primary_key index),
    then the rows that exist today are left out (one query on the model's table per page).
    """
    schema, table = model_schema_table(model)
    later = BemiChange.objects.filter(schema=schema, table=table, primary_key=OuterRef("primary_key")).filter(
        Q(committed_at__gt=OuterRef("committed_at"))
        | Q(committed_at=OuterRef("committed_at"), commit_position__gt=OuterRef("commit_position"))
        | Q(committed_at=OuterRef("committed_at"), commit_position=OuterRef("commit_position"),
            change_index__gt=OuterRef("change_index"))
    )
    deletes = BemiChange.objects.filter(schema=schema, table=table, operation="DELETE").filter(~Exists(later))
    found: list[BemiChange] = []
    while True:
        page = deletes
        if after is not None:
            at, position, index = after
            page = page.filter(committed_at__lte=at).filter(Q(committed_at__lt=at) | Q(committed_at=at, commit_position__lt=position)
                               | Q(committed_at=at, commit_position=position, change_index__lt=index))
        batch = list(page.desc()[: size + 1])
        if not batch:
            return found, False
        keys = {c.primary_key for c in batch}
        pk_field = model._meta.pk
        existing = {str(pk) for pk in model._default_manager.filter(pk__in=[pk_field.to_python(k) for k in keys])
                    .values_list("pk", flat=True)}
        found += [c for c in batch if c.primary_key not in existing]
        if len(found) > size:
            return found[:size], True
        if len(batch) <= size:
            return found, False
        last = batch[-1]
        after = (last.committed_at, last.commit_position, last.change_index)


def _change_url(change: BemiChange) -> str | None:
    try:
        return reverse("admin:bemi_bemichange_change", args=[change.pk])
    except NoReverseMatch:
        return None


if not admin.site.is_registered(BemiChange):
    admin.site.register(BemiChange, BemiChangeAdmin)
