"""The model every alternative tracks: a Todo and its Subtasks (FK, CASCADE).

The fields and tables are the same for every alternative; only the hook the
alternative needs on the model is added (a pghistory tracker, a
simple-history ``HistoricalRecords`` field). No migrations folder: syncdb
creates the tables, so no alternative-specific migration files are needed.
"""

import os

from django.db import models

ALT = os.environ.get("BENCH_ALT", "none")


class Todo(models.Model):
    task = models.CharField(max_length=200)
    is_completed = models.BooleanField(default=False)

    class Meta:
        app_label = "benchapp"
        db_table = "todo"

    if ALT == "simplehistory":
        from simple_history.models import HistoricalRecords

        history = HistoricalRecords(table_name="todo_history")


class Subtask(models.Model):
    todo = models.ForeignKey(Todo, on_delete=models.CASCADE, related_name="subtasks")
    title = models.CharField(max_length=200)

    class Meta:
        app_label = "benchapp"
        db_table = "subtask"

    if ALT == "simplehistory":
        from simple_history.models import HistoricalRecords

        history = HistoricalRecords(table_name="subtask_history")


if ALT == "pghistory":
    import pghistory

    # Inserts, updates AND deletes: pghistory.track() alone skips deletes.
    def _trackers():
        return (pghistory.InsertEvent(), pghistory.UpdateEvent(), pghistory.DeleteEvent())

    pghistory.track(*_trackers(), model_name="TodoEvent")(Todo)
    pghistory.track(*_trackers(), model_name="SubtaskEvent")(Subtask)
