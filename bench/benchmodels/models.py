"""A tracked Todo (the query API's record helpers) and a plain Item (the write path)."""

from django.db import models

from bemi import BemiRecordMixin


class Todo(BemiRecordMixin, models.Model):
    """The Todo of the Bemi documentation's example; bench/query.py fills `changes` for table ``todo``."""

    task = models.CharField(max_length=200)
    is_completed = models.BooleanField(default=False)

    class Meta:
        app_label = "benchmodels"
        db_table = "todo"


class Item(models.Model):
    """Three columns written by every operation of bench/write_path.py."""

    name = models.CharField(max_length=200)
    qty = models.IntegerField(default=0)
    note = models.TextField(blank=True, default="")

    class Meta:
        app_label = "benchmodels"
        db_table = "bench_item"
