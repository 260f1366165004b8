"""Test settings with a destination database: the `changes` table lives under the alias `bemi`."""

from tests.settings import *  # noqa: F401,F403
from tests.settings import DATABASES

DATABASES = {
    "default": {**DATABASES["default"], "TEST": {"NAME": "test_bemi_router_source"}},
    "bemi": {**DATABASES["default"], "NAME": "bemi_destination", "TEST": {"NAME": "test_bemi_router_destination"}},
}
DATABASE_ROUTERS = ["bemi.BemiDatabaseRouter"]
