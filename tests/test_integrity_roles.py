"""Issue 18, rows 1-5 and 11: the application's role against the stored history, on a real cluster.

The roles docs/security.md recommended before: the application's role owns the
database (so, on PostgreSQL 15+, schema public through pg_database_owner); the
worker's role has REPLICATION and membership in the application's role; a third
role has LOGIN only. Each test sets that up, runs ``manage.py bemi_grants`` as a
superuser where the attack says "after bemi_grants", performs the attack as the
attacker would, and asserts it fails. Every one of them failed on main before
schema ``bemi`` (bemi/tables.py) and the catalog trust of bemi/trust.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from bemi import sql as bemi_sql
from bemi_devtools.legacy import PREVIOUS_CHANGES
from bemi.worker.runner import Config, Worker
from tests.test_security_sql import ESCALATE

ROOT = Path(__file__).resolve().parent.parent
DENIED = (psycopg.errors.InsufficientPrivilege,)


class Roles:
    """A database owned by the application's role, and connections as each role."""

    def __init__(self, server) -> None:
        self.server = server
        suffix = uuid.uuid4().hex[:8]
        self.app, self.worker, self.other = f"app_{suffix}", f"worker_{suffix}", f"other_{suffix}"
        self.database = f"integrity_{suffix}"
        self.databases = [self.database]
        self.slot = f"bemi_{suffix}"
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{self.app}" LOGIN NOSUPERUSER')
            conn.execute(f'CREATE ROLE "{self.worker}" LOGIN REPLICATION NOSUPERUSER')
            conn.execute(f'CREATE ROLE "{self.other}" LOGIN NOSUPERUSER')
            conn.execute(f'GRANT "{self.app}" TO "{self.worker}"')  # the recommended set-up before issue 18
            conn.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.app}"')
        self.su = self.connect(self.database)
        self.su.execute(bemi_sql.read("tracking.sql"))
        self.su.execute(bemi_sql.read("install.sql"))  # the event triggers, as docs/security.md says
        self.su.execute(f'GRANT CREATE ON DATABASE "{self.database}" TO "{self.worker}"')
        self.su.execute(f'GRANT SELECT, UPDATE ON public._bemi_tracking TO "{self.worker}"')
        self.app_conn = self.connect(self.database, self.app)

    def connect(self, database: str, user: str | None = None) -> psycopg.Connection:
        return psycopg.connect(self.server.dsn(database, user=user), autocommit=True)

    def audit_database(self) -> str:
        """A separate destination database, owned by the application's role too."""
        name = f"{self.database}_audit"
        with psycopg.connect(self.server.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{self.app}"')
            conn.execute(f'GRANT CREATE ON DATABASE "{name}" TO "{self.worker}"')
        self.databases.append(name)
        return name

    def run_worker(self, destination: str | None = None, **overrides) -> Worker:
        dest = self.server.dsn(destination, user=self.worker) if destination else None
        worker = Worker(Config(source_dsn=self.server.dsn(self.database, user=self.worker), destination_dsn=dest,
                               slot=self.slot, publication="bemi", once=True, **overrides))
        assert worker.run() == 0
        return worker

    def manage(self, *args: str, destination: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "BEMI_TEST_DB_NAME": self.database}
        if destination:  # the alias `bemi` and BemiDatabaseRouter (tests/settings.py)
            env["BEMI_TEST_ROUTER"] = destination
        return subprocess.run([sys.executable, "-m", "django", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env=env)

    def grants(self, destination: str | None = None) -> None:
        result = self.manage("bemi_grants", "--app-role", self.app, "--worker-role", self.worker,
                             destination=destination)
        assert result.returncode == 0, result.stderr

    def escalated(self, role: str) -> bool:
        return self.su.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [role]).fetchone()[0]

    def changes_table(self, conn: psycopg.Connection) -> str:
        """Where the worker keeps changes, found through the catalog (public before issue 18)."""
        return conn.execute("SELECT c.oid::regclass::text FROM pg_class c WHERE c.relname = 'changes' "
                            "AND c.relkind = 'p'").fetchone()[0]

    def partitions(self, conn: psycopg.Connection) -> dict[str, bool]:
        """Partitions of changes: qualified name -> is the DEFAULT one."""
        return dict(conn.execute(
            "SELECT i.inhrelid::regclass::text, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE p.relname = 'changes' AND p.relkind = 'p'").fetchall())

    def close(self) -> None:
        self.su.close()
        self.app_conn.close()
        with psycopg.connect(self.server.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s", [self.slot])
            for name in reversed(self.databases):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for role in (self.worker, self.other, self.app):
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture
def roles(pg_server):
    r = Roles(pg_server)
    yield r
    r.close()


def _record_something(roles: Roles) -> None:
    roles.app_conn.execute("CREATE TABLE IF NOT EXISTS public.orders (id int PRIMARY KEY, total int)")
    roles.run_worker()
    roles.app_conn.execute("INSERT INTO public.orders VALUES (1, 10) ON CONFLICT DO NOTHING")
    roles.run_worker()


def test_row_1_the_application_cannot_drop_detach_or_rewrite_stored_changes(roles):
    """Row 1: after bemi_grants, `DROP TABLE public.changes_p20261201` removed the month's history."""
    _record_something(roles)
    roles.grants()
    app = roles.app_conn
    changes = roles.changes_table(roles.su)
    stored = roles.su.execute(f"SELECT count(*) FROM {changes}").fetchone()[0]
    assert stored >= 1
    month = next(name for name, default in roles.partitions(roles.su).items() if not default)
    default = next(name for name, default in roles.partitions(roles.su).items() if default)
    for statement in (f"DROP TABLE {month}", f"DROP TABLE {default}", f"DROP TABLE {changes} CASCADE",
                      f"ALTER TABLE {changes} DETACH PARTITION {month}", f"ALTER TABLE {month} RENAME TO gone",
                      f"ALTER TABLE {changes} OWNER TO {roles.app}", f"TRUNCATE {changes}",
                      f"DELETE FROM {changes}", f"UPDATE {changes} SET context = '{{}}'",
                      f"UPDATE {month} SET context = '{{}}'", f"ALTER TABLE {month} DISABLE TRIGGER ALL",
                      f"DROP SCHEMA {changes.split('.')[0]} CASCADE"):
        with pytest.raises(DENIED):
            app.execute(statement)
    assert roles.su.execute(f"SELECT count(*) FROM {changes}").fetchone()[0] == stored
    # ... and it still reads them (BemiChange's table)
    assert app.execute(f"SELECT count(*) FROM {changes}").fetchone()[0] == stored


def test_row_2_the_application_cannot_swap_changes_for_its_own_table(roles):
    """Row 2: app dropped changes and made its own; the worker (a member of app) wrote into it."""
    _record_something(roles)
    roles.grants()
    app = roles.app_conn
    changes = roles.changes_table(roles.su)
    with pytest.raises(DENIED):
        app.execute(f"DROP TABLE {changes} CASCADE")
    # Its own `changes` wherever it may create one: never the worker's.
    app.execute("CREATE TABLE IF NOT EXISTS public.changes (LIKE pg_catalog.pg_class)")
    with pytest.raises(DENIED):
        app.execute("CREATE TABLE bemi.forged (id int)")
    assert roles.su.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", [roles.worker, roles.app]).fetchone()[0] is False
    app.execute("INSERT INTO public.orders VALUES (2, 20)")
    roles.run_worker()
    assert roles.su.execute(f"SELECT count(*) FROM {changes} WHERE primary_key = '2'").fetchone()[0] == 1
    assert roles.changes_table(roles.su) == changes


def test_row_3_a_view_planted_as_the_default_partition_never_runs(roles):
    """Row 3: app dropped changes_default and planted a view whose function ran as the worker."""
    _record_something(roles)
    roles.grants()
    app = roles.app_conn
    default = next(name for name, is_default in roles.partitions(roles.su).items() if is_default)
    schema = default.split(".")[0] if "." in default else "public"
    app.execute("CREATE FUNCTION public.steal() RETURNS SETOF int LANGUAGE plpgsql AS $$ BEGIN "
                f"{ESCALATE.format(role=roles.app)} RETURN; END $$")
    with pytest.raises(DENIED):
        app.execute(f"DROP TABLE {default}")
    with pytest.raises(DENIED):
        app.execute(f"CREATE VIEW {schema}.changes_default_planted AS SELECT * FROM public.steal()")
    roles.run_worker(maintenance_interval=0)
    assert not roles.escalated(roles.app)
    assert roles.su.execute("SELECT relowner::regrole::text FROM pg_class WHERE oid = %s::regclass",
                            [roles.changes_table(roles.su)]).fetchone()[0] == roles.worker


def test_row_4_a_separate_destination_is_set_up_and_its_dead_letters_are_the_workers(roles):
    """Row 4: in a separate audit database, _bemi_worker_failures was not handed over by bemi_grants and a
    trigger app put on it ran as the worker at the next dead letter."""
    audit = roles.audit_database()
    roles.app_conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, total int)")
    roles.run_worker(destination=audit)
    roles.grants(destination=audit)
    with roles.connect(audit) as su, roles.connect(audit, roles.app) as app:
        failures = su.execute("SELECT c.oid::regclass::text, c.relowner::regrole::text FROM pg_class c "
                              "WHERE c.relname = '_bemi_worker_failures'").fetchall()
        assert len(failures) == 1 and failures[0][1] == roles.worker
        table = failures[0][0]
        app.execute("CREATE FUNCTION public.on_failure() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    f"{ESCALATE.format(role=roles.app)} RETURN NEW; END $$")
        for statement in (f"DROP TABLE {table}",
                          f"CREATE TRIGGER t BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION public.on_failure()",
                          f"ALTER TABLE {table} RENAME TO gone"):
            with pytest.raises(DENIED):
                app.execute(statement)
        # A planted one in public is not the worker's and is never written.
        app.execute("CREATE TABLE public._bemi_worker_failures (id int)")
        app.execute("CREATE TRIGGER t BEFORE INSERT ON public._bemi_worker_failures FOR EACH ROW "
                    "EXECUTE FUNCTION public.on_failure()")
        su.execute(f"INSERT INTO {table} (source, slot, database, change, error) VALUES ('s', 'x', 'd', '', 'e')")
    roles.app_conn.execute("INSERT INTO public.orders VALUES (1, 10)")
    roles.run_worker(destination=audit)
    assert not roles.escalated(roles.app)
    with roles.connect(audit) as su:
        assert su.execute(f"SELECT count(*) FROM {roles.changes_table(su)}").fetchone()[0] == 1


def test_row_5_a_planted_conversion_state_does_not_run_as_whoever_converts(roles):
    """Row 5: a view _bemi_changes_conversion in the destination's public made bemi_partition "resume" and run
    its function as whoever converts (a superuser: escalation)."""
    roles.su.execute(PREVIOUS_CHANGES)  # an unpartitioned changes of an earlier version (its worker a superuser)
    roles.su.execute(f'GRANT CREATE ON SCHEMA public TO "{roles.other}"')
    with roles.connect(roles.database, roles.other) as other:
        other.execute("CREATE FUNCTION public.next_page() RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
                      f"{ESCALATE.format(role=roles.other)} RETURN 0; END $$")
        other.execute("CREATE VIEW public._bemi_changes_conversion AS SELECT public.next_page() AS next_page, "
                      "0::int8 AS total_pages, 0::int8 AS copied")
    result = roles.manage("bemi_partition")  # as a superuser
    assert not roles.escalated(roles.other), result.stdout + result.stderr
    assert result.returncode == 0, result.stderr
    assert "resuming" not in result.stdout
    assert roles.su.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass",
                            [roles.changes_table(roles.su)]).fetchone()[0] == "p"


def test_row_11_a_new_table_is_recorded_from_the_transaction_that_creates_it(roles):
    """Row 11: with the worker owning the publication, a table the application created was published only at
    the worker's next refresh: rows written before (swap a table for an edited copy) had no history."""
    _record_something(roles)
    roles.grants()
    roles.run_worker()
    app = roles.app_conn
    with app.transaction():  # the edit and the swap in one transaction, before any refresh of the worker
        app.execute("CREATE TABLE public.orders_copy (LIKE public.orders INCLUDING ALL)")
        app.execute("INSERT INTO public.orders_copy SELECT id, total * 100 FROM public.orders")
        app.execute("DROP TABLE public.orders")
        app.execute("ALTER TABLE public.orders_copy RENAME TO orders")
    app.execute("INSERT INTO public.orders VALUES (3, 30)")
    roles.run_worker()
    changes = roles.changes_table(roles.su)
    recorded = roles.su.execute(f"SELECT \"table\", operation, after->>'total' FROM {changes} "
                                "WHERE \"table\" IN ('orders', 'orders_copy') ORDER BY commit_position, change_index"
                                ).fetchall()
    assert recorded == [("orders", "CREATE", "10"), ("orders_copy", "CREATE", "1000"), ("orders", "CREATE", "30")]
    # Neither the application's role nor the worker's may change what the publication holds.
    for conn in (app, roles.connect(roles.database, roles.worker)):
        with pytest.raises(DENIED):
            conn.execute("ALTER PUBLICATION bemi SET (publish = 'insert')")
        with pytest.raises(DENIED):
            conn.execute("DROP PUBLICATION bemi")


def test_row_11_changing_what_is_tracked_is_itself_recorded(roles):
    """What is tracked lives in public._bemi_tracking: the application's role (migrate bemi) may change it,
    and that change is on the record (never the masking key kept there)."""
    _record_something(roles)
    roles.su.execute(f'ALTER TABLE public._bemi_tracking OWNER TO "{roles.app}"')  # as its `migrate bemi` makes it
    roles.run_worker()  # reads the settings of a table the application's role owns, writes nothing there
    roles.grants()
    roles.run_worker()
    roles.app_conn.execute("""UPDATE public._bemi_tracking SET rules = jsonb_set(rules, '{ignored_tables}',
                              rules->'ignored_tables' || '[["^(?:public)$", "^(?:orders)$"]]')""")
    with pytest.raises(DENIED):
        roles.app_conn.execute("SELECT generated_key FROM public._bemi_tracking")
    roles.run_worker()
    changes = roles.changes_table(roles.su)
    (before, after), = roles.su.execute(f"SELECT before, after FROM {changes} WHERE \"table\" = '_bemi_tracking' "
                                        "AND operation = 'UPDATE' AND after::text LIKE '%orders%'").fetchall()
    assert "orders" not in str(before["rules"]) and "orders" in str(after["rules"])
    for side in (before, after):  # the worker's masking key, stored there by its first start: masked
        assert side["generated_key"].startswith("bemi-masked:")


def _insert_legacy_row(conn: psycopg.Connection) -> None:
    conn.execute("""INSERT INTO public.changes ("database", "schema", "table", primary_key, operation, committed_at,
                    transaction_id, "position", commit_position, change_index)
                    VALUES ('d', 'public', 'orders', '9', 'CREATE', now(), 1, 1, 1, 0)""")


def test_an_earlier_versions_changes_moves_into_the_workers_schema(roles):
    """Upgrade: public.changes made by the worker's role moves at its start; one a superuser made (a worker
    once run as one) waits for bemi_grants, which moves it; one the application's role made is not bemi's."""
    from bemi.worker.errors import WorkerError

    roles.su.execute(PREVIOUS_CHANGES)
    _insert_legacy_row(roles.su)
    with pytest.raises(WorkerError, match="bemi_grants"):  # a superuser's: this role may not move it
        roles.run_worker()
    roles.grants()
    roles.run_worker()
    assert roles.su.execute("SELECT to_regclass('public.changes')").fetchone()[0] is None
    assert roles.su.execute("SELECT relowner::regrole::text, (SELECT count(*) FROM bemi.changes) FROM pg_class "
                            "WHERE oid = 'bemi.changes'::regclass").fetchone() == (roles.worker, 1)


def test_the_workers_own_earlier_changes_moves_at_its_start_and_a_foreign_one_stays(roles):
    roles.su.execute(PREVIOUS_CHANGES)
    roles.su.execute(f'ALTER TABLE public.changes OWNER TO "{roles.worker}"')  # made by the worker back then
    _insert_legacy_row(roles.su)
    roles.run_worker()
    assert roles.su.execute("SELECT count(*) FROM bemi.changes WHERE primary_key = '9'").fetchone()[0] == 1
    assert roles.su.execute("SELECT to_regclass('public.changes')").fetchone()[0] is None
    # The application's role makes a `changes` of its own in its public: not bemi's, never used.
    roles.app_conn.execute("CREATE TABLE public.changes (id int)")
    roles.run_worker()
    assert roles.su.execute("SELECT count(*) FROM bemi.changes WHERE primary_key = '9'").fetchone()[0] == 1


def test_a_schema_the_application_made_first_never_stops_a_running_worker(roles, caplog):
    """Before bemi_grants, the database's owner creates schema bemi first (squatting it): the worker
    exited with status 2, and a fresh install then recorded nothing until someone restarted it. It now
    never uses that schema, says so at every attempt, shows it (bemi_worker_blocked 1, /healthz 503
    "blocked: ..."), keeps every change from then on in the slot it makes, and stores them once a
    superuser's bemi_grants has set the schema aside, without a restart."""
    import logging
    import threading
    import time
    import urllib.error
    import urllib.request

    from bemi.worker.metrics import MetricsServer

    app = roles.app_conn
    app.execute("CREATE SCHEMA bemi")
    app.execute("CREATE TABLE public.orders (id int PRIMARY KEY, total int)")
    caplog.set_level(logging.INFO, logger="bemi.worker")
    worker = Worker(Config(source_dsn=roles.server.dsn(roles.database, user=roles.worker), slot=roles.slot,
                           publication="bemi", backoff_initial=0.05, backoff_max=0.3, poll_interval=0.05))
    metrics = MetricsServer(worker.stats, port=0).start()
    url = "http://%s:%d" % metrics.address
    exit_code: list[int] = []
    thread = threading.Thread(target=lambda: exit_code.append(worker.run()), daemon=True)
    thread.start()

    def wait_for(predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert thread.is_alive(), f"the worker stopped: {exit_code} {caplog.text[-2000:]}"
            assert time.monotonic() < deadline, (caplog.text[-2000:], roles.su.execute(
                "SELECT \"table\", operation, after::text FROM bemi.changes").fetchall(), roles.su.execute(
                "SELECT pubname, puballtables, tablename FROM pg_publication LEFT JOIN pg_publication_tables "
                "USING (pubname)").fetchall())
            time.sleep(0.05)

    def orders() -> int:
        return roles.su.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE n.nspname = 'bemi' AND c.relname = 'changes'").fetchone()[0] and \
            roles.su.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'orders'").fetchone()[0]

    try:
        wait_for(lambda: caplog.text.count("refusing to write to bemi's tables") >= 3)  # said at every attempt
        assert "schema bemi" in worker.stats.blocked and "bemi_grants" in worker.stats.blocked
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(url + "/healthz", timeout=5)
        assert health.value.code == 503 and health.value.read().decode().startswith("blocked: ")
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            assert "bemi_worker_blocked 1.0" in response.read().decode()
        # The worker wrote nothing into the squatted schema; its slot keeps what is written meanwhile.
        assert roles.su.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE n.nspname = 'bemi'").fetchone()[0] == 0
        assert roles.su.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                                [roles.slot]).fetchone()[0] == 1
        app.execute("INSERT INTO public.orders VALUES (1, 10)")
        roles.grants()  # the superuser sets the schema aside and makes it again for the worker
        wait_for(lambda: orders() == 1)
        app.execute("INSERT INTO public.orders VALUES (2, 20)")
        wait_for(lambda: orders() == 2)
        assert worker.stats.blocked == "" and "no longer blocked" in caplog.text
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            assert "bemi_worker_blocked 0.0" in response.read().decode()
    finally:
        worker.stop()
        thread.join(30)
        metrics.stop()
    assert exit_code == [0]
    assert roles.su.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bemi\\_untrusted\\_%'"
                            ).fetchone()[0] == 1


def test_a_publication_the_application_made_first_does_not_decide_what_is_recorded(roles):
    """Before bemi_grants, the database's owner makes publication bemi first, of one harmless table: the
    worker used it as it was and recorded nothing else (every write to orders went unrecorded, silently).
    It now refuses a publication another role owns (blocked, saying what to run); bemi_grants makes it
    again as the superuser's, and then every tracked table is recorded."""
    from bemi.worker.errors import Blocked

    app = roles.app_conn
    app.execute("CREATE TABLE public.orders (id int PRIMARY KEY, total int)")
    app.execute("CREATE TABLE public.harmless (id int PRIMARY KEY)")
    app.execute("CREATE PUBLICATION bemi FOR TABLE public.harmless")
    with pytest.raises(Blocked, match="publication bemi.*bemi_grants"):  # was: used as it was
        roles.run_worker()
    roles.grants()
    roles.run_worker()
    app.execute("INSERT INTO public.orders VALUES (1, 10)")
    app.execute("INSERT INTO public.harmless VALUES (1)")
    roles.run_worker()
    assert roles.su.execute("SELECT \"table\" FROM bemi.changes WHERE \"table\" IN ('orders', 'harmless') "
                            "ORDER BY 1").fetchall() == [("harmless",), ("orders",)]


def test_a_schema_the_application_made_first_is_refused_then_set_aside_by_bemi_grants(roles):
    """The database's owner may create schema bemi before the worker's first start, with a table the worker
    would write to: the worker refuses it and says what to run; bemi_grants sets it aside."""
    from bemi.worker.errors import WorkerError

    app = roles.app_conn
    app.execute("CREATE SCHEMA bemi")
    app.execute(bemi_sql.read("worker.sql"))
    app.execute("CREATE FUNCTION public.squat() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"{ESCALATE.format(role=roles.app)} RETURN NEW; END $$")
    app.execute("CREATE TRIGGER squat BEFORE INSERT OR UPDATE ON bemi._bemi_worker_checkpoints "
                "FOR EACH ROW EXECUTE FUNCTION public.squat()")
    app.execute("CREATE TABLE public.orders (id int PRIMARY KEY, total int)")
    with pytest.raises(WorkerError, match="schema bemi .*bemi_grants"):
        roles.run_worker()
    roles.grants()
    roles.run_worker()
    app.execute("INSERT INTO public.orders VALUES (1, 10), (2, 20)")
    roles.run_worker()
    assert not roles.escalated(roles.app) and not roles.escalated(roles.worker)
    assert roles.su.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'bemi'"
                            ).fetchone()[0] == roles.worker
    assert roles.su.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bemi\\_untrusted\\_%'"
                            ).fetchone()[0] == 1
    assert roles.su.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'orders'").fetchone()[0] == 2
