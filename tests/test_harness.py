"""The harness itself: a real server with logical decoding, read by the ``wal`` fixture."""

import pytest
from django.db import connection


@pytest.mark.django_db
def test_server_has_logical_wal_level():
    with connection.cursor() as cursor:
        cursor.execute("SHOW wal_level")
        assert cursor.fetchone()[0] == "logical"
        cursor.execute("SHOW server_version_num")
        assert int(cursor.fetchone()[0]) >= 140000


@pytest.mark.django_db(transaction=True)
def test_wal_fixture_sees_committed_messages_only(wal):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_logical_emit_message(true, 'harness', 'a /* b */ ''c''')")
        cursor.execute("BEGIN")
        cursor.execute("SELECT pg_logical_emit_message(true, 'harness', 'rolled back')")
        cursor.execute("ROLLBACK")
    messages = wal.messages("harness")
    assert [m.content for m in messages] == ["a /* b */ 'c'"]
    assert messages[0].transactional
