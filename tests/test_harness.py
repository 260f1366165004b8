"""The harness itself: a real server with logical decoding."""

import pytest
from django.db import connection


@pytest.mark.django_db
def test_server_has_logical_wal_level():
    with connection.cursor() as cursor:
        cursor.execute("SHOW wal_level")
        assert cursor.fetchone()[0] == "logical"
        cursor.execute("SHOW server_version_num")
        assert int(cursor.fetchone()[0]) >= 140000
