"""The one tracked model: a todo, in a table named ``todo`` like the output of the Bemi documentation's example."""

from django.db import models

from bemi import BemiRecordMixin


class Todo(BemiRecordMixin, models.Model):
    """``todo.bemi_changes()`` lists this row's changes (see todos/history.py for deleted ones)."""

    task = models.CharField(max_length=200)
    is_completed = models.BooleanField(default=False)

    class Meta:
        db_table = "todo"
        ordering = ["id"]

    def __str__(self) -> str:
        return self.task
