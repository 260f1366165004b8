"""Install this package's SQL over whatever an earlier bemi-django left.

The published bemi-django (0.1.3) has migrations of the same names
(``0001_initial``, ``0002_bemichange``), so after swapping packages Django
believes they ran and would install nothing. This migration drops what the
published package left that would get in the way (its per-row triggers:
``bemi/sql/upgrade_0_1_3.sql``), then runs ``bemi/sql/install.sql`` (through
``bemi.installer.install``, exactly as ``0001_initial`` does), in one
transaction. On a database set up by this package's own ``0001`` it changes
nothing: both files are idempotent.

Reverse: a no-op. ``migrate bemi 0002`` leaves this package's SQL installed
(it is what our ``0001`` installs; the published per-row triggers are not put
back); ``migrate bemi zero`` then removes everything through ``0001``'s reverse
(``uninstall.sql``). See docs/upgrading.md.
"""

from django.db import migrations

from bemi.installer import install_over_published


class Migration(migrations.Migration):
    dependencies = [
        ('bemi', '0002_bemichange'),
    ]
    operations = [
        migrations.RunPython(install_over_published, migrations.RunPython.noop, elidable=False),
    ]
