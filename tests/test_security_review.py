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
        'INSERT INTO bemi.changes ("database", "schema", "table", "operation", "committed_at", '
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


PLANTED_IS_TRACKED = """
CREATE FUNCTION {schema}._bemi_is_tracked(rel regclass) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN true; END $$;
"""


@pytest.mark.parametrize("schema", ["hostile_schema", "public"])
def test_the_status_does_not_call_a_tracked_rule_function_another_role_planted(scene, schema):
    """bemi_status asks _bemi_is_tracked(regclass) which tables are tracked: only bemi's own."""
    from bemi import status

    if schema != "public":
        scene.hostile.execute(f"CREATE SCHEMA {schema}")  # the database's owner may
    scene.hostile.execute("CREATE TABLE public.app_table (id int PRIMARY KEY)")
    scene.hostile.execute(PLANTED_IS_TRACKED.format(schema=schema, escalate=ESCALATE.format(role=scene.role)))
    conn = status.connect(scene.server.dsn(scene.database))  # as a superuser, e.g. the worker's DSN
    try:
        result = status.collect(conn)
    finally:
        conn.close()
    assert not scene.escalated(), "bemi_status ran a function the hostile role planted"
    assert result.tables.tracked == 1  # app_table, by the built-in rule


def test_the_statement_a_leftover_slot_warning_recommends_does_not_run_planted_code(scene):
    """W015 / bemi_status tell a person to run a statement, typically as a superuser in psql."""
    from bemi.leftovers import find_leftovers

    scene.plant("CREATE FUNCTION public.pg_drop_replication_slot(text) RETURNS void LANGUAGE plpgsql AS $$"
                "BEGIN {escalate} END $$")
    scene.su.execute("SELECT pg_create_logical_replication_slot('bemi_old', 'pgoutput')")
    try:
        with scene.su.cursor() as cursor:
            (leftover,) = find_leftovers(cursor)
        assert leftover.name == "bemi_old"
        scene.su.execute(leftover.drop_sql)  # with the default search_path ("$user", public)
        assert not scene.escalated(), "the recommended statement ran the planted function"
        assert scene.su.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'bemi_old'"
                                ).fetchone()[0] == 0
    finally:
        scene.su.execute("SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = 'bemi_old'")


STATUS_PEAK = """
import resource, sys
from bemi import status
conn = status.connect(sys.argv[1])
result = status.collect(conn)
print(result.lag_seconds_source, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_the_status_peek_at_a_large_waiting_transaction_stays_small(scene):
    """bemi_status (a probe, run often) peeks at the first waiting transaction while no worker runs:
    what it holds must not grow with that transaction's size (here 120 rows of 1 MB each)."""
    import subprocess
    import sys

    dsn = scene.server.dsn(scene.database)
    scene.su.execute("CREATE TABLE public.big (id int PRIMARY KEY, body text)")
    scene.su.execute("CREATE PUBLICATION bemi FOR TABLE public.big")
    scene.su.execute("SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')")
    try:
        def peak() -> tuple[str, int]:
            out = subprocess.run([sys.executable, "-c", STATUS_PEAK, dsn], capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0, out.stderr
            source, mib = out.stdout.strip().rsplit(" ", 1)
            return source, int(mib)

        _source, baseline = peak()  # nothing waiting
        scene.su.execute("INSERT INTO public.big SELECT i, pg_catalog.repeat(i::text, 1000000 / length(i::text)) "
                         "FROM generate_series(1, 120) i")  # compressed in the WAL, 1 MB each decoded
        source, mib = peak()
        assert source == "the first waiting transaction"
        assert mib - baseline < 60, f"the status took {mib - baseline} MiB more to peek at a 120 MB transaction"
    finally:
        scene.su.execute("SELECT pg_catalog.pg_drop_replication_slot('bemi')")


def test_the_takeover_overlap_counts_the_bytes_it_really_holds():
    """--takeover-memory bounds Overlap.nbytes: it must be what its arrays hold (counts were 8 bytes, not 4)."""
    from bemi.worker.takeover import BYTES_PER_KEY, Overlap

    overlap = Overlap()
    for position in range(1000):
        overlap.add(position, "public", "t", "CREATE", 3)
    held = sum(a.itemsize * len(a) for a in (overlap.positions, overlap.tags, overlap.counts))
    assert overlap.nbytes == held == 1000 * BYTES_PER_KEY
    assert overlap.stored(999, "public", "t", "CREATE") == 3


SQUAT_TRIGGER = """
CREATE FUNCTION public.squat() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN NEW; END $$;
CREATE TRIGGER squat BEFORE INSERT OR UPDATE ON bemi._bemi_worker_checkpoints
  FOR EACH ROW EXECUTE FUNCTION public.squat();
"""


def test_the_worker_refuses_bookkeeping_tables_another_role_created_first(scene):
    """A role that may CREATE in public makes the worker's tables before its first start (same names,
    CREATE TABLE IF NOT EXISTS then keeps them) with a trigger: every commit of the worker ran it. (Now in
    schema bemi, which the database's owner may create first: the schema itself is refused.)"""
    from datetime import datetime, timezone

    from bemi import sql
    from bemi.worker import pgoutput as po
    from bemi.worker.errors import WorkerError
    from bemi.worker.sink import Sink

    scene.hostile.execute("SET search_path = pg_catalog, pg_temp")
    scene.hostile.execute(sql.read("changes.sql"))
    scene.hostile.execute(sql.read("worker.sql"))
    scene.plant(SQUAT_TRIGGER)
    sink = Sink(scene.server.dsn(scene.database), "bemi", scene.database, "test/1")
    refused = None
    try:
        sink.ensure_tables()
        sink.commit(po.Commit(0, 100, 200, datetime.now(timezone.utc)), 1, 0)  # the worker's first commit
    except WorkerError as exc:
        refused = str(exc)
    finally:
        sink.close()
    assert not scene.escalated(), "the worker's commit ran a trigger the hostile role put on its table"
    assert refused is not None and f"owned by role {scene.role!r}" in refused
    assert "schema bemi" in refused and "bemi_grants" in refused


SQUAT_VIEW = """
CREATE FUNCTION public.squat_slot() RETURNS text LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN 'bemi_x'; END $$;
CREATE SCHEMA bemi;
CREATE VIEW bemi._bemi_worker_checkpoints AS
  SELECT public.squat_slot() AS slot, pg_catalog.current_database()::text AS database,
         '0/1'::pg_lsn AS commit_lsn, '0/2'::pg_lsn AS end_lsn, NULL::timestamptz AS committed_at,
         NULL::timestamptz AS updated_at, ''::text AS source;
CREATE VIEW bemi._bemi_worker_failures AS SELECT public.squat_slot() AS slot;
"""


def test_bemi_status_and_the_leftover_check_do_not_read_bookkeeping_another_role_made(scene):
    """A view under the name of bemi's checkpoint table runs its owner's function as whoever reads it:
    bemi_status (often a superuser), `manage.py check` (W015) and the worker's start (leftovers)."""
    from bemi import status
    from bemi.leftovers import find_leftovers

    scene.plant(SQUAT_VIEW)
    with scene.su.cursor() as cursor:
        find_leftovers(cursor)
    assert not scene.escalated(), "looking for leftover slots read the hostile view"
    conn = status.connect(scene.server.dsn(scene.database))
    try:
        result = status.collect(conn)
    finally:
        conn.close()
    assert not scene.escalated(), "bemi_status read the hostile view"
    assert result.checkpoint is None
    assert any("schema bemi" in w and scene.role in w for w in result.warnings)


SQUAT_PRUNED = """
CREATE FUNCTION public.squat_pruned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN NEW; END $$;
CREATE TRIGGER squat BEFORE INSERT ON bemi._bemi_pruned FOR EACH ROW EXECUTE FUNCTION public.squat_pruned();
"""


def test_bemi_prune_refuses_bookkeeping_another_role_made(scene):
    """bemi_prune (run by an administrator) records what it pruned in bemi._bemi_pruned."""
    import os
    import subprocess
    import sys

    from bemi import sql
    from tests.test_security_sql import ROOT

    scene.hostile.execute("SET search_path = pg_catalog, pg_temp")
    scene.hostile.execute(sql.read("changes.sql"))  # partitioned changes, changes_default, _bemi_pruned
    scene.hostile.execute("INSERT INTO bemi.changes (\"database\", \"schema\", \"table\", operation, committed_at, "
                          "transaction_id, \"position\", commit_position, change_index) "
                          "VALUES ('d', 'public', 't', 'CREATE', '2001-01-01', 1, 1, 1, 0)")
    scene.plant(SQUAT_PRUNED)
    result = subprocess.run(
        [sys.executable, "-m", "django", "bemi_prune", "--before", "2020-01-01"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BEMI_TEST_DB_NAME": scene.database},
    )
    assert not scene.escalated(), "bemi_prune ran a trigger the hostile role put on _bemi_pruned"
    assert result.returncode != 0 and f"owned by role {scene.role!r}" in result.stderr, result.stderr


SQUAT_TRACKING = """
CREATE TABLE public._bemi_tracking (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  rules jsonb NOT NULL DEFAULT '{{"schemas": ["^(?:public)$"], "ignored_tables": []}}',
  settings jsonb NOT NULL DEFAULT '{{}}', own_tables oid[] NOT NULL DEFAULT '{{}}', generated_key bytea,
  updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(), updated_by text NOT NULL DEFAULT 'default');
CREATE FUNCTION public.squat_tracking() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN NEW; END $$;
CREATE TRIGGER squat BEFORE INSERT OR UPDATE ON public._bemi_tracking
  FOR EACH ROW EXECUTE FUNCTION public.squat_tracking();
"""


def test_installing_as_superuser_over_a_tracking_table_another_role_made_runs_nothing_of_it(scene):
    """tracking.sql (what migrate bemi runs first) kept a public._bemi_tracking another role made first
    (CREATE TABLE IF NOT EXISTS) and inserted into it, running that role's trigger as the superuser."""
    from bemi import sql

    scene.plant(SQUAT_TRACKING)
    with pytest.raises(psycopg.Error, match=f"table public._bemi_tracking \\(owner {scene.role}\\)"):
        scene.su.execute(sql.read("tracking.sql"))
    assert not scene.escalated(), "the install ran a trigger the hostile role put on its _bemi_tracking"


def test_the_worker_refuses_a_tracking_table_another_role_made(scene):
    """The worker writes its flags and masking key into public._bemi_tracking of the source."""
    from bemi.worker.errors import WorkerError
    from bemi.worker.session import connect
    from bemi.worker.tracked import TrackedTables

    from bemi import tracking

    scene.plant(SQUAT_TRACKING)
    control = connect(scene.server.dsn(scene.database), "source")
    try:
        tracked = TrackedTables(control, "postgres")
        tracked.ensure_rule()  # reads it (a plain table runs nothing of its owner on SELECT), writes nothing
        assert tracked.writable is False
        tracked.load(tracking.Tracking.build(ignored_tables=["other"]))  # flags it would have stored
        tracked.register_own_tables(control)
        with pytest.raises(WorkerError, match="BEMI_MASKING_KEY"):
            tracked.masking_key(None)  # it would have kept a random key there
    finally:
        control.close()
    assert not scene.escalated(), "the worker ran a trigger the hostile role put on its _bemi_tracking"


PLANTED_ARRAY_CAT = """
CREATE FUNCTION public.hostile_cat(oid[], oid[]) RETURNS oid[] LANGUAGE plpgsql AS $$
BEGIN {escalate} RETURN pg_catalog.array_cat($1, $2); END $$;
CREATE OPERATOR public.|| (LEFTARG = oid[], RIGHTARG = oid[], FUNCTION = public.hostile_cat);
"""


def test_migrate_bemi_storing_the_tracking_settings_does_not_pick_up_a_planted_operator(scene):
    """migrate bemi registers bemi's own tables in _bemi_tracking through Django's connection (the
    application's search_path, with public): oid[] || oid[] preferred a planted exact match."""
    import os
    import subprocess
    import sys

    from tests.test_security_sql import ROOT

    scene.plant(PLANTED_ARRAY_CAT)
    result = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "bemi"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BEMI_TEST_DB_NAME": scene.database},
    )
    assert result.returncode == 0, result.stderr
    assert not scene.escalated(), "migrate bemi ran the planted operator as superuser"
