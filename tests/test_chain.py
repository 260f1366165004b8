"""Tamper evidence (issue 18): the chain of stored changes, and bemi_verify / bemi-worker verify.

Real cluster, real worker; each tampering is done as a superuser (the test role) directly in SQL.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from psycopg import sql

from bemi import tables
from bemi.chain import canonical_json, change_bytes, link
from bemi.verify import _ROWS, _Walk
from bemi.worker.partitions import Partitions
from tests.workerapp.harness import ROOT

UTC = timezone.utc


def verify_cli(env, *args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "bemi.cli", "verify", "--dsn", env.dsn, *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def verify_json(env, *args: str) -> tuple[int, dict]:
    code, out = verify_cli(env, "--json", *args)
    return code, json.loads(out)


def verify_command(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("bemi_verify", *args, stdout=out, stderr=err)
        return 0, out.getvalue()
    except CommandError as exc:
        return exc.returncode, out.getvalue() + err.getvalue()


def odd_trail(env) -> None:
    """Changes with odd values (unicode, escapes, big numerics, nested arrays, empty objects, json, no
    primary key), stored by the real worker."""
    env.execute("DROP TABLE IF EXISTS chain_t, chain_nopk")
    env.execute('CREATE TABLE chain_t (id int PRIMARY KEY, "ключ é" text, n numeric, f float8, j json, jb jsonb, '
                "a int[], t text[])")
    env.execute("CREATE TABLE chain_nopk (v text)")
    env.execute("ALTER TABLE chain_nopk REPLICA IDENTITY FULL")
    env.run_once()
    env.execute(env.context(user="ünï", path="/todo?x=1&y=2#z", n=1.50, deep={"a": [[], {}]}) + """
        INSERT INTO chain_t VALUES
          (1, 'café 😀 "q" \\ back', 123456789012345678901234567890.000100, 1e300,
           '{"b": 1.0e2, "a": [1, {"z": {}}], "a": "dup", "e": "\\u00e9"}', '{"y": [1.50, -0.0], "x": {}}',
           '{1,NULL,3}', '{"tab\tx","new\nline",""}'),
          (2, NULL, -0.0, -1.25e-05, '[]', '{}', '{}', NULL),
          (3, '', 0.000001, 'NaN', 'null', '[[[]]]', '{{1,2},{3,4}}', '{"{}"}')""")
    env.execute("UPDATE chain_t SET n = n * 2, jb = jsonb_set(jb, '{q}', '\"\\\\u0000-free\"') WHERE id = 1")
    env.execute("INSERT INTO chain_nopk VALUES ('no key'), (NULL)")
    env.execute("DELETE FROM chain_t WHERE id = 2")
    env.execute("INSERT INTO chain_t (id) SELECT generate_series(10, 30)")
    env.run_once()


def ids(env) -> list[str]:
    return [str(r["id"]) for r in env.changes()]


def test_an_intact_trail_verifies(worker_env):
    env = worker_env
    odd_trail(env)
    rows = env.changes()
    assert len(rows) == 3 + 1 + 2 + 1 + 21 and all(r["chain_link"] is not None for r in rows)
    assert any(r["primary_key"] is None for r in rows)
    code, out = verify_cli(env)
    assert code == 0, out
    assert f"intact: database {env.conn.info.dbname}: 28 changes checked from the start of the chain" in out
    code, doc = verify_json(env)
    assert code == 0 and doc["status"] == "intact" and doc["chains"][0]["checked"] == 28
    head = doc["head"]
    assert head == bytes(rows[-1]["chain_link"]).hex()
    (checkpoint,), = env.execute("SELECT chain_head FROM bemi._bemi_worker_checkpoints WHERE slot = %s", [env.slot])
    assert bytes(checkpoint).hex() == head
    # Published outside the database: `bemi-worker status --json | jq .chain_head` (and bemi_status).
    status = subprocess.run([sys.executable, "-m", "bemi.cli", "status", "--json", "--dsn", env.dsn, "--slot", env.slot,
                             "--publication", env.publication], capture_output=True, text=True, cwd=ROOT)
    assert json.loads(status.stdout)["chain_head"] == head, status.stderr
    assert verify_cli(env, "--head", head)[0] == 0
    code, out = verify_command("--head", head)
    assert code == 0 and "intact" in out and "found in the chain" in out
    # The chain continues across worker restarts (from the checkpoint's head).
    env.execute("UPDATE chain_t SET \"ключ é\" = 'again' WHERE id = 10")
    env.run_once()
    code, doc = verify_json(env, "--head", head)
    assert code == 0 and doc["chains"][0]["checked"] == 29 and doc["head_found"]


def test_an_altered_change_is_named(worker_env):
    env = worker_env
    odd_trail(env)
    target = ids(env)[5]
    env.execute("""UPDATE bemi.changes SET after = jsonb_set(after, '{n}', '1') WHERE id = %s""", [target])
    code, doc = verify_json(env)
    assert code == 1 and doc["status"] == "broken" and doc["id"] == target, doc
    assert "altered" in doc["reason"]
    # Any column the worker wrote: context, a timestamp, the primary key, the operation.
    for change in ("context = context || '{\"user\": \"someone else\"}'", "committed_at = committed_at + interval '1 us'",
                   "primary_key = 'x'", "operation = 'DELETE'", "queued_at = 'infinity'"):
        env.execute(f"UPDATE bemi.changes SET after = after WHERE id = %s", [target])
        victim = ids(env)[8]
        env.execute(f"UPDATE bemi.changes SET {change} WHERE id = %s", [victim])
        code, doc = verify_json(env)
        assert code == 1 and doc["id"] == target, (change, doc)  # still the first break
    code, out = verify_command()
    assert code == 1 and f"BROKEN: database {env.conn.info.dbname}: change {target}" in out


def test_a_change_removed_in_the_middle_breaks_the_chain_at_the_next(worker_env):
    env = worker_env
    odd_trail(env)
    all_ids = ids(env)
    env.execute("DELETE FROM bemi.changes WHERE id = %s", [all_ids[10]])
    code, doc = verify_json(env)
    assert code == 1 and doc["id"] == all_ids[11], doc
    assert doc["chains"][0]["broken"]["after_id"] == all_ids[9]


def test_removing_the_newest_changes_is_caught(worker_env):
    env = worker_env
    odd_trail(env)
    code, doc = verify_json(env)
    head, all_ids = doc["head"], ids(env)
    env.execute("DELETE FROM bemi.changes WHERE id = ANY (%s::uuid[])", [all_ids[-2:]])
    # With the published head: exit 1.
    code, doc = verify_json(env, "--head", head)
    assert code == 1 and doc["head_found"] is False
    # Without it, the worker's checkpoint (when readable) still says where the chain ended.
    code, doc = verify_json(env)
    assert code == 1 and doc["id"] is None and doc["chains"][0]["broken"]["after_id"] == all_ids[-3]
    assert "newest changes were removed" in doc["reason"]
    # A superuser who also rewinds the checkpoint is caught by the head kept elsewhere only.
    env.execute("UPDATE bemi._bemi_worker_checkpoints SET chain_head = (SELECT chain_link FROM bemi.changes WHERE id = %s)",
                [all_ids[-3]])
    assert verify_json(env)[0] == 0
    code, out = verify_cli(env, "--head", head)
    assert code == 1 and f"BROKEN: head {head} is not in the chain" in out


FORGE = """INSERT INTO bemi.changes (id, database, schema, "table", primary_key, operation, before, after, context,
                                committed_at, queued_at, transaction_id, position, commit_position, change_index,
                                chain_link)
           SELECT %s, database, schema, "table", '999', 'DELETE', after, '{}', '{}', committed_at, queued_at,
                  transaction_id, position, commit_position, change_index + %s, %s
           FROM bemi.changes WHERE id = %s"""


def test_a_forged_change_is_named(worker_env):
    env = worker_env
    odd_trail(env)
    rows = env.changes()
    forged = "00000000-0000-4000-8000-000000000001"
    # Between two changes of one transaction (change_index 1000 sorts after the last), without a link...
    anchor = rows[3]
    env.execute(FORGE, [forged, 1000, None, anchor["id"]])
    code, doc = verify_json(env)
    assert code == 1 and doc["id"] == forged and "no link" in doc["reason"], doc
    # ... with a copied link ...
    env.execute("UPDATE bemi.changes SET chain_link = %s WHERE id = %s", [anchor["chain_link"], forged])
    code, doc = verify_json(env)
    assert code == 1 and doc["id"] == forged, doc
    # ... and with the link recomputed exactly as the worker would: the change after it gives it away.
    env.execute("UPDATE bemi.changes SET chain_link = %s WHERE id = %s", [forge_link(env, forged), forged])
    code, doc = verify_json(env)
    assert code == 1 and doc["id"] == forged and "inserted" in doc["reason"], doc
    # Appended after the newest change, with a good link: the checkpoint's head gives it away.
    env.execute("DELETE FROM bemi.changes WHERE id = %s", [forged])
    env.execute(FORGE, [forged, 1, None, env.changes()[-1]["id"]])
    env.execute("UPDATE bemi.changes SET chain_link = %s WHERE id = %s", [forge_link(env, forged), forged])
    code, doc = verify_json(env)
    assert code == 1 and doc["id"] == forged, doc


def forge_link(env, forged: str) -> bytes:
    """The link an attacker who knows bemi/chain.py computes for a change it inserted."""
    with psycopg.connect(env.dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        stored = conn.execute(_ROWS.format(tables.CHANGES, sql.SQL(""))).fetchall()
    position = [r[0] for r in stored].index(forged)
    walk = _Walk(env.conn.info.dbname, None, None, None)  # the chain starts at GENESIS here
    for row in stored[:position]:
        assert walk.feed(row)
    row = stored[position]
    data = change_bytes(row[1], row[2], row[3], row[4], row[5], canonical_json(row[6]), canonical_json(row[7]),
                        canonical_json(row[8]), row[9], row[10], row[11], row[12], row[13], row[14])
    return link(walk.prev, data)


def test_cannot_check_exits_2(worker_env, scratch, pg_server):
    env = worker_env
    code, out = verify_cli(env, "--destination-dsn", "host=127.0.0.1 port=1 dbname=nowhere connect_timeout=3")
    assert code == 2 and "cannot verify: cannot connect" in out
    code, doc = verify_json(env, "--destination-dsn", pg_server.dsn(scratch))
    assert code == 2 and doc["status"] == "error" and "no chain to check" in doc["error"]
    assert verify_cli(env, "--head", "not hex")[0] == 2


@pytest.fixture
def prune_log_restored(worker_env):
    """This test's prunes (one of them into the future) are not left in bemi._bemi_pruned, where later
    tests' time travel would read them as a pruned horizon."""
    (started,), = worker_env.execute("SELECT clock_timestamp()")
    yield
    if worker_env.execute("SELECT to_regclass('bemi._bemi_pruned')")[0][0]:
        worker_env.execute("DELETE FROM bemi._bemi_pruned WHERE pruned_at >= %s", [started])


def test_prune_retention_and_a_restart_keep_the_chain_verifiable(worker_env, prune_log_restored):
    env = worker_env
    env.execute("DROP TABLE IF EXISTS chain_p")
    env.execute("CREATE TABLE chain_p (id int PRIMARY KEY, v text)")
    env.run_once(partition_interval="day")
    env.execute("INSERT INTO chain_p SELECT g, 'first' FROM generate_series(1, 30) g")
    env.run_once(partition_interval="day")
    (middle,), = env.execute("SELECT clock_timestamp()")
    env.execute("INSERT INTO chain_p SELECT g, 'second' FROM generate_series(31, 60) g")
    env.run_once(partition_interval="day")
    # bemi_prune trims the straddling (today's) partition: the chain is cut at the newest change removed.
    out = io.StringIO()
    call_command("bemi_prune", "--before", middle.isoformat(), stdout=out)
    assert "removed 30 changes" in out.getvalue()
    code, doc = verify_json(env)
    assert code == 0, doc
    chain = doc["chains"][0]
    assert chain["checked"] == 30 and chain["cut"]["reason"] == "manage.py bemi_prune"
    assert chain["cut"]["changes"] == 30
    code, out = verify_command()
    assert code == 0 and "from where it was cut on" in out and "by manage.py bemi_prune (30 changes removed)" in out
    # Retention drops whole partitions (today's, with a cutoff after its end): nothing is left, still intact.
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        conn.execute("SET search_path = pg_catalog, pg_temp")
        Partitions(conn, "day").prune(datetime.now(UTC) + timedelta(days=2), by="retention", whole_only=True)
    assert env.execute("SELECT count(*) FROM bemi.changes") == [(0,)]
    code, doc = verify_json(env)
    assert code == 0 and doc["chains"][0]["cut"]["reason"] == "retention" and doc["chains"][0]["checked"] == 0
    head = doc["head"]
    # The worker continues the chain from its checkpoint; an earlier head is the cut's link: still found.
    env.execute("UPDATE chain_p SET v = 'third' WHERE id = 60")
    env.run_once(partition_interval="day")
    code, doc = verify_json(env, "--head", head)
    assert code == 0 and doc["chains"][0]["checked"] == 1 and doc["head_found"], doc
