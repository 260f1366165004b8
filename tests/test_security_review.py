"""Attacks found in the review of this round's work (issue 9's rules), run on the real cluster.

As in test_security_sql.py: a hostile role that may CREATE in schema public (and,
owning the database, create schemas) plants a function or an operator, then waits
for a privileged role to run bemi's code; each attack "wins" by making the hostile
role superuser, and every test asserts it did not.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.test_security_sql import ESCALATE, PLANTED_EQUALS, Scene

# changes.sql and worker.sql once ran with search_path = public, pg_catalog, pg_temp:
# a function of public then hides pg_catalog's of the same signature (now() and
# gen_random_uuid() became the defaults of `changes`, run on every row the worker writes).
PLANTED_DEFAULTS = """
CREATE FUNCTION public.gen_random_uuid() RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN pg_catalog.gen_random_uuid(); END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN pg_catalog.now(); END $$;
"""


@pytest.fixture
def scene(pg_server):
    s = Scene(pg_server)
    yield s
    s.close()


def _changes_row(conn: psycopg.Connection) -> None:
    """A row written the way the worker's COPY writes it: id, queued_at and created_at from the defaults."""
    conn.execute(
        'INSERT INTO public.changes ("database", "schema", "table", "operation", "committed_at", '
        '"transaction_id", "position", "commit_position", "change_index") '
        "VALUES ('d', 'public', 't', 'CREATE', pg_catalog.now(), 1, 1, 1, 0)")


@pytest.mark.parametrize("plant", [PLANTED_EQUALS, PLANTED_DEFAULTS], ids=["operator =(oid, regclass)", "now()"])
def test_the_worker_creating_its_tables_does_not_pick_up_planted_code(scene, plant):
    from bemi.worker.sink import Sink

    scene.plant(plant)
    sink = Sink(scene.server.dsn(scene.database), "bemi", scene.database, "test/1")
    try:
        sink.ensure_tables()  # the worker's first start on this destination, as a superuser
    finally:
        sink.close()
    assert not scene.escalated(), "creating the worker's tables ran the planted code"
    _changes_row(scene.su)
    assert not scene.escalated(), "a default of changes calls the planted function"
    defaults = {r[0] for r in scene.su.execute(
        "SELECT p.oid::regprocedure::text FROM pg_depend d JOIN pg_proc p ON p.oid = d.refobjid "
        "WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_proc'::regclass "
        "AND p.pronamespace <> 'pg_catalog'::regnamespace")}
    assert defaults == set(), f"defaults depend on functions outside pg_catalog: {defaults}"
