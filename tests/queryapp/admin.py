from django.contrib import admin

from bemi.admin import BemiHistoryAdminMixin
from tests.queryapp.models import Item, Todo


@admin.register(Todo)
class TodoAdmin(BemiHistoryAdminMixin, admin.ModelAdmin):
    list_display = ("id", "task", "is_completed")


@admin.register(Item)
class ItemAdmin(BemiHistoryAdminMixin, admin.ModelAdmin):
    pass
