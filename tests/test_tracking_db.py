"""What is tracked, end to end on a real PostgreSQL: settings -> triggers, publication, worker, `changes`."""

from __future__ import annotations

import json
import uuid

import pytest
from django.core.management import call_command

from bemi import tracking as tr

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def env(worker_env):  # noqa: F811
    """worker_env, with the stored tracking settings and the triggers put back afterwards."""
    saved = worker_env.execute("SELECT rules::text, settings::text FROM public._bemi_tracking")[0]
    made: list[str] = []
    worker_env.made = made
    try:
        yield worker_env
    finally:
        for statement in reversed(made):
            worker_env.execute(statement)
        worker_env.execute("UPDATE public._bemi_tracking SET rules = %s::jsonb, settings = %s::jsonb", saved)
        worker_env.execute("CALL _bemi_create_triggers()")


def name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def published(env) -> set[tuple[str, str]]:
    return {tuple(r) for r in env.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", [env.publication])}


def has_trigger(env, table: str) -> bool:
    return bool(env.execute("SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal "
                            "AND tgname LIKE '\\_bemi\\_row\\_trigger\\_%%'", [table]))


def test_sql_rule_and_python_rule_agree(env):
    """One translation, read alike by PostgreSQL (`~`), Python (`re`) and as fnmatch means it."""
    import fnmatch
    import re

    names = ["todo", "todo_1", "Todo", "log.x", "a+b(c)", "x[1]", "audit_2024", "t1", "tx", "t^", "a\\b", "ü"]
    globs = ["todo", "todo_?", "Todo", "log.x*", "a+b(c)", "audit_*", "t[0-9]", "t[!0-9]", "*", "x[[]1]",
             "t[]^]", "a\\b", "?"]
    for glob in globs:
        regex = tr.glob_to_regex(glob)
        for candidate in names:
            (in_sql,) = env.execute("SELECT %s::text ~ %s::text", [candidate, regex])[0]
            expected = fnmatch.fnmatchcase(candidate, glob)
            assert in_sql == bool(re.match(regex, candidate, re.DOTALL)) == expected, (glob, candidate)


def test_ignored_tables_get_no_trigger_no_publication_no_changes(env):
    noise, kept = name("noise"), name("kept")
    env.execute(f"CREATE TABLE {noise} (id int PRIMARY KEY, v int); CREATE TABLE {kept} (id int PRIMARY KEY)")
    env.made.append(f"DROP TABLE {noise}, {kept}")
    env.run_once()
    assert ("public", noise) in published(env) and has_trigger(env, noise)
    # BEMI_IGNORED_TABLES: takes effect on the worker's next start (publication and triggers in line)
    env.run_once(tracking=tr.Tracking.build(ignored_tables=["noise_*"]))
    assert ("public", noise) not in published(env) and ("public", kept) in published(env)
    assert not has_trigger(env, noise) and has_trigger(env, kept)
    env.execute(f"INSERT INTO {noise} VALUES (1, 1); INSERT INTO {kept} VALUES (1)")
    env.run_once()  # without flags: the settings the previous start stored
    assert [r["table"] for r in env.changes()] == [kept]


def test_django_session_is_ignored_by_default_and_the_opt_out_tracks_it(env):
    env.run_once()
    assert ("public", "django_session") not in published(env) and not has_trigger(env, "django_session")
    env.run_once(tracking=tr.Tracking.build(unsafe_track_builtins=["django_session"]))
    assert ("public", "django_session") in published(env) and has_trigger(env, "django_session")


def test_a_publication_the_user_made_is_used_as_it_is(env):
    mine, other = name("mine"), name("other")
    env.execute(f"CREATE TABLE {mine} (id int PRIMARY KEY); CREATE TABLE {other} (id int PRIMARY KEY)")
    env.made.append(f"DROP TABLE {mine}, {other}")
    env.execute(f'CREATE PUBLICATION "{env.publication}" FOR TABLE {mine}')
    env.run_once()
    assert published(env) == {("public", mine)}  # not widened
    env.execute(f"INSERT INTO {mine} VALUES (1); INSERT INTO {other} VALUES (1)")
    env.run_once()
    assert [r["table"] for r in env.changes()] == [mine]


def test_a_user_publication_for_all_tables_still_records_only_tracked_tables(env):
    noise = name("noise")
    env.execute(f"CREATE TABLE {noise} (id int PRIMARY KEY)")
    env.made.append(f"DROP TABLE {noise}")
    env.execute(f'CREATE PUBLICATION "{env.publication}" FOR ALL TABLES')
    env.run_once(tracking=tr.Tracking.build(ignored_tables=["noise_*"]))
    env.execute(f"INSERT INTO {noise} VALUES (1)")
    env.execute("INSERT INTO django_session VALUES ('secretkey', 'data', now())")
    env.made.append("DELETE FROM django_session WHERE session_key = 'secretkey'")
    env.run_once()
    assert env.changes() == []
    kept = name("kept")
    env.execute(f"CREATE TABLE {kept} (id int PRIMARY KEY); INSERT INTO {kept} VALUES (1)")
    env.made.append(f"DROP TABLE {kept}")
    env.run_once()
    env.run_once()  # what the worker wrote into changes (and its partitions) does not come back
    assert [r["table"] for r in env.changes()] == [kept]


def test_second_schema_table_created_after_migrate_is_tracked_from_its_first_row(env):
    schema = name("sales")
    env.run_once(tracking=tr.Tracking.build(schemas=["public", "sales_*"]))
    env.made.append(f"DROP SCHEMA {schema} CASCADE")
    # one transaction: created, then written at once (the event trigger published it in that transaction)
    env.execute(f"BEGIN; CREATE SCHEMA {schema}; CREATE TABLE {schema}.orders (id int PRIMARY KEY, total int); "
                f"INSERT INTO {schema}.orders VALUES (1, 10); COMMIT")
    assert (schema, "orders") in published(env) and has_trigger(env, f"{schema}.orders")
    env.execute(f"UPDATE {schema}.orders SET total = 11")
    env.run_once()
    rows = env.changes("schema = %s", [schema])
    assert [(r["table"], r["operation"], r["before"], r["after"]) for r in rows] == [
        ("orders", "CREATE", {}, {"id": 1, "total": 10}),
        ("orders", "UPDATE", {"id": 1, "total": 10}, {"id": 1, "total": 11}),  # REPLICA IDENTITY FULL set
    ]
    # the query API finds them by schema and table: 'schema.table', or a model whose db_table names the schema
    from django.db import models

    from bemi import BemiRecordMixin
    from bemi.models import BemiChange

    env.execute("CREATE TABLE IF NOT EXISTS public.orders (id int PRIMARY KEY, total int)")
    env.made.append("DROP TABLE IF EXISTS public.orders")
    env.execute("INSERT INTO public.orders VALUES (1, 99)")
    env.run_once()
    assert BemiChange.objects.filter(table="orders").count() == 3  # same table name in two schemas
    assert [c.operation for c in BemiChange.objects.record(f"{schema}.orders", 1)] == ["CREATE", "UPDATE"]
    assert [c.after["total"] for c in BemiChange.objects.record("public.orders", 1)] == [99]
    meta = type("Meta", (), {"db_table": f'{schema}"."orders', "managed": False, "app_label": "queryapp"})
    order_model = type(f"Order{schema}", (BemiRecordMixin, models.Model), {
        "__module__": "tests.queryapp.models", "Meta": meta,
        "id": models.IntegerField(primary_key=True), "total": models.IntegerField()})
    order = order_model(id=1, total=11)
    assert [c.operation for c in order.bemi_changes()] == ["CREATE", "UPDATE"]
    assert [c.operation for c in order.bemi_changes("total")] == ["CREATE", "UPDATE"]
    assert BemiChange.objects.as_of(order_model, 1, rows[0].get("committed_at")).total == 10
    # and a schema that is not tracked is not
    env.execute("CREATE SCHEMA IF NOT EXISTS elsewhere_trk; CREATE TABLE elsewhere_trk.t (id int PRIMARY KEY)")
    env.made.append("DROP SCHEMA elsewhere_trk CASCADE")
    assert ("elsewhere_trk", "t") not in published(env) and not has_trigger(env, "elsewhere_trk.t")


def test_partitioned_table_is_recorded_under_its_root(env):
    root = name("meas")
    env.execute(f"CREATE TABLE {root} (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at); "
                f"CREATE TABLE {root}_2025 PARTITION OF {root} FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    env.made.append(f"DROP TABLE {root}")
    env.run_once()
    assert ("public", root) in published(env)
    # a partition created later needs nothing
    env.execute(f"CREATE TABLE {root}_2026 PARTITION OF {root} FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    env.execute(f"INSERT INTO {root} VALUES (1, '2025-05-01', 1), (2, '2026-05-01', 2)")
    env.execute(f"UPDATE {root}_2026 SET v = 3 /*Bemi {{\"job\": \"direct\"}} Bemi*/")
    env.run_once()
    rows = env.changes()
    assert [(r["table"], r["operation"], r["after"].get("v")) for r in rows] == [
        (root, "CREATE", 1), (root, "CREATE", 2), (root, "UPDATE", 3)]
    assert rows[2]["before"]["v"] == 2 and rows[2]["context"] == {"job": "direct"}  # trigger on the partition


def test_ignored_columns_only_update_is_not_recorded_any_other_is_in_full(env):
    item = name("item")
    env.execute(f"CREATE TABLE {item} (id int PRIMARY KEY, title text, updated_at timestamptz)")
    env.made.append(f"DROP TABLE {item}")
    env.run_once(tracking=tr.Tracking.build(ignored_columns=["item_*.updated_at"]))
    env.execute(f"INSERT INTO {item} VALUES (1, 'a', now())")
    env.execute(f"UPDATE {item} SET updated_at = now() + interval '1 hour'")  # only the ignored column
    env.execute(f"UPDATE {item} SET title = 'b', updated_at = now() + interval '2 hours'")
    env.execute(f"DELETE FROM {item}")
    env.run_once()
    rows = env.changes()
    assert [r["operation"] for r in rows] == ["CREATE", "UPDATE", "DELETE"]
    assert rows[1]["before"]["title"] == "a" and rows[1]["after"]["title"] == "b"
    assert rows[1]["before"]["updated_at"] != rows[1]["after"]["updated_at"]  # recorded in full


def test_skip_unchanged_updates_is_an_option_off_by_default(env):
    item = name("same")
    env.execute(f"CREATE TABLE {item} (id int PRIMARY KEY, title text)")
    env.made.append(f"DROP TABLE {item}")
    env.run_once()
    env.execute(f"INSERT INTO {item} VALUES (1, 'a'); UPDATE {item} SET title = 'a'")
    env.run_once()
    assert [r["operation"] for r in env.changes()] == ["CREATE", "UPDATE"]  # the published worker records it
    env.run_once(tracking=tr.Tracking.build(skip_unchanged_updates=True))
    env.execute(f"UPDATE {item} SET title = 'a'; UPDATE {item} SET title = 'b'")
    env.run_once()
    assert [r["operation"] for r in env.changes()] == ["CREATE", "UPDATE", "UPDATE"]
    assert env.changes()[-1]["after"]["title"] == "b"


def test_masked_columns_store_a_keyed_digest(env):
    card = name("card")
    env.execute(f"CREATE TABLE {card} (id int PRIMARY KEY, number text, holder text)")
    env.made.append(f"DROP TABLE {card}")
    tracking = tr.Tracking.build(masked_columns=["card_*.number"])
    env.run_once(tracking=tracking, masking_key="k1")
    env.execute(f"INSERT INTO {card} VALUES (1, '4111111111111111', 'Ann')")
    env.execute(f"UPDATE {card} SET holder = 'Bob'")
    env.execute(f"UPDATE {card} SET number = '5500000000000004'")
    env.run_once(tracking=tracking, masking_key="k1")
    rows = env.changes()
    text = json.dumps([[r["before"], r["after"]] for r in rows])
    assert "4111111111111111" not in text and "5500000000000004" not in text
    key = tr.column_key(tr.derive_key("k1"), "public", card, "number")
    first, second = tr.mask_json_value(key, "4111111111111111"), tr.mask_json_value(key, "5500000000000004")
    assert rows[0]["after"]["number"] == first
    assert rows[1]["before"]["number"] == rows[1]["after"]["number"] == first  # equal value, equal marker
    assert (rows[2]["before"]["number"], rows[2]["after"]["number"]) == (first, second)  # a change shows


def test_renaming_a_table_to_changes_or_bemi_does_not_hide_its_writes(env):
    """Issue 9: the rule decided by name, so a table renamed `changes` or `_bemi...` was dropped silently."""
    victim, schema = name("victim"), name("other")
    # tables of another role than the one that owns bemi's tables (the worker's)
    env.execute("DROP ROLE IF EXISTS bemi_renamer; CREATE ROLE bemi_renamer")
    env.execute(f"CREATE TABLE {victim} (id int PRIMARY KEY, v int); ALTER TABLE {victim} OWNER TO bemi_renamer")
    env.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.ledger (id int PRIMARY KEY, v int); "
                f"ALTER TABLE {schema}.ledger OWNER TO bemi_renamer")
    env.made.append(f"DROP TABLE IF EXISTS _bemi_{victim}; DROP SCHEMA {schema} CASCADE; DROP ROLE bemi_renamer")
    env.run_once(tracking=tr.Tracking.build(schemas=["public", "other_*"]))
    env.execute(f"ALTER TABLE {victim} RENAME TO _bemi_{victim}")
    env.execute(f"ALTER TABLE {schema}.ledger RENAME TO changes")
    env.execute(f"INSERT INTO _bemi_{victim} VALUES (1, 1); INSERT INTO {schema}.changes VALUES (2, 2)")
    env.execute("CALL _bemi_create_triggers()")
    assert has_trigger(env, f"_bemi_{victim}") and has_trigger(env, f"{schema}.changes")
    env.run_once()
    env.run_once()  # and the worker's own `changes` still never feeds back
    assert sorted((r["schema"], r["table"], r["after"]["v"]) for r in env.changes()) == [
        (schema, "changes", 2), ("public", f"_bemi_{victim}", 1)]
    for (part,) in env.execute("SELECT inhrelid::regclass::text FROM pg_inherits "
                               "WHERE inhparent = 'bemi.changes'::regclass"):
        assert not env.execute("SELECT public._bemi_is_tracked(%s::regclass)", [part])[0][0], part
    assert not {("public", "changes"), ("public", "_bemi_worker_checkpoints"),
                ("public", "_bemi_worker_failures")} & published(env)


def test_the_tokens_of_popular_packages_are_masked_by_default(env):
    """Issue 18: DRF's authtoken_token.key is a bearer token and the primary key; nothing set, never stored."""
    env.execute("CREATE TABLE public.authtoken_token (key varchar(40) PRIMARY KEY, user_id int, created timestamptz)")
    env.made.append("DROP TABLE public.authtoken_token")
    env.run_once()
    env.execute("INSERT INTO public.authtoken_token VALUES ('9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b', 1, now())")
    env.run_once()
    (row,) = env.changes("\"table\" = 'authtoken_token'")
    assert "9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b" not in json.dumps(row, default=str)
    assert tr.is_marker(row["primary_key"]) and row["after"]["key"] == row["primary_key"]
    assert row["after"]["user_id"] == 1


def test_a_table_named_with_a_newline_cannot_forge_a_log_line(env, caplog):
    """Issue 18: table names went into the worker's log as they are; any role that may create a table
    could start a line of its own ("... ERROR ...") in what operators read after an incident."""
    import logging

    forged = "evil\n2026-12-02 04:00:00,000 ERROR bemi.worker: forged\x1b[2K"
    env.execute('CREATE TABLE public."%s" (a int)' % forged)  # no primary key: the worker says so
    env.execute('ALTER TABLE public."%s" REPLICA IDENTITY DEFAULT' % forged)
    env.made.append('DROP TABLE public."%s"' % forged)
    if env.execute("SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND tablename = %s",
                   [env.publication, forged]):  # published by the event trigger: let the worker find it anew
        env.execute('ALTER PUBLICATION "%s" DROP TABLE public."%s"' % (env.publication, forged))
    caplog.set_level(logging.INFO, logger="bemi.worker")
    env.run_once()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("bemi")]
    about = [m for m in messages if "evil" in m]
    assert about, messages
    assert all("\n" not in m and "\x1b" not in m for m in messages)
    assert any(repr(forged) in m for m in about)


def test_a_lock_held_elsewhere_never_fails_a_create_table(env):
    """_bemi_publish runs with lock_timeout = 20ms; its look-ups sat outside its EXCEPTION block, so a
    lock held by another session made the application's CREATE TABLE fail with LockNotAvailable."""
    import psycopg

    table = name("locked")
    env.made.append(f"DROP TABLE IF EXISTS {table}")
    with psycopg.connect(env.dsn) as holder:
        holder.execute("LOCK TABLE pg_catalog.pg_publication IN ACCESS EXCLUSIVE MODE")
        with psycopg.connect(env.dsn, autocommit=True) as app:
            notices: list[str] = []
            app.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            app.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        holder.rollback()
    assert env.execute("SELECT to_regclass(%s) IS NOT NULL", [table]) == [(True,)]
    assert any("could not publish" in n for n in notices), notices
