"""Leftover slots and publications of an earlier Bemi worker: found, and warned about by bemi.W015."""

from __future__ import annotations

import psycopg
import pytest
from django.core.checks import run_checks

from bemi.leftovers import find_leftovers
from tests.db import db_dsn

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def db():
    with psycopg.connect(db_dsn(), autocommit=True) as conn:
        made_slots: list[str] = []

        def slot(name: str) -> None:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [name])
            made_slots.append(name)

        conn.slot = slot  # type: ignore[attr-defined]
        conn.execute("DROP PUBLICATION IF EXISTS dbz_publication")
        try:
            yield conn
        finally:
            for name in made_slots:
                conn.execute("SELECT pg_drop_replication_slot(%s)", [name])
            conn.execute("DROP PUBLICATION IF EXISTS dbz_publication")


def leftovers(conn, **kwargs) -> list[tuple[str, str]]:
    with conn.cursor() as cursor:
        return [(x.kind, x.name) for x in find_leftovers(cursor, **kwargs)]


def test_inactive_debezium_and_bemi_slots_are_leftovers(db):
    db.execute("CREATE PUBLICATION dbz_publication FOR ALL TABLES")
    db.slot("bemi_local")
    db.slot("bemi_trial")
    db.slot("bemi")  # our worker's default: a stopped worker, not a leftover
    db.slot("someone_elses")  # not ours: never reported
    assert leftovers(db) == [("slot", "bemi_local"), ("slot", "bemi_trial"), ("publication", "dbz_publication")]
    with db.cursor() as cursor:
        slot = find_leftovers(cursor)[0]
    assert slot.drop_sql == "SELECT pg_catalog.pg_drop_replication_slot('bemi_local'::pg_catalog.name);"
    assert slot.retained_wal_bytes is not None and slot.retained_wal_bytes >= 0
    assert "keeps" in slot.message and slot.drop_sql in slot.message
    assert slot.as_dict()["drop_sql"] == slot.drop_sql and slot.as_dict()["kind"] == "slot"
    # Named as in use (e.g. after a takeover with --slot bemi_local --publication dbz_publication): kept.
    assert leftovers(db, in_use_slots=["bemi_local"]) == [("slot", "bemi_trial")]
    assert leftovers(db, in_use_publications=["dbz_publication"]) == [("slot", "bemi_local"), ("slot", "bemi_trial")]


def test_a_slot_with_a_checkpoint_is_in_use(db):
    db.slot("bemi_local")
    db.execute("CREATE PUBLICATION dbz_publication FOR ALL TABLES")
    existed = db.execute("SELECT to_regclass('bemi._bemi_worker_checkpoints') IS NOT NULL").fetchone()[0]
    db.execute("CREATE SCHEMA IF NOT EXISTS bemi")
    db.execute("""CREATE TABLE IF NOT EXISTS bemi._bemi_worker_checkpoints (
        source text NOT NULL, slot text NOT NULL, database text NOT NULL, commit_lsn pg_lsn NOT NULL, end_lsn pg_lsn NOT NULL,
        transaction_id bigint, committed_at timestamptz, changes bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (source, slot))""")
    db.execute("INSERT INTO bemi._bemi_worker_checkpoints (source, slot, database, commit_lsn, end_lsn) "
               "VALUES ('test/1', 'bemi_local', current_database(), '0/1', '0/1')")
    try:
        assert leftovers(db) == []  # our worker took the slot over: neither it nor its publication is a leftover
    finally:
        db.execute("DELETE FROM bemi._bemi_worker_checkpoints WHERE slot = 'bemi_local'")
        if not existed:
            db.execute("DROP TABLE bemi._bemi_worker_checkpoints")


def test_system_check_warns_with_what_to_drop(db):
    assert [m for m in run_checks(databases=["default"]) if m.id == "bemi.W015"] == []
    db.slot("bemi_local")
    messages = [m for m in run_checks(databases=["default"]) if m.id == "bemi.W015"]
    assert len(messages) == 1
    assert "inactive replication slot 'bemi_local'" in messages[0].msg
    assert "SELECT pg_catalog.pg_drop_replication_slot('bemi_local'::pg_catalog.name);" in messages[0].msg
    assert messages[0].level == 30  # WARNING
