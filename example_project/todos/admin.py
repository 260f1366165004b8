"""Todos in the admin; their "History" button shows bemi's changes of the row."""

from django.contrib import admin

from bemi.admin import BemiHistoryAdminMixin
from todos.models import Todo


@admin.register(Todo)
class TodoAdmin(BemiHistoryAdminMixin, admin.ModelAdmin):
    list_display = ["id", "task", "is_completed"]
