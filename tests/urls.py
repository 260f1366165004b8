"""URLs of the test project; each area appends its own patterns in its app."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("ctx/", include("tests.ctxapp.urls")),
]
