"""Django settings for the test suite.

Importing this module starts (once per process) a private PostgreSQL cluster
with ``wal_level = logical``, unless ``BEMI_TEST_PGPORT`` points at one that a
parent process already started; subprocesses started by tests inherit it.
"""

import os

from bemi_devtools.pgcluster import ensure_test_cluster

PG = ensure_test_cluster()

SECRET_KEY = "bemi-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": PG.host,
        "PORT": str(PG.port),
        "USER": PG.user,
        "NAME": os.environ.get("BEMI_TEST_DB_NAME", "bemi"),
        "TEST": {"NAME": "test_bemi"},
    },
}
if os.environ.get("BEMI_TEST_DB_USER"):  # subprocess tests that run as another role
    DATABASES["default"]["USER"] = os.environ["BEMI_TEST_DB_USER"]
if os.environ.get("BEMI_TEST_ROUTER"):  # subprocess tests with the destination router
    DATABASES["bemi"] = {**DATABASES["default"], "NAME": os.environ["BEMI_TEST_ROUTER"]}
    DATABASE_ROUTERS = ["bemi.BemiDatabaseRouter"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "bemi",
    "tests.ctxapp",
    "tests.queryapp",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "bemi.BemiMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

STATIC_URL = "/static/"

BEMI_CONTEXT_FUNCTION = "tests.ctxapp.context.get_bemi_context"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"bemi": {"handlers": ["console"], "level": os.environ.get("BEMI_LOG_LEVEL", "WARNING")}},
}
