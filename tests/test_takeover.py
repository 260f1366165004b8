"""Taking over the published Docker worker's slot (`bemi_local`, publication `dbz_publication`).

The published worker is simulated as Debezium + its TypeScript worker behave:
it read every change through a slot of its own view of the WAL (a
test_decoding slot created with `bemi_local`, so the same LSNs), stored one
row per change with `position` = the change's LSN and insert-or-ignore on its
unique key (position, table, schema, database, operation), a primary key
change as a DELETE and a CREATE, and confirmed to `bemi_local` only an earlier
position than what it stored. Our worker then starts on `bemi_local`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import psycopg
import pytest
from psycopg.rows import dict_row

from bemi import verify
from bemi.worker.runner import Config, Worker
from bemi_devtools.legacy import PUBLISHED_CHANGES
from bemi.worker.errors import WorkerError

pytestmark = pytest.mark.django_db(transaction=True)

_CHANGE = re.compile(r"table (\w+)\.(\w+): (INSERT|UPDATE|DELETE): (old-key: (.*?) new-tuple: )?(.*)\Z", re.S)
_ID = re.compile(r"\bid\[integer\]:(\d+)")


def lsn_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def workload(conn: psycopg.Connection, dsn: str, after_five) -> None:
    for i in range(1, 11):  # 10 transactions, one insert each
        conn.execute("INSERT INTO todo VALUES (%s, %s)", [i, f"task {i}"])
        if i == 5:
            after_five()
    with conn.cursor().copy("COPY todo FROM STDIN") as copy:  # 5 rows, one WAL record: one position
        for i in range(11, 16):
            copy.write_row((i, f"copied {i}"))
    conn.execute("SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 7}'); "
                 "UPDATE todo SET task = 'done' WHERE id = 1")
    conn.execute("UPDATE todo SET id = 100 WHERE id = 2")  # a primary key change
    conn.execute("DELETE FROM todo WHERE id = 3")
    # Interleaved: the transaction that commits second wrote first.
    with psycopg.connect(dsn, autocommit=False) as other:
        other.execute("INSERT INTO todo VALUES (20, 'first written, last committed')")
        conn.execute("INSERT INTO todo VALUES (21, 'written second, committed first')")
        other.execute("INSERT INTO todo VALUES (22, 'same transaction as 20')")
        other.commit()


def published_worker_view(conn: psycopg.Connection, slot: str) -> list[list[dict]]:
    """Every transaction of the test_decoding slot, in commit order: its changes as Debezium reports them."""
    transactions: list[list[dict]] = []
    current: list[dict] = []
    for lsn, xid, data in conn.execute(
        "SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", [slot]
    ).fetchall():
        if data.startswith("BEGIN"):
            current = []
        elif data.startswith("COMMIT"):
            transactions.append(current + [{"commit": lsn_int(lsn)}])
        else:
            m = _CHANGE.match(data)
            if not m:
                continue
            schema, table, kind, _, old_key, tuple_ = m.groups()
            base = {"position": lsn_int(lsn), "schema": schema, "table": table, "xid": xid}
            new_id = _ID.search(tuple_).group(1)
            old_id = _ID.search(old_key).group(1) if old_key else new_id
            if kind == "UPDATE" and old_id != new_id:  # Debezium: a DELETE of the old key and a CREATE of the new
                current.append({**base, "operation": "DELETE", "pk": old_id})
                current.append({**base, "operation": "CREATE", "pk": new_id})
            else:
                current.append({**base, "operation": {"INSERT": "CREATE"}.get(kind, kind), "pk": new_id})
    return transactions


def store_as_published(conn: psycopg.Connection, database: str, transactions: list[list[dict]]) -> None:
    for changes in transactions:
        for c in changes:
            if "commit" in c:
                continue
            conn.execute(
                'INSERT INTO public.changes ("database", "schema", "table", primary_key, operation, committed_at, '
                'queued_at, transaction_id, "position") VALUES (%s, %s, %s, %s, %s, now(), now(), %s, %s) '
                "ON CONFLICT DO NOTHING",  # the published worker's insert-or-ignore
                [database, c["schema"], c["table"], c["pk"], c["operation"], c["xid"], c["position"]],
            )


def stored(conn: psycopg.Connection) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        # (Not the worker's own writes to the tracking settings, recorded since issue 18: a FOR ALL TABLES
        # publication has public._bemi_tracking.)
        return cur.execute('SELECT primary_key, operation, "position", commit_position IS NULL AS published '
                           "FROM bemi.changes WHERE \"table\" <> '_bemi_tracking'").fetchall()


@pytest.mark.parametrize("mode", ["takeover", "interrupted", "new-slot", "without-takeover"])
def test_taking_over_the_published_workers_slot(pg_server, scratch, mode, caplog):
    """Modes: --takeover on bemi_local; the same, killed halfway and restarted; procedure A of
    docs/upgrading.md (slot `bemi` created while the container runs, after its 5th transaction);
    the control, without --takeover."""
    takeover = mode != "without-takeover"
    slot = "bemi" if mode == "new-slot" else "bemi_local"
    dsn = pg_server.dsn(scratch)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(PUBLISHED_CHANGES)
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text)")
        conn.execute("ALTER TABLE todo REPLICA IDENTITY FULL")
        conn.execute("CREATE PUBLICATION dbz_publication FOR ALL TABLES")  # Debezium's default
        conn.execute("SELECT pg_create_logical_replication_slot('bemi_local', 'pgoutput')")
        conn.execute("SELECT pg_create_logical_replication_slot('published_view', 'test_decoding')")
        workload(conn, dsn, lambda: mode == "new-slot" and conn.execute(
            "SELECT pg_create_logical_replication_slot('bemi', 'pgoutput')"))
        before_last = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        for i in range(30, 40):  # 10 more transactions, never seen by the container
            conn.execute("INSERT INTO todo VALUES (%s, 'after the container stopped')", [i])

        transactions = published_worker_view(conn, "published_view")
        assert len(transactions) == 26
        seen = [t for t in transactions if t[-1]["commit"] <= lsn_int(str(before_last))]
        assert len(seen) == 16
        store_as_published(conn, scratch, seen)
        # Debezium confirmed only the first 5 transactions to the slot (its offsets are ahead).
        conn.execute("SELECT pg_replication_slot_advance('bemi_local', '0/0'::pg_lsn + %s::numeric)",
                     [seen[4][-1]["commit"] + 1])
        published = conn.execute('SELECT count(*) FROM public.changes').fetchone()[0]
        # 16 transactions, 21 WAL changes: the COPY's 5 rows share a position (4 dropped by the unique key),
        # the primary key change is 2 rows.
        assert published == 21 - 4 + 1

        config = Config(source_dsn=dsn, slot=slot, publication="dbz_publication", once=True,
                        takeover=takeover)
        if takeover:
            # The overlap is bounded in bytes: too little memory is refused, never exceeded.
            with pytest.raises(WorkerError, match="--takeover-memory"):
                Worker(Config(**{**config.__dict__, "takeover_max_bytes": 100})).run()
        if mode == "interrupted":
            # Killed at the second destination commit (one per transaction that stores rows: the
            # first holds the 4 COPY rows the published worker lost), then restarted.
            worker = Worker(Config(**{**config.__dict__, "batch_rows": 1}))
            worker.setup()
            real_commit, commits = worker.sink.commit, []

            def crash_on_second_commit(*args):
                commits.append(args)
                if len(commits) == 2:
                    raise RuntimeError("simulated crash")
                return real_commit(*args)

            worker.sink.commit = crash_on_second_commit  # type: ignore[method-assign]
            with pytest.raises(RuntimeError):
                worker.drain()
            worker.close()
            assert conn.execute("SELECT count(*) FROM bemi.changes WHERE commit_position IS NOT NULL").fetchone()[0] == 4
        caplog.set_level(logging.INFO, logger="bemi.worker")
        assert Worker(config).run() == 0
        rows = stored(conn)
        ours = [r for r in rows if not r["published"]]
        # every change ours stored, its writes to the tracking settings too: all chained
        written = conn.execute("SELECT count(*) FROM bemi.changes WHERE commit_position IS NOT NULL").fetchone()[0]
        counts = Counter((r["primary_key"], r["operation"]) for r in rows)

    if not takeover:
        # The control: the slot replays transactions 6 to 16, and they are stored twice.
        assert "start with --takeover" in caplog.text
        assert max(counts.values()) == 2
        return
    replayed = sum(len(t) - 1 for t in seen[5:])  # changes of transactions 6..16, as the container stored them
    if mode == "new-slot":  # the container's slot, inactive from now on, is named with what to do
        assert "inactive replication slot 'bemi_local'" in caplog.text
        assert "SELECT pg_catalog.pg_drop_replication_slot('bemi_local'::pg_catalog.name);" in caplog.text
    else:
        assert "inactive replication slot" not in caplog.text
    if mode in ("takeover", "new-slot"):
        assert f"skipped {replayed - 4 - 1} changes" in caplog.text  # minus the 4 COPY rows it lost; pk change is 1
    doubled = {key: n for key, n in counts.items() if n > 1}
    assert doubled == {}, "nothing is stored twice"
    # The COPY rows the published worker lost (its unique key kept the first) and the 10 later inserts.
    assert sorted((r["primary_key"], r["operation"]) for r in ours) == sorted(
        [(str(i), "CREATE") for i in range(12, 16)] + [(str(i), "CREATE") for i in range(30, 40)])
    expected = Counter({(str(i), "CREATE"): 1 for i in [*range(1, 16), 20, 21, 22, *range(30, 40)]})
    expected.update({("1", "UPDATE"): 1, ("2", "DELETE"): 1, ("100", "CREATE"): 1, ("3", "DELETE"): 1})
    assert counts == expected, "every change once"
    # The chain (issue 18) starts after what the published worker stored: it verifies.
    with verify.connect(dsn) as conn:
        report = verify.verify(conn)
    assert report.exit_code == 0, verify.render_text(report)
    assert [(c.checked, c.unlinked) for c in report.chains] == [(written, published)]
    print(f"\ntakeover counts ({mode}): {published} rows stored by the published worker, "
          f"{replayed - 5} replayed by the slot and skipped, {len(ours)} stored by ours, {len(rows)} in all")
