"""Models used by the tests of this area (no migrations: created by syncdb)."""

from django.db import models

from bemi import BemiRecordMixin


class Todo(BemiRecordMixin, models.Model):
    """The Todo of the Bemi documentation's example: three columns, as in its psql output."""

    task = models.CharField(max_length=200)
    is_completed = models.BooleanField(default=False)

    class Meta:
        db_table = "todo"

    def __str__(self) -> str:
        return self.task


class Project(BemiRecordMixin, models.Model):
    name = models.CharField(max_length=100, unique=True)


class Item(BemiRecordMixin, models.Model):
    """Many column types, to check that time travel and revert give back real field values."""

    label = models.CharField(max_length=100, db_column="item_label")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL)
    price = models.DecimalField(max_digits=8, decimal_places=2, null=True)
    due_at = models.DateTimeField(null=True)
    due_on = models.DateField(null=True)
    ref = models.UUIDField(null=True)
    tags = models.JSONField(default=list)
    blob = models.BinaryField(null=True)
    ratio = models.FloatField(null=True)


class Ledger(BemiRecordMixin, models.Model):
    """Money and other numbers that a float would change: an audit trail must give them back exactly."""

    balance = models.DecimalField(max_digits=30, decimal_places=2)
    rate = models.FloatField(null=True)
    count = models.BigIntegerField(null=True)
    data = models.JSONField(null=True)
