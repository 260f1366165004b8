"""State only: the ``bemi.revert_change`` permission (the admin's revert and restore need it).

Django creates the permission row after ``migrate`` (``post_migrate``), as for any model.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("bemi", "0004_tracking")]

    operations = [
        migrations.AlterModelOptions(
            name="bemichange",
            options={
                "verbose_name": "change",
                "verbose_name_plural": "changes",
                "ordering": ["committed_at", "commit_position", "change_index"],
                "managed": False,
                "permissions": [("revert_change", "Can revert changes and restore deleted rows")],
            },
        ),
    ]
