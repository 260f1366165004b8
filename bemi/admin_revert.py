"""Revert and restore from the admin: who may, the confirmation page, and the revert labelled with its author.

One view (``revert_view``) serves the change list's action, the History
page's "Revert" links and the "Recover deleted" page's restore: GET (or the
action) shows what ``revert()`` would write and the problems
``bemi.revert.preview`` finds, without writing; only a POST with the
confirmation, a CSRF token and every permission runs ``revert()``, under a
``bemi.context`` naming the staff user and the reverted change ids.

Permissions: ``bemi.revert_change`` and, on each changed model, ``change``
(plus ``delete`` to undo a CREATE and ``add`` to restore a DELETE); a table
without a Django model only for superusers.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.apps import apps
from django.contrib import messages
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db import models
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme

from bemi.appcontext import context as bemi_context
from bemi.models import BemiChange
from bemi.revert import RevertError, RevertStep, preview
from bemi.timetravel import model_schema_table
from bemi.admin_html import diff_table, values_table, who_and_where

#: At most this many changes per revert from the admin (the context lists their ids).
MAX_CHANGES = 500
REVERT_PERMISSION = "bemi.revert_change"


def model_for(schema: str, table: str) -> type[models.Model] | None:
    """The Django model whose rows are recorded as ``schema.table``, if any."""
    for model in apps.get_models():
        if model_schema_table(model) == (schema, table):
            return model
    return None


def missing_permissions(user: Any, changes: list[BemiChange]) -> list[str]:
    """What ``user`` lacks to revert ``changes`` (empty: allowed)."""
    needed = [REVERT_PERMISSION]
    missing = []
    for change in changes:
        model = model_for(change.schema, change.table)
        if model is None:
            if not user.is_superuser:
                missing.append(f"{change.table} has no Django model: only a superuser may revert its changes")
            continue
        opts = model._meta
        actions = ["change"] + (["delete"] if change.operation == "CREATE" else ["add"] if change.operation == "DELETE" else [])
        needed += [f"{opts.app_label}.{get_permission_codename(action, opts)}" for action in actions]
    return [p for p in dict.fromkeys(needed) if not user.has_perm(p)] + list(dict.fromkeys(missing))


def may_revert(user: Any) -> bool:
    return bool(user.is_active and user.is_staff and user.has_perm(REVERT_PERMISSION))


def revert_view(request: HttpRequest, admin_site: Any) -> HttpResponse:
    """``GET ?id=...``: the confirmation page. ``POST id=... confirm=yes``: the revert (CSRF-protected by admin_view)."""
    data = request.POST if request.method == "POST" else request.GET
    ids = _ids(data.getlist("id") or data.getlist("_selected_action"))
    if ids is None:
        return HttpResponseBadRequest("Pass the changes to revert as id=<change id> (at most %d)." % MAX_CHANGES)
    changes = BemiChange.objects.filter(id__in=ids)
    return _respond(request, admin_site, changes, data.get("next"), confirm=request.method == "POST" and data.get("confirm") == "yes")


def confirmation(request: HttpRequest, admin_site: Any, changes: Any, next_url: str | None) -> HttpResponse:
    """The confirmation page for ``changes`` (the change list's action renders it)."""
    if changes.count() > MAX_CHANGES:
        messages.error(request, f"Select at most {MAX_CHANGES} changes to revert at once.")
        return HttpResponseRedirect(_safe_next(request, next_url))
    return _respond(request, admin_site, changes, next_url, confirm=False)


def _respond(request: HttpRequest, admin_site: Any, changes: Any, next_url: str | None, confirm: bool) -> HttpResponse:
    selected = list(changes.desc())
    if not selected:
        messages.warning(request, "No change selected.")
        return HttpResponseRedirect(_safe_next(request, next_url))
    missing = missing_permissions(request.user, selected)
    if missing:
        raise PermissionDenied("Reverting these changes needs: " + "; ".join(missing))
    error = None
    if confirm:
        ids = [str(c.id) for c in selected]
        user = request.user
        try:
            with bemi_context(bemi_reverted_by={"user_id": user.pk, "username": user.get_username()},
                              bemi_reverted_changes=ids):
                done = changes.revert()
        except RevertError as failure:
            error = str(failure)
        else:
            written = [a for a in done if a.action != "NOTHING"]
            messages.success(request, f"Reverted {len(done)} change{'s' if len(done) != 1 else ''} "
                                      f"({len(written)} row{'s' if len(written) != 1 else ''} written).")
            return HttpResponseRedirect(_safe_next(request, next_url))
    steps = preview(changes)
    context = {
        **admin_site.each_context(request),
        "title": "Revert changes" if any(c.operation != "DELETE" for c in selected) else "Restore deleted rows",
        "subtitle": None,
        "opts": BemiChange._meta,
        "steps": [_entry(step) for step in steps],
        "blocked": any(step.problems for step in steps),
        "error": error,
        "ids": [str(c.id) for c in selected],
        "next": _safe_next(request, next_url),
        "action_url": reverse(f"{admin_site.name}:bemi_bemichange_revert"),
    }
    request.current_app = admin_site.name
    return TemplateResponse(request, "bemi/admin/revert_confirmation.html", context, status=409 if error else 200)


def _entry(step: RevertStep) -> dict:
    change = step.change
    return {
        "change": change,
        "action": step.action,
        "who": who_and_where(change),
        "diff": diff_table(change),
        "writes": values_table(step.values, step.current) if step.values else None,
        "problems": step.problems,
    }


def _ids(raw: list[str]) -> list[uuid.UUID] | None:
    if not raw or len(raw) > MAX_CHANGES:
        return None
    try:
        return [uuid.UUID(value) for value in raw]
    except ValueError:
        return None


def _safe_next(request: HttpRequest, next_url: str | None) -> str:
    if next_url and url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()},
                                                    require_https=request.is_secure()):
        return next_url
    return reverse("admin:bemi_bemichange_changelist")
