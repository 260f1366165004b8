"""The worker end to end on a real PostgreSQL: source writes -> `changes` rows, field by field."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from bemi.worker import pgoutput as po
from bemi.worker.runner import Worker
from tests.test_worker_process import wait_for


def test_first_start_creates_what_is_missing_and_says_so(worker_env, caplog):
    caplog.set_level("INFO", logger="bemi.worker")
    worker_env.execute("DROP TABLE IF EXISTS bemi.changes")
    worker_env.run_once()
    text = caplog.text
    assert "created table changes" in text
    assert f"created publication {worker_env.publication}" in text
    assert f"created replication slot {worker_env.slot}" in text
    indexes = {r[0] for r in worker_env.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'changes'")}
    assert {"changes_committed_at_index", "changes_table_index", "changes_primary_key_index",
            "changes_operation_index", "changes_before_index", "changes_after_index",
            "changes_context_index", "changes_identity_index"} <= indexes
    caplog.clear()
    worker_env.run_once()
    assert "created" not in caplog.text


def test_create_update_delete_field_by_field(worker_env):
    env = worker_env
    env.execute("CREATE TABLE todo_w (id serial PRIMARY KEY, task text NOT NULL, is_completed bool NOT NULL)")
    env.execute("ALTER TABLE todo_w REPLICA IDENTITY FULL")
    env.run_once()
    env.execute(env.context(user_id=187234, endpoint="/todo", method="POST", SQL="INSERT INTO ...")
                + "INSERT INTO todo_w (task, is_completed) VALUES ('Sleep', false)")
    env.execute(env.context(user_id=187234, endpoint="/todo/complete", method="PUT", SQL="UPDATE ...")
                + "UPDATE todo_w SET is_completed = true WHERE task = 'Sleep'")
    env.execute("DELETE FROM todo_w")
    xids = [r[0] for r in env.execute("SELECT xmin::text::bigint FROM todo_w")]  # (empty: all deleted)
    assert xids == []
    before_run = datetime.now(timezone.utc)
    env.run_once()
    created, updated, deleted = env.changes()
    database = env.execute("SELECT current_database()")[0][0]
    for row in (created, updated, deleted):
        assert row["database"] == database and row["schema"] == "public" and row["table"] == "todo_w"
        assert row["primary_key"] == "1"
        assert row["committed_at"] <= row["queued_at"] <= row["created_at"] + timedelta(seconds=1)
        assert row["queued_at"] >= before_run
        assert row["position"] > 0 and row["transaction_id"] > 0
    assert (created["operation"], created["before"], created["after"]) == (
        "CREATE", {}, {"id": 1, "task": "Sleep", "is_completed": False})
    assert created["context"] == {"user_id": 187234, "endpoint": "/todo", "method": "POST", "SQL": "INSERT INTO ..."}
    assert (updated["operation"], updated["before"], updated["after"]) == (
        "UPDATE", {"id": 1, "task": "Sleep", "is_completed": False}, {"id": 1, "task": "Sleep", "is_completed": True})
    assert updated["context"]["endpoint"] == "/todo/complete"
    assert (deleted["operation"], deleted["before"], deleted["after"], deleted["context"]) == (
        "DELETE", {"id": 1, "task": "Sleep", "is_completed": True}, {}, {})
    assert created["committed_at"] < updated["committed_at"] < deleted["committed_at"]
    assert len({created["transaction_id"], updated["transaction_id"], deleted["transaction_id"]}) == 3
    # the checkpoint names the last transaction, and the slot was advanced past it
    (cp_commit, cp_end), = env.execute("SELECT (commit_lsn - '0/0')::int8, (end_lsn - '0/0')::int8 "
                                       "FROM bemi._bemi_worker_checkpoints WHERE slot = %s", [env.slot])
    assert cp_commit == deleted["commit_position"]
    assert po.lsn_to_int(str(env.slot_state()["confirmed_flush_lsn"])) >= cp_end


def test_two_contexts_in_one_transaction_and_rollback_leaves_nothing(worker_env):
    env = worker_env
    env.execute("CREATE TABLE items_w (id int PRIMARY KEY, v text)")
    env.run_once()
    with env.conn.transaction():
        env.execute(env.context(step=1) + "INSERT INTO items_w VALUES (1, 'a'), (2, 'b')")
        env.execute(env.context(step=2) + "INSERT INTO items_w VALUES (3, 'c')")
        env.execute("UPDATE items_w SET v = 'z' WHERE id = 1")
    try:
        with env.conn.transaction():
            env.execute(env.context(step=3) + "INSERT INTO items_w VALUES (4, 'd')")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    env.run_once()
    rows = env.changes()
    assert [(r["operation"], r["primary_key"], r["context"], r["change_index"]) for r in rows] == [
        ("CREATE", "1", {"step": 1}, 0), ("CREATE", "2", {"step": 1}, 1),
        ("CREATE", "3", {"step": 2}, 2), ("UPDATE", "1", {"step": 2}, 3),
    ]
    assert len({r["commit_position"] for r in rows}) == 1


def test_copy_of_1000_rows_gives_1000_changes(worker_env):
    env = worker_env
    env.execute("CREATE TABLE copied_w (id int PRIMARY KEY, v text)")
    env.run_once()
    with env.conn.cursor() as cur, cur.copy("COPY copied_w FROM STDIN") as copy:
        for i in range(1000):
            copy.write_row((i, f"v{i}"))
    env.run_once(copy_rows=128, batch_rows=300)  # several COPY chunks in one destination transaction
    rows = env.changes()
    assert len(rows) == 1000
    assert [r["change_index"] for r in rows] == list(range(1000))
    assert sorted(int(r["primary_key"]) for r in rows) == list(range(1000))
    assert len({r["position"] for r in rows}) < 1000  # rows of one multi-insert record share an LSN


def test_toast_unchanged_value_is_taken_from_the_old_row(worker_env):
    env = worker_env
    env.execute("CREATE TABLE toasted_w (id int PRIMARY KEY, flag bool, big text)")
    env.execute("CREATE TABLE toasted_default_w (id int PRIMARY KEY, flag bool, big text)")
    env.execute("ALTER TABLE toasted_w REPLICA IDENTITY FULL")
    env.execute("ALTER TABLE toasted_default_w REPLICA IDENTITY DEFAULT")
    env.run_once()
    big = "".join(f"{i:08x}" for i in range(20_000))  # 160 kB, stored out of line
    for table in ("toasted_w", "toasted_default_w"):
        env.execute(f"INSERT INTO {table} VALUES (1, false, %s)", [big])
        env.execute(f"UPDATE {table} SET flag = true")
    env.run_once()
    full = env.changes("\"table\" = 'toasted_w' AND operation = 'UPDATE'")[0]
    assert full["after"] == {"id": 1, "flag": True, "big": big}
    assert full["before"] == {"id": 1, "flag": False, "big": big}
    default = env.changes("\"table\" = 'toasted_default_w' AND operation = 'UPDATE'")[0]
    # no old row to take it from: the value is left out, never stored as NULL
    assert default["after"] == {"id": 1, "flag": True} and default["before"] == {}


def test_truncate_cascade_gives_one_change_per_table(worker_env):
    env = worker_env
    env.execute("CREATE TABLE parent_w (id int PRIMARY KEY)")
    env.execute("CREATE TABLE child_w (id int PRIMARY KEY, parent_id int REFERENCES parent_w)")
    env.execute("INSERT INTO parent_w VALUES (1); INSERT INTO child_w VALUES (10, 1)")
    env.run_once()
    env.execute(env.context(job="cleanup") + "TRUNCATE parent_w CASCADE")
    env.run_once()
    rows = env.changes()
    assert sorted((r["table"], r["operation"], r["primary_key"], r["before"], r["after"], r["context"])
                  for r in rows) == [
        ("child_w", "TRUNCATE", None, {}, {}, {"job": "cleanup"}),
        ("parent_w", "TRUNCATE", None, {}, {}, {"job": "cleanup"}),
    ]


def test_alter_table_mid_stream_decodes_each_row_with_its_definition(worker_env):
    env = worker_env
    env.execute("CREATE TABLE altered_w (id int PRIMARY KEY, a text, b text)")
    env.run_once()
    env.execute("INSERT INTO altered_w VALUES (1, 'a1', 'b1')")
    env.execute("ALTER TABLE altered_w ADD COLUMN c int DEFAULT 5")
    env.execute("INSERT INTO altered_w VALUES (2, 'a2', 'b2', 7)")
    env.execute("ALTER TABLE altered_w DROP COLUMN b")
    env.execute("INSERT INTO altered_w VALUES (3, 'a3', 8)")
    env.execute("ALTER TABLE altered_w RENAME COLUMN a TO aa")
    env.execute("INSERT INTO altered_w VALUES (4, 'a4', 9)")
    env.execute("ALTER TABLE altered_w ALTER COLUMN aa TYPE int USING length(aa)")
    env.execute("INSERT INTO altered_w VALUES (5, 55, 10)")
    env.run_once()
    assert [r["after"] for r in env.changes()] == [
        {"id": 1, "a": "a1", "b": "b1"},
        {"id": 2, "a": "a2", "b": "b2", "c": 7},
        {"id": 3, "a": "a3", "c": 8},
        {"id": 4, "aa": "a4", "c": 9},
        {"id": 5, "aa": 55, "c": 10},
    ]


def test_primary_key_from_the_catalog_composite_and_not_named_id(worker_env):
    env = worker_env
    env.execute("CREATE TABLE pk_code_w (code text PRIMARY KEY, id int)")
    env.execute("CREATE TABLE pk_pair_w (a int, b text, v int, PRIMARY KEY (a, b))")
    env.execute("CREATE TABLE pk_none_w (id int, v int)")
    env.execute("ALTER TABLE pk_none_w REPLICA IDENTITY FULL")
    env.run_once()
    env.execute("INSERT INTO pk_code_w VALUES ('abc', 42); INSERT INTO pk_pair_w VALUES (1, 'x', 0); "
                "INSERT INTO pk_none_w VALUES (7, 0)")
    env.run_once()
    assert {r["table"]: r["primary_key"] for r in env.changes()} == {
        "pk_code_w": "abc", "pk_pair_w": '[1,"x"]', "pk_none_w": None,
    }


def test_table_without_identity_gets_full_and_application_updates_keep_working(worker_env, caplog):
    env = worker_env
    env.run_once()
    env.execute("CREATE TABLE noid_w (v int)")
    env.execute("ALTER TABLE noid_w REPLICA IDENTITY DEFAULT")  # no primary key: no identity at all
    caplog.set_level("INFO", logger="bemi.worker")
    env.run_once()  # the new table is picked up without a restart of anything
    assert "set REPLICA IDENTITY FULL on public.noid_w" in caplog.text
    env.execute("INSERT INTO noid_w VALUES (1)")
    env.execute("UPDATE noid_w SET v = 2")  # would fail if published without identity
    env.execute("DELETE FROM noid_w")
    env.run_once()
    assert [(r["operation"], r["before"], r["after"]) for r in env.changes()] == [
        ("CREATE", {}, {"v": 1}), ("UPDATE", {"v": 1}, {"v": 2}), ("DELETE", {"v": 2}, {}),
    ]


def test_changes_and_worker_tables_are_never_tracked(worker_env):
    env = worker_env
    env.run_once()
    published = {r[0] for r in env.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = %s",
                                           [env.publication])}
    assert "changes" not in published and "_bemi_worker_checkpoints" not in published
    assert "_bemi_tracking" not in published
    env.run_once()
    env.run_once()  # the rows the first run wrote into `changes` do not come back
    assert env.changes() == []


def test_malformed_and_oversized_context_messages(worker_env, caplog):
    env = worker_env
    env.execute("CREATE TABLE msg_w (id int PRIMARY KEY)")
    env.run_once()
    payloads = [
        "not json", "[1, 2]", '"string"', '{"a": NaN}', "x" * (1024 * 1024 + 1),
        '{"big": "' + "y" * (1024 * 1024) + '"}', "[" * 50_000 + "]" * 50_000,
    ]
    def emit(payload, row, prefix="_bemi"):
        with env.conn.transaction():
            env.execute("SELECT pg_logical_emit_message(true, %s, %s)", [prefix, payload])
            env.execute("INSERT INTO msg_w VALUES (%s)", [row])

    for i, payload in enumerate(payloads):
        emit(payload, i)
    n = len(payloads)
    emit(b"\xff\x00{}", n)  # not UTF-8
    emit('{"nul": "a\\u0000b", "ok": 1}', n + 1)
    with env.conn.transaction():
        env.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"ok\": 2}')")
        env.execute("SELECT pg_logical_emit_message(true, '_bemi_heartbeat', '{\"hb\": 1}')")
        env.execute("SELECT pg_logical_emit_message(true, 'someone_else', '{\"other\": 1}')")
        env.execute("SELECT pg_logical_emit_message(false, '_bemi', '{\"nontx\": 1}')")
        env.execute("INSERT INTO msg_w VALUES (%s)", [n + 2])
    caplog.set_level("WARNING", logger="bemi.worker")
    worker = env.run_once()
    contexts = [r["context"] for r in env.changes()]
    assert contexts == [{}] * (n + 1) + [{"nul": "a\ufffdb", "ok": 1}, {"ok": 2}]
    assert worker.stitcher.bad_contexts == n + 1
    assert caplog.text.count("ignoring the _bemi context") == n + 1


def test_crash_between_destination_commit_and_slot_advance_duplicates_nothing(worker_env):
    env = worker_env
    env.execute("CREATE TABLE again_w (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO again_w SELECT generate_series(1, 50)")
    env.execute("INSERT INTO again_w SELECT generate_series(51, 60)")
    before = env.slot_state()["confirmed_flush_lsn"]

    worker = Worker(env.config())
    worker.setup()
    worker.stream.confirm = lambda lsn: None  # "crash" right after each destination commit
    worker.drain()
    worker.close()
    assert len(env.changes()) == 60
    assert env.slot_state()["confirmed_flush_lsn"] == before  # the slot still holds both transactions

    env.execute("INSERT INTO again_w SELECT generate_series(61, 65)")
    env.run_once()
    ids = [int(r["primary_key"]) for r in env.changes()]
    assert sorted(ids) == list(range(1, 66)) and len(ids) == 65
    assert env.slot_state()["confirmed_flush_lsn"] > before


def test_crash_in_the_middle_of_a_big_transaction_stores_nothing_of_it(worker_env):
    env = worker_env
    env.execute("CREATE TABLE big_w (id int PRIMARY KEY)")
    env.run_once()
    env.execute("INSERT INTO big_w VALUES (0)")
    env.execute("INSERT INTO big_w SELECT generate_series(1, 1000)")
    before = env.slot_state()["confirmed_flush_lsn"]

    worker = Worker(env.config(copy_rows=100, batch_rows=1))
    worker.setup()
    commits = []
    real_commit = worker.sink.commit

    def crash_on_second_commit(*args):
        commits.append(args)
        if len(commits) == 2:  # 1,000 rows were COPied in chunks of 100 into this transaction
            raise RuntimeError("simulated crash")
        real_commit(*args)

    worker.sink.commit = crash_on_second_commit
    with pytest.raises(RuntimeError):
        worker.drain()
    worker.close()
    assert [r["primary_key"] for r in env.changes()] == ["0"]  # the first transaction only
    # the slot moved past it (the walsender takes the status update asynchronously), not past the big one
    assert wait_for(lambda: env.slot_state()["confirmed_flush_lsn"] > before and not env.slot_state()["active"])
    confirmed = po.lsn_to_int(env.slot_state()["confirmed_flush_lsn"])

    env.run_once()
    assert sorted(int(r["primary_key"]) for r in env.changes()) == list(range(1001))
    # the slot had not been confirmed up to the big transaction's commit (a keepalive may have
    # confirmed WAL read before that commit record: its transaction is sent again all the same)
    assert confirmed <= env.changes("primary_key = '1'")[0]["commit_position"]


def test_adopts_a_changes_table_made_by_the_published_worker(worker_env, caplog):
    env = worker_env
    env.execute("DROP TABLE IF EXISTS bemi.changes")
    env.execute("""CREATE TABLE bemi.changes (
        "id" uuid PRIMARY KEY DEFAULT gen_random_uuid(), "database" varchar(255) NOT NULL,
        "schema" varchar(255) NOT NULL, "table" varchar(255) NOT NULL, "primary_key" varchar(255),
        "operation" text NOT NULL, "before" jsonb NOT NULL DEFAULT '{}', "after" jsonb NOT NULL DEFAULT '{}',
        "context" jsonb NOT NULL DEFAULT '{}', "committed_at" timestamptz NOT NULL,
        "queued_at" timestamptz NOT NULL, "created_at" timestamptz NOT NULL DEFAULT now(),
        "transaction_id" bigint NOT NULL, "position" bigint NOT NULL)""")
    env.execute('CREATE UNIQUE INDEX changes_position_table_schema_database_operation_unique '
                'ON bemi.changes ("position", "table", "schema", "database", "operation")')
    env.execute("CREATE TABLE adopt_w (id int PRIMARY KEY)")
    caplog.set_level("WARNING", logger="bemi.worker")
    env.run_once()
    assert "added columns commit_position, change_index" in caplog.text
    assert "dropped the unique index changes_position_table_schema_database_operation_unique" in caplog.text
    with env.conn.cursor() as cur, cur.copy("COPY adopt_w FROM STDIN") as copy:
        for i in range(100):
            copy.write_row((i,))
    env.run_once()
    assert len(env.changes()) == 100


def test_rows_written_in_the_transaction_that_creates_a_table_are_tracked(worker_env):
    # The worker's periodic refresh adds new tables a moment later; the
    # `migrate bemi` event trigger adds them to the publication at once.
    env = worker_env
    env.run_once()
    env.conn.autocommit = False
    env.execute("CREATE TABLE born_w (id int PRIMARY KEY, note text)")
    env.execute("INSERT INTO born_w VALUES (1, 'same transaction')")
    env.conn.commit()
    env.conn.autocommit = True
    env.execute("INSERT INTO born_w VALUES (2, 'right after')")
    env.run_once()
    assert [(c["operation"], c["after"]) for c in env.changes("\"table\" = 'born_w'")] == [
        ("CREATE", {"id": 1, "note": "same transaction"}),
        ("CREATE", {"id": 2, "note": "right after"}),
    ]
