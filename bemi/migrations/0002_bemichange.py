"""State only: BemiChange is unmanaged, so this creates nothing in the database.

It keeps ``makemigrations`` quiet in projects that install bemi (the worker
owns the ``changes`` table, bemi/sql/changes.sql)."""

import uuid
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('bemi', '0001_initial'),
    ]

    operations = [
        migrations.CreateModel(
            name='BemiChange',
            fields=[
                ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ('database', models.CharField(max_length=255)),
                ('schema', models.CharField(max_length=255)),
                ('table', models.CharField(max_length=255)),
                ('primary_key', models.CharField(max_length=255, null=True)),
                ('operation', models.TextField(choices=[('CREATE', 'CREATE'), ('UPDATE', 'UPDATE'), ('DELETE', 'DELETE'), ('TRUNCATE', 'TRUNCATE')])),
                ('before', models.JSONField(default=dict)),
                ('after', models.JSONField(default=dict)),
                ('context', models.JSONField(default=dict)),
                ('committed_at', models.DateTimeField()),
                ('queued_at', models.DateTimeField()),
                ('created_at', models.DateTimeField()),
                ('transaction_id', models.BigIntegerField()),
                ('position', models.BigIntegerField()),
                ('commit_position', models.BigIntegerField()),
                ('change_index', models.IntegerField()),
            ],
            options={
                'verbose_name': 'change',
                'verbose_name_plural': 'changes',
                'db_table': 'changes',
                'ordering': ['committed_at', 'commit_position', 'change_index'],
                'managed': False,
            },
        ),
    ]
