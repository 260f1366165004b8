"""Settings of the tiny Django project that bench/compare.py runs once per alternative.

One project for every alternative keeps the model, the database settings and
the operations identical; ``BENCH_ALT`` only adds the alternative's app (and,
in benchapp/models.py, its model hook). The database comes from ``BENCH_PG*``
variables set by bench/compare.py (a private cluster, one database per alternative).
"""

import os

ALT = os.environ.get("BENCH_ALT", "none")

SECRET_KEY = "bench-compare"
DEBUG = False  # DEBUG would keep every query in memory and skew the timings
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = None

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("BENCH_PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("BENCH_PGPORT", "5432"),
        "USER": os.environ.get("BENCH_PGUSER", "postgres"),
        "NAME": os.environ.get("BENCH_PGDATABASE", f"bench_{ALT}"),
    },
}

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
]

# Each alternative installed the way its documentation says.
if ALT in ("bemi", "bemi013"):
    INSTALLED_APPS += ["bemi"]
    MIDDLEWARE = ["bemi.BemiMiddleware"]
elif ALT == "pghistory":
    INSTALLED_APPS += ["pgtrigger", "pghistory"]
    MIDDLEWARE = ["pghistory.middleware.HistoryMiddleware"]
    # benchapp has no migrations folder (tables made by syncdb), so the runner
    # installs the triggers with `manage.py pgtrigger install` after migrate
    # instead of through pgtrigger's migration operations.
    PGTRIGGER_MIGRATIONS = False
elif ALT == "simplehistory":
    INSTALLED_APPS += ["simple_history"]
    MIDDLEWARE = ["simple_history.middleware.HistoryRequestMiddleware"]
else:
    MIDDLEWARE = []

INSTALLED_APPS += ["benchapp"]
