"""What is tracked: the tracking rule (``bemi/sql/tracking.sql``) and the ``BEMI_*`` settings.

Re-installs the functions so that triggers, replica identity and the event
trigger follow ``_bemi_is_tracked``; on a database that already recorded
history, says once that it may hold credentials and names ``bemi_redact``.
"""

from django.db import migrations

from bemi.installer import upgrade


class Migration(migrations.Migration):
    dependencies = [("bemi", "0003_upgrade")]
    operations = [migrations.RunPython(upgrade, migrations.RunPython.noop, elidable=False)]
