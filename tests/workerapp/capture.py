"""Capture real pgoutput bytes for the pure unit tests (tests/test_pgoutput.py, tests/test_stitch.py).

Run once against a throwaway cluster; the output is committed as
tests/workerapp/pgoutput_capture.json so the unit tests need no database:

    python -m tests.workerapp.capture
"""

from __future__ import annotations

import json
import os

import psycopg

from bemi_devtools.pgcluster import Cluster

SCENARIO = [
    # (name, SQL run in one transaction)
    ("insert_with_context",
     "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 187234, \"SQL\": \"INSERT INTO ...\"}');"
     "INSERT INTO todo (task, is_completed, mood, note) VALUES ('Sleep', false, 'ok', NULL)"),
    ("two_contexts",
     "SELECT pg_logical_emit_message(true, '_bemi', '{\"step\": 1}');"
     "INSERT INTO todo (task, is_completed) VALUES ('Eat', false);"
     "SELECT pg_logical_emit_message(true, '_bemi_heartbeat', 'x');"
     "SELECT pg_logical_emit_message(true, 'other', '{\"step\": 99}');"
     "SELECT pg_logical_emit_message(true, '_bemi', '{\"step\": 2}');"
     "INSERT INTO todo (task, is_completed) VALUES ('Repeat', false)"),
    ("update_toast",
     "UPDATE todo SET is_completed = true WHERE task = 'Sleep'"),
    ("delete",
     "DELETE FROM todo WHERE task = 'Eat'"),
    ("key_only_delete",
     "DELETE FROM keyonly WHERE id = 1"),
    ("truncate_cascade",
     "TRUNCATE parent CASCADE"),
    ("non_transactional_message",
     "SELECT pg_logical_emit_message(false, '_bemi', '{\"lost\": true}')"),
]


def capture(dsn: str) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok')")
        conn.execute("CREATE TABLE todo (id serial PRIMARY KEY, task text, is_completed bool, mood mood, note text)")
        conn.execute("ALTER TABLE todo REPLICA IDENTITY FULL")
        conn.execute("CREATE TABLE keyonly (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO keyonly VALUES (1, 'a')")
        conn.execute("CREATE TABLE parent (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent)")
        conn.execute("CREATE TABLE flusher (id int)")
        conn.execute("CREATE PUBLICATION cap FOR TABLE todo, keyonly, parent, child")
        conn.execute("SELECT pg_create_logical_replication_slot('cap', 'pgoutput')")
        captured = {}
        for name, statements in SCENARIO:
            if name == "update_toast":
                # a value stored out of line (TOAST), untouched by the UPDATE
                conn.execute("UPDATE todo SET note = (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i) "
                             "WHERE task = 'Sleep'")
                conn.execute("SELECT pg_replication_slot_advance('cap', pg_current_wal_lsn())")
            with conn.transaction():
                conn.execute(statements)
            # SQL decoding reads flushed WAL only and a non-transactional message
            # alone is not flushed at once: commit a write to an unpublished table.
            conn.execute("INSERT INTO flusher VALUES (1)")
            rows = conn.execute(
                "SELECT (lsn - '0/0'::pg_lsn)::int8, encode(data, 'hex') FROM pg_logical_slot_get_binary_changes("
                "'cap', NULL, NULL, 'proto_version', '1', 'publication_names', 'cap', 'messages', 'true')"
            ).fetchall()
            captured[name] = [[lsn, data] for lsn, data in rows]
        conn.execute("SELECT pg_drop_replication_slot('cap')")
    return captured


def main() -> None:
    cluster = Cluster().start_throwaway()
    out = os.path.join(os.path.dirname(__file__), "pgoutput_capture.json")
    with open(out, "w") as fh:
        json.dump({"server": "PostgreSQL 15", "transactions": capture(cluster.dsn())}, fh, indent=1)
        fh.write("\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
