"""The context API outside requests: set/get, ``with``/``async with``/decorator, isolation."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory, override_settings

import bemi
from bemi.appcontext import current_frame, reset_context
from tests.ctxapp.helpers import tracked
from tests.ctxapp.models import Item


@pytest.fixture(autouse=True)
def no_leftover_context():
    assert current_frame() is None
    yield
    assert current_frame() is None, "a test leaked its context"


def test_public_names():
    from bemi import BemiMiddleware, context, get_bemi_context, get_context, set_context
    from bemi.middleware import BemiMiddleware as Middleware

    assert BemiMiddleware is Middleware
    assert all(callable(f) for f in (get_bemi_context, get_context, set_context))
    assert isinstance(context(a=1), context)
    import bemi.appcontext  # importing the module must not shadow bemi.context()

    assert bemi.context is context


def test_set_get_and_clear():
    assert bemi.get_context() == {}
    values = {"user_id": 1}
    token = bemi.set_context(values)
    try:
        values["user_id"] = 2  # copied at set time
        got = bemi.get_context()
        assert got == {"user_id": 1}
        got["x"] = 1  # a copy
        assert bemi.get_context() == {"user_id": 1}
        bemi.set_context({"other": True})
        assert bemi.get_context() == {"other": True}
        bemi.set_context(None)
        assert bemi.get_context() == {}
    finally:
        reset_context(token)


def test_nesting_merges_and_restores():
    with bemi.context(a=1, b=1):
        with bemi.context(b=2, c=3) as values:
            assert values == {"b": 2, "c": 3}
            assert bemi.get_context() == {"a": 1, "b": 2, "c": 3}
        assert bemi.get_context() == {"a": 1, "b": 1}
        with pytest.raises(RuntimeError):
            with bemi.context(a="boom"):
                raise RuntimeError
        assert bemi.get_context() == {"a": 1, "b": 1}
    assert bemi.get_context() == {}


def test_dict_argument_for_keys_that_are_not_identifiers():
    with bemi.context({"user-id": 1, "a": 1}, a=2):
        assert bemi.get_context() == {"user-id": 1, "a": 2}


def test_same_instance_can_be_reentered():
    block = bemi.context(a=1)
    with block:
        with bemi.context(a=2):
            with block:
                assert bemi.get_context() == {"a": 1}
            assert bemi.get_context() == {"a": 2}
    assert bemi.get_context() == {}


def test_decorator_sync_and_async():
    @bemi.context(job="sync")
    def sync_job(x):
        return bemi.get_context(), x

    @bemi.context(job="async")
    async def async_job(x):
        await asyncio.sleep(0)
        return bemi.get_context(), x

    assert sync_job(1) == ({"job": "sync"}, 1)
    assert asyncio.run(async_job(2)) == ({"job": "async"}, 2)
    assert asyncio.iscoroutinefunction(async_job) and sync_job.__name__ == "sync_job"
    with bemi.context(outer=1):
        assert sync_job(3) == ({"outer": 1, "job": "sync"}, 3)
    assert bemi.get_context() == {}


def test_async_with():
    async def main():
        async with bemi.context(a=1):
            async with bemi.context(b=2):
                inner = bemi.get_context()
            return inner, bemi.get_context()

    assert asyncio.run(main()) == ({"a": 1, "b": 2}, {"a": 1})


def test_threads_do_not_share_context():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        assert bemi.get_context() == {}  # nothing inherited from the main thread
        with bemi.context(thread=name):
            barrier.wait()
            seen[name] = bemi.get_context()
            barrier.wait()

    with bemi.context(thread="main"):
        threads = [threading.Thread(target=worker, args=(n,)) for n in ("t1", "t2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bemi.get_context() == {"thread": "main"}
    assert seen == {"t1": {"thread": "t1"}, "t2": {"thread": "t2"}}


def test_asyncio_tasks_do_not_leak_into_each_other():
    async def task(name):
        bemi.set_context({"task": name})  # set_context in a task stays in that task
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return bemi.get_context()

    async def main():
        results = await asyncio.gather(task("a"), task("b"))
        return results, bemi.get_context()

    assert asyncio.run(main()) == ([{"task": "a"}, {"task": "b"}], {})


def test_get_bemi_context_calls_the_setting():
    request = RequestFactory().post("/todo")
    assert bemi.get_bemi_context(request) == {"user_id": None, "method": "POST", "path": "/todo"}


def test_get_bemi_context_accepts_the_function_itself():
    with override_settings(BEMI_CONTEXT_FUNCTION=lambda request: {"path": request.path}):
        assert bemi.get_bemi_context(RequestFactory().get("/x")) == {"path": "/x"}


@pytest.mark.parametrize(
    "path, message",
    [
        (None, "is not set"),
        ("tests.ctxapp.context.missing_function", "cannot be imported"),
        ("no_such_module.fn", "cannot be imported"),
        ("tests.ctxapp.context.not_callable", "is not callable"),
        (42, "dotted path or a function"),
    ],
)
def test_get_bemi_context_misconfigured(path, message):
    with override_settings(BEMI_CONTEXT_FUNCTION=path):
        with pytest.raises(ImproperlyConfigured, match=message):
            bemi.get_bemi_context(RequestFactory().get("/"))


@pytest.mark.django_db(transaction=True)
def test_thread_writes_carry_only_their_own_context(wal):
    from django.db import connection

    def worker():
        try:
            Item.objects.create(name="thread without context")
            with bemi.context(who="thread"):
                Item.objects.create(name="thread with context")
        finally:
            connection.close()

    with bemi.context(who="main"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        Item.objects.create(name="main")
    pairs = tracked(wal.read())
    assert sorted((m.json["who"], rows[0].data.split("name[character varying]:")[1].split(" qty")[0]) for m, rows in pairs) == [
        ("main", "'main'"),
        ("thread", "'thread with context'"),
    ]


@pytest.mark.django_db(transaction=True)
def test_asyncio_tasks_write_with_their_own_context(wal):
    async def task(name):
        async with bemi.context(task=name):
            for i in range(3):
                await Item.objects.acreate(name=f"{name}-{i}")
                await asyncio.sleep(0)

    async def main():
        await asyncio.gather(task("a"), task("b"), sync_to_async(Item.objects.create)(name="none"))

    async_to_sync(main)()
    pairs = tracked(wal.read())
    assert len(pairs) == 6
    for message, rows in pairs:
        assert f"'{message.json['task']}-" in rows[0].data
