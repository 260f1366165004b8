"""Views that the middleware tests call through Django's test clients."""

from django.contrib.auth import get_user_model
from django.http import JsonResponse

import bemi
from tests.ctxapp.models import Item


def create_item(request):
    item = Item.objects.create(name=request.GET.get("name", "view"))
    return JsonResponse({"id": item.pk, "context": bemi.get_context()})


def create_with_extra(request):
    with bemi.context(action="extra", path="/overridden"):
        item = Item.objects.create(name="extra")
    Item.objects.create(name="after-extra")
    return JsonResponse({"id": item.pk})


def create_then_fail(request):
    Item.objects.create(name="before-error")
    raise RuntimeError("view failed after a write")


def authenticate_then_create(request):
    """Authenticates inside the view, as Django REST Framework does (it sets request.user), then writes."""
    request.user = get_user_model().objects.get(username=request.GET["username"])
    item = Item.objects.create(name="after-auth")
    return JsonResponse({"id": item.pk, "user_id": request.user.pk})


def two_writes_context_cached(request):
    Item.objects.create(name="first")
    request.path = "/changed-after-first-write"
    Item.objects.create(name="second")
    return JsonResponse({})


def list_items(request):
    return JsonResponse({"names": list(Item.objects.values_list("name", flat=True))})


def read_context(request):
    return JsonResponse({"context": bemi.get_context()})


async def async_create_item(request):
    item = await Item.objects.acreate(name="async-view")
    return JsonResponse({"id": item.pk, "context": bemi.get_context()})


async def async_create_then_fail(request):
    await Item.objects.acreate(name="async-before-error")
    raise RuntimeError("async view failed after a write")
