"""List, create, edit, complete and delete todos; a page per todo with its audit trail.

Forms post like any HTML page. ``PUT .../complete/`` and ``DELETE /todos/<id>/``
are also accepted (with the ``X-CSRFToken`` header), as an API client would
send them: the demo uses them, so the method shows up in the context.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods

from todos.forms import TodoForm
from todos.history import todo_history
from todos.models import Todo


@require_http_methods(["GET"])
def todo_list(request: HttpRequest) -> HttpResponse:
    return render(request, "todos/todo_list.html", {"todos": Todo.objects.all(), "form": TodoForm()})


@require_http_methods(["POST"])
def todo_create(request: HttpRequest) -> HttpResponse:
    form = TodoForm(request.POST)
    if form.is_valid():
        form.save()
        return redirect("todo_list")
    return render(request, "todos/todo_list.html", {"todos": Todo.objects.all(), "form": form}, status=400)


@require_http_methods(["GET", "DELETE"])
def todo_detail(request: HttpRequest, pk: int) -> HttpResponse:
    if request.method == "DELETE":
        get_object_or_404(Todo, pk=pk).delete()
        return HttpResponse(status=204)
    todo = Todo.objects.filter(pk=pk).first()
    history = todo_history(pk)
    if todo is None and not history:
        raise Http404("No such todo, and no history of one.")
    user_ids = [e.context.get("user_id") for e in history or []]
    users = get_user_model().objects.in_bulk([u for u in user_ids if isinstance(u, int)])
    rows = [(entry, _who(entry.context, users)) for entry in history or []]
    return render(request, "todos/todo_history.html", {"pk": pk, "todo": todo, "history": history, "rows": rows})


def _who(context: dict, users: dict) -> str:
    """The user behind a change, as the context names it."""
    if "user_id" not in context:
        return "(no context)"
    user = users.get(context["user_id"])
    if user is not None:
        return f"{user.get_username()} (id {user.pk})"
    return "anonymous" if context["user_id"] is None else f"user id {context['user_id']}"


@require_http_methods(["GET", "POST"])
def todo_edit(request: HttpRequest, pk: int) -> HttpResponse:
    todo = get_object_or_404(Todo, pk=pk)
    form = TodoForm(request.POST or None, instance=todo)
    if request.method == "POST" and form.is_valid():
        form.save()
        return redirect("todo_list")
    return render(request, "todos/todo_form.html", {"form": form, "todo": todo})


@require_http_methods(["POST", "PUT"])
def todo_complete(request: HttpRequest, pk: int) -> HttpResponse:
    todo = get_object_or_404(Todo, pk=pk)
    todo.is_completed = request.method == "PUT" or request.POST.get("is_completed", "1") != "0"
    todo.save(update_fields=["is_completed"])
    return HttpResponse(status=204) if request.method == "PUT" else redirect("todo_list")


@require_http_methods(["GET", "POST"])
def todo_delete(request: HttpRequest, pk: int) -> HttpResponse:
    todo = get_object_or_404(Todo, pk=pk)
    if request.method == "POST":
        todo.delete()
        return redirect("todo_list")
    return render(request, "todos/todo_confirm_delete.html", {"todo": todo})
