"""Models used by the tests of this area (no migrations: created by syncdb)."""

import uuid

from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=200)
    qty = models.IntegerField(default=0)
    note = models.TextField(blank=True, default="")

    class Meta:
        app_label = "ctxapp"


class Tag(models.Model):
    """A unique name, for get_or_create / update_or_create."""

    name = models.CharField(max_length=100, unique=True)
    color = models.CharField(max_length=20, default="")

    class Meta:
        app_label = "ctxapp"


class Doc(models.Model):
    """A UUID primary key with a default, and a parent for cascading deletes."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    item = models.ForeignKey(Item, on_delete=models.CASCADE, null=True, related_name="docs")
    title = models.CharField(max_length=100, default="")

    class Meta:
        app_label = "ctxapp"
