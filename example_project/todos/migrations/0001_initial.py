from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list = []

    operations = [
        migrations.CreateModel(
            name="Todo",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("task", models.CharField(max_length=200)),
                ("is_completed", models.BooleanField(default=False)),
            ],
            options={"db_table": "todo", "ordering": ["id"]},
        ),
        # Without it PostgreSQL logs only the key of an updated or deleted row,
        # and the audit trail would have no "before" values.
        migrations.RunSQL(
            "ALTER TABLE todo REPLICA IDENTITY FULL",
            reverse_sql="ALTER TABLE todo REPLICA IDENTITY DEFAULT",
        ),
    ]
