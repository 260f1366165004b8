"""The one tracked model: a todo, in a table named ``todo`` like the seed's output."""

from django.db import models


class Todo(models.Model):
    task = models.CharField(max_length=200)
    is_completed = models.BooleanField(default=False)

    class Meta:
        db_table = "todo"
        ordering = ["id"]

    def __str__(self) -> str:
        return self.task
