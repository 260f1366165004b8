"""Re-install bemi's functions: an install that had passed 0004 kept the bodies it was given then.

This version's bodies (issue 18): every function pins ``search_path``, the statement trigger honours a
``/*Bemi ... Bemi*/`` marker only for a role that may emit messages and caches its look-ups, and
``_bemi_publish`` never fails a ``CREATE TABLE`` on a lock held elsewhere. Installed by a superuser (the
event triggers), the functions are kept and migrate says to run ``bemi_grants`` or the SQL files again.
"""

from django.db import migrations

from bemi.installer import reinstall


class Migration(migrations.Migration):
    dependencies = [("bemi", "0006_changes_schema")]
    operations = [migrations.RunPython(reinstall, migrations.RunPython.noop, elidable=False)]
