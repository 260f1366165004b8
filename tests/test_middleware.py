"""BemiMiddleware through Django's test clients, sync (WSGI) and async (ASGI)."""

from __future__ import annotations

import logging

import pytest
from asgiref.sync import async_to_sync, iscoroutinefunction
from django.contrib.auth import get_user_model
from django.http import HttpResponse
from django.test import AsyncClient, Client, override_settings

import bemi
from bemi import wrapper
from bemi.appcontext import current_frame
from tests.ctxapp.helpers import tracked
from tests.ctxapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fresh_warnings():
    wrapper._warned.clear()
    yield
    wrapper._warned.clear()


def test_middleware_is_sync_and_async_capable():
    def view(request):
        return HttpResponse()

    async def async_view(request):
        return HttpResponse()

    assert bemi.BemiMiddleware.sync_capable and bemi.BemiMiddleware.async_capable
    assert not iscoroutinefunction(bemi.BemiMiddleware(view))
    assert iscoroutinefunction(bemi.BemiMiddleware(async_view))


def test_request_context_reaches_the_wal(wal):
    response = Client().get("/ctx/create/")
    assert response.status_code == 200
    assert response.json()["context"] == {"user_id": None, "method": "GET", "path": "/ctx/create/"}
    (message, rows), = tracked(wal.read())
    assert message.json == {
        "user_id": None,
        "method": "GET",
        "path": "/ctx/create/",
        "SQL": message.json["SQL"],
    }
    assert message.json["SQL"].startswith('INSERT INTO "ctxapp_item"')
    assert f"id[bigint]:{response.json()['id']} " in rows[0].data
    assert current_frame() is None


def test_view_context_merges_over_the_request(wal):
    Client().post("/ctx/extra/")
    pairs = tracked(wal.read())
    assert [{k: v for k, v in m.json.items() if k != "SQL"} for m, _ in pairs] == [
        {"user_id": None, "method": "POST", "path": "/overridden", "action": "extra"},
        {"user_id": None, "method": "POST", "path": "/ctx/extra/"},
    ]


def test_context_cleared_after_a_view_that_raises(wal):
    client = Client()
    with pytest.raises(RuntimeError, match="view failed"):
        client.get("/ctx/fail/")
    assert current_frame() is None and bemi.get_context() == {}
    (message, _), = tracked(wal.read())  # the write before the error (autocommit) kept its context
    assert message.json["path"] == "/ctx/fail/"
    Item.objects.create(name="after the request")  # no context leaked into later writes
    assert tracked(wal.read()) == []


def test_context_cleared_even_if_set_inside_the_view(wal):
    """A view calling set_context() cannot leak it past the request."""
    from django.urls import path

    def view(request):
        bemi.set_context({"leak": True})
        return HttpResponse()

    urlpatterns = [path("leak/", view)]
    with override_settings(ROOT_URLCONF=type("urls", (), {"urlpatterns": urlpatterns})):
        Client().get("/leak/")
    assert current_frame() is None


def test_user_authenticated_inside_the_view_is_seen(wal):
    user = get_user_model().objects.create_user("late", password="x")
    wal.read()
    response = Client().get("/ctx/auth/?username=late")
    (message, rows), = tracked(wal.read())
    assert message.json["user_id"] == user.pk == response.json()["user_id"]


def test_context_function_runs_once_per_request_at_the_first_write(wal):
    Client().get("/ctx/cached/")  # the view changes request.path between its two writes
    pairs = tracked(wal.read())
    assert [m.json["path"] for m, _ in pairs] == ["/ctx/cached/", "/ctx/cached/"]


def test_request_without_writes_never_calls_the_context_function(wal):
    calls = []

    def counting(request):
        calls.append(request.path)
        return {"n": len(calls)}

    import tests.ctxapp.context as ctxmod

    ctxmod.counting = counting
    try:
        with override_settings(BEMI_CONTEXT_FUNCTION="tests.ctxapp.context.counting"):
            Client().get("/ctx/list/")  # reads only
            assert calls == []
            Client().get("/ctx/create/")
            assert calls == ["/ctx/create/"]  # at the write; the get_context() after it reads the cache
    finally:
        del ctxmod.counting


@pytest.mark.parametrize(
    "path, cause",
    [
        ("tests.ctxapp.context.raising_context", "context-function"),
        ("tests.ctxapp.context.list_context", "not-a-dict"),
        ("tests.ctxapp.context.missing_function", "context-function"),
    ],
)
def test_bad_context_function_never_breaks_the_request(wal, caplog, path, cause):
    caplog.set_level(logging.WARNING, logger="bemi")
    with override_settings(BEMI_CONTEXT_FUNCTION=path):
        client = Client()
        for _ in range(3):
            assert client.post("/ctx/extra/").status_code == 200
    assert Item.objects.count() == 6
    assert tracked(wal.read()) == []  # the whole context is dropped, the rows are written
    warnings = [r for r in caplog.records if r.name == "bemi"]
    assert len(warnings) == 1 and cause in warnings[0].getMessage()


def test_context_function_returning_none_means_no_context(wal, caplog):
    with override_settings(BEMI_CONTEXT_FUNCTION="tests.ctxapp.context.none_context"):
        Client().get("/ctx/create/")
    assert tracked(wal.read()) == [] and Item.objects.count() == 1
    assert not [r for r in caplog.records if r.name == "bemi"]


def test_context_function_that_writes_itself(wal):
    """Its own write gets no context (no recursion); the request's writes get the context."""
    with override_settings(BEMI_CONTEXT_FUNCTION="tests.ctxapp.context.writing_context"):
        assert Client().post("/ctx/extra/").status_code == 200
    records = wal.read()
    pairs = tracked(records)
    assert [m.json["path"] for m, _ in pairs] == ["/overridden", "/ctx/extra/"]
    assert all(m.json["from_function"] is True for m, _ in pairs)
    assert all("ctxapp_item" in rows[0].table for _, rows in pairs)
    assert [r.kind for r in records if "ctxapp_tag" in r.table] == ["INSERT"]


def test_no_setting_no_context(wal):
    with override_settings(BEMI_CONTEXT_FUNCTION=None):
        Client().get("/ctx/create/")
    assert tracked(wal.read()) == []


def test_async_request_context_reaches_the_wal(wal):
    async def run():
        client = AsyncClient()
        return await client.get("/ctx/async/create/"), await client.get("/ctx/create/")

    async_view_response, sync_view_response = async_to_sync(run)()
    assert async_view_response.status_code == sync_view_response.status_code == 200
    pairs = tracked(wal.read())
    assert [m.json["path"] for m, _ in pairs] == ["/ctx/async/create/", "/ctx/create/"]
    assert async_view_response.json()["context"]["path"] == "/ctx/async/create/"
    assert current_frame() is None


def test_async_context_cleared_after_a_view_that_raises(wal):
    async def run():
        with pytest.raises(RuntimeError, match="async view failed"):
            await AsyncClient().get("/ctx/async/fail/")
        return current_frame()

    assert async_to_sync(run)() is None
    (message, _), = tracked(wal.read())
    assert message.json["path"] == "/ctx/async/fail/"
