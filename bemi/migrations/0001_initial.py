"""Install the PL/pgSQL functions, procedures, triggers and event triggers.

Reversible: ``python manage.py migrate bemi zero`` removes them again.
"""

from django.db import migrations

from bemi.installer import install, uninstall


class Migration(migrations.Migration):
    initial = True
    dependencies = list[tuple[str, str]]()  # typed without an annotation (django-stubs declares it)
    operations = [
        migrations.RunPython(install, uninstall, elidable=False),
    ]
