"""Re-install bemi's functions for the statement trigger of this version (issue 20).

A single write (a string of at most 8 kB) is read at once instead of keyed by its
``statement_timestamp()`` in ``bemi.statement_context``: the trigger adds about half
of what it did to a one-row INSERT (bench/trigger.py). Long strings still keep their
answer, so a string of N statements costs N times a constant. Same rules for markers
(docs/database.md).
"""

from django.db import migrations

from bemi.installer import reinstall


class Migration(migrations.Migration):
    dependencies = [("bemi", "0007_reinstall_functions")]
    operations = [migrations.RunPython(reinstall, migrations.RunPython.noop, elidable=False)]
