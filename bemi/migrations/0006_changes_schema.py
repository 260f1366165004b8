"""``BemiChange`` reads ``bemi.changes``: the worker keeps its tables in schema ``bemi`` (docs/security.md).

State only: the model is unmanaged, the worker moves the table (bemi/relocate.py)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('bemi', '0005_bemichange_revert_permission'),
    ]

    operations = [
        migrations.AlterModelTable(name='bemichange', table='bemi"."changes'),
    ]
