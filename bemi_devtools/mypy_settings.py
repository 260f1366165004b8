"""Django settings for type checking only (django-stubs' mypy plugin loads the app registry; no database is used)."""

SECRET_KEY = "mypy"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "bemi",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "mypy"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
