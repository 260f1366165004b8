"""Views of this test area."""

from django.urls import path

from tests.ctxapp import views

urlpatterns = [
    path("create/", views.create_item),
    path("extra/", views.create_with_extra),
    path("fail/", views.create_then_fail),
    path("auth/", views.authenticate_then_create),
    path("cached/", views.two_writes_context_cached),
    path("read/", views.read_context),
    path("list/", views.list_items),
    path("async/create/", views.async_create_item),
    path("async/fail/", views.async_create_then_fail),
]
