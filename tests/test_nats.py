"""Scale-out through NATS JetStream (docs/scale-out.md): a reader publishes, ingesters store, exactly once.

Against a real nats-server with JetStream (tests/natsfixtures.py) and the test PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bemi import verify
from bemi.worker import message
from bemi.worker.ingest import IngestConfig, Ingester
from bemi.worker.jetstream import StreamSettings

COMPARE = ('SELECT commit_position, change_index, "schema", "table", operation, primary_key, before::text, '
           'after::text, context::text, position, transaction_id, committed_at, chain_link IS NOT NULL '
           'FROM bemi.changes ORDER BY commit_position, change_index')


def settings(nats_server, names) -> StreamSettings:
    return StreamSettings(url=nats_server.url, stream=names["stream"], prefix=names["prefix"])


def tracked(env, ddl: str, nats_server, names, empty: bool = False) -> StreamSettings:
    """Create a table (``ddl``), let a direct run make the publication and the slot (``empty``: then
    forget what it stored), and return the stream's settings."""
    env.execute(ddl)
    env.run_once()
    if empty:
        env.execute("DELETE FROM bemi.changes")
    return settings(nats_server, names)


def ingest_once(env, stream: StreamSettings, **overrides) -> Ingester:
    ingester = Ingester(IngestConfig(stream=stream, destination_dsn=env.dsn, once=True, fetch_timeout=0.3,
                                     **overrides))
    assert ingester.run() == 0
    return ingester


def test_subject_tokens_keep_one_token_per_name():
    assert message.subject("bemi", "app", "public", "orders") == "bemi.app.public.orders"
    assert message.subject("bemi", "a.b", "s*", "t >x") == "bemi.a%2Eb.s%2A.t%20%3Ex"
    assert message.subject_token("") == "%"
    assert message.subject_token("ünï") == "%C3%BCn%C3%AF"
    assert message.message_id("123/5", 99, 3) == "123/5:99:3"


@pytest.mark.parametrize("after", [
    {"id": 1, "t": "tab\there\nline\\back \"q\" \u00e9 \u2028 \x01", "b": True, "n": None, "big": 2 ** 63 - 1},
    {"id": 2, "huge": 10 ** 30, "neg": -(2 ** 63)},
    {"id": 3, "nested": {"a": [1, "x\ty"]}},
    {},
])
def test_the_orjson_and_json_readings_of_a_message_give_the_same_copy_line(monkeypatch, after):
    """orjson (optional) reads flat rows; the json module all the rest: where both can, the same line."""
    doc = {"v": 1, "source": "1/2", "database": "db", "schema": "s\tx", "table": "t", "primary_key": "k\\1",
           "operation": "UPDATE", "before": {"id": 1}, "after": after, "context": {"user": "ann", "SQL": "UPDATE \"t\""},
           "committed_at": "2026-12-02T12:00:00.123456+00:00", "queued_at": "2026-12-02T12:00:01+00:00",
           "transaction_id": 7, "position": 8, "commit_position": 9, "change_index": 0, "chain_link": "ab" * 32}
    data = json.dumps(doc).encode()
    fast = message.read_copy_line(data)
    monkeypatch.setattr(message, "_orjson", None)
    slow = message.read_copy_line(data)
    assert fast is not None and slow is not None
    fast_cols, slow_cols = fast[0].rstrip("\n").split("\t"), slow[0].rstrip("\n").split("\t")
    json_columns = {2, 13, 14}  # context, before, after (sink.COPY_CHANGES)
    assert [c for i, c in enumerate(fast_cols) if i not in json_columns] == \
        [c for i, c in enumerate(slow_cols) if i not in json_columns]

    def value(text: str):
        return json.loads(text.replace("\\\\", "\\"))  # (a JSON text holds no raw tab or newline)

    assert [value(fast_cols[i]) for i in sorted(json_columns)] == [value(slow_cols[i]) for i in sorted(json_columns)]
    assert value(slow_cols[14]) == after and fast[1:] == slow[1:] == ("t", "UPDATE", doc["committed_at"])


def test_published_changes_are_stored_like_the_direct_mode_and_verify(worker_env, nats_server, nats_names):
    env = worker_env
    env.execute("CREATE TABLE nz_a (id int PRIMARY KEY, v text, n numeric, j jsonb)")
    env.run_once()  # direct mode first: the publication and the slot
    env.execute("DELETE FROM bemi.changes")
    stream = settings(nats_server, nats_names)
    env.execute(env.context(user="ann", why="odd values")
                + "INSERT INTO nz_a VALUES (1, 'tab\there', 1.50, '{\"x\": 1e2, \"y\": [1.0, -0]}'),"
                " (2, 'line\nbreak \\ back', 100, 'null'), (3, NULL, -0.000, '\"\u00e9\"')")
    env.execute("UPDATE nz_a SET v = 'after' WHERE id = 1")
    env.execute("DELETE FROM nz_a WHERE id = 2")
    reader = env.run_once(publish=stream)
    assert reader.sink is None  # closed
    ingest_once(env, stream)
    published = env.execute(COMPARE)
    assert len(published) == 5 and all(row[-1] for row in published)
    ctx = json.loads(published[0][8])
    assert ctx == {"user": "ann", "why": "odd values"}

    # The same WAL stored by the direct mode (a second slot would read the same; here: replay the slot
    # through a direct worker from scratch after removing what NATS stored) gives the same rows.
    with verify.connect(env.dsn) as conn:
        report = verify.verify(conn)
    assert report.exit_code == verify.EXIT_INTACT, verify.render_text(report)

    # Ingested again (a second consumer from the start): nothing doubled.
    ingest_once(env, stream, consumer="second")
    assert env.execute(COMPARE) == published


def test_a_reader_run_again_publishes_nothing_twice(worker_env, nats_server, nats_names):
    env = worker_env
    stream = tracked(env, "CREATE TABLE nz_b (id int PRIMARY KEY)", nats_server, nats_names, empty=True)
    env.execute("INSERT INTO nz_b SELECT generate_series(1, 3000)")
    env.run_once(publish=stream)
    env.run_once(publish=stream)  # the checkpoint in the bucket: nothing read again
    env.execute("INSERT INTO nz_b SELECT generate_series(3001, 3010)")
    env.run_once(publish=stream)

    async def count() -> int:
        import nats

        nc = await nats.connect(stream.url)
        try:
            info = await nc.jetstream().stream_info(stream.stream)
            return info.state.messages
        finally:
            await nc.close()

    assert asyncio.run(count()) == 3010
    ingest_once(env, stream)
    assert env.execute("SELECT count(*), count(DISTINCT primary_key) FROM bemi.changes") == [(3010, 3010)]


def test_a_reader_stopped_past_its_checkpoint_publishes_the_same_links_again(worker_env, nats_server, nats_names,
                                                                           monkeypatch):
    """A reader killed after JetStream took four transactions and before its checkpoint: the next run
    commits after each transaction (other places, later times) yet publishes those four with the
    queued_at and links they had, so what the ingesters store verifies as one chain."""
    from bemi.worker.publisher import JetStreamSink

    env = worker_env
    stream = tracked(env, "CREATE TABLE nz_r (id int PRIMARY KEY)", nats_server, nats_names, empty=True)
    env.execute("INSERT INTO nz_r VALUES (1)")
    env.run_once(publish=stream)  # a checkpoint after the first transaction
    for i in range(2, 6):
        env.execute(f"INSERT INTO nz_r VALUES ({i})")

    class Killed(BaseException):
        pass

    def killed_before_the_checkpoint(self, last, xid, changes):
        self.js.wait_acked()  # all four are in the stream
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(JetStreamSink, "commit", killed_before_the_checkpoint)
        with pytest.raises(Killed):
            env.run_once(publish=stream)
    env.execute("INSERT INTO nz_r VALUES (6)")
    env.run_once(publish=stream, batch_rows=1)  # a checkpoint after each transaction
    ingest_once(env, stream)
    assert env.execute("SELECT count(*), count(DISTINCT primary_key) FROM bemi.changes") == [(6, 6)]
    with verify.connect(env.dsn) as conn:
        report = verify.verify(conn)
    assert report.exit_code == verify.EXIT_INTACT, verify.render_text(report)


def _stream_args(stream: StreamSettings) -> list[str]:
    return ["--stream", stream.stream, "--subject-prefix", stream.prefix]


def _spawn_ingester(env, stream: StreamSettings, *extra: str):
    import subprocess
    import sys

    from tests.workerapp.harness import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "bemi.cli", "ingest", "--from", stream.url, "--dsn", env.dsn,
                             *_stream_args(stream), "--ack-wait", "3", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    env.processes.append(proc)
    return proc


def test_kill_reader_kill_ingester_restart_nats_loses_and_doubles_nothing(worker_env, own_nats_server, nats_names):
    """SIGKILL the reader, SIGKILL an ingester, restart nats-server, all under a steady load: the changes
    stored through NATS are exactly those a direct worker on a second slot stored (0 lost, 0 doubled),
    and the chain verifies."""
    import signal
    import threading
    import time

    import psycopg

    from tests.test_worker_process import mixed_workload, tables_and_truth, wait_for, wait_for_line

    env = worker_env
    stream = settings(own_nats_server, nats_names)
    with tables_and_truth(env, "bemi_ntruth") as (truth, truth_dsn):
        count = lambda: env.execute("SELECT count(*) FROM bemi.changes")[0][0]  # noqa: E731

        def reader():
            proc = env.spawn("--publish", stream.url, *_stream_args(stream), "--batch-rows", "700",
                             "--poll-interval", "0.02")
            assert wait_for_line(proc, "reading slot")
            return proc

        result: dict = {}
        workload = threading.Thread(target=lambda: result.update(expected=mixed_workload(env.dsn, 8.0, seed=5)))
        rd = reader()
        ingesters = [_spawn_ingester(env, stream), _spawn_ingester(env, stream)]
        workload.start()
        assert wait_for(lambda: count() > 0, timeout=30)

        time.sleep(1.0)
        rd.send_signal(signal.SIGKILL)
        assert rd.wait() == -signal.SIGKILL
        rd = reader()

        time.sleep(1.0)
        ingesters[0].send_signal(signal.SIGKILL)
        assert ingesters[0].wait() == -signal.SIGKILL
        ingesters[0] = _spawn_ingester(env, stream)

        time.sleep(1.0)
        before = count()
        own_nats_server.restart(down=0.5)
        assert wait_for(lambda: count() > before, timeout=60), "nothing stored after the NATS restart"

        time.sleep(0.5)
        rd.send_signal(signal.SIGKILL)  # once more, after the restart
        rd.wait()
        rd = reader()
        workload.join()

        rd.send_signal(signal.SIGTERM)
        assert rd.wait(60) == 0
        done = env.cli("--once", "--publish", stream.url, *_stream_args(stream))
        assert done.returncode == 0, done.stderr
        for proc in ingesters:
            proc.send_signal(signal.SIGTERM)
        for proc in ingesters:
            assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        ingest_once(env, stream, ack_wait=3.0)
        truth.run_once(destination_dsn=truth_dsn)

        ours = env.execute(COMPARE.replace(", chain_link IS NOT NULL", ""))
        with psycopg.connect(truth_dsn) as conn:
            expected = conn.execute(COMPARE.replace(", chain_link IS NOT NULL", "")).fetchall()
        lost = len(set(expected) - set(ours))
        doubled = len(ours) - len(set(ours))
        print(f"NATS kill test: {len(expected)} changes committed, {len(ours)} stored, {lost} lost, "
              f"{doubled} doubled")
        assert (lost, doubled) == (0, 0)
        assert ours == expected and len(ours) == result["expected"] > 1000
        with verify.connect(env.dsn) as conn:
            report = verify.verify(conn)
        assert report.exit_code == verify.EXIT_INTACT, verify.render_text(report)


@pytest.mark.parametrize("chunk, raw", [(1000, True), (3, False)], ids=["one-chunk", "chunks-public-client-path"])
def test_malformed_messages_become_dead_letters_and_never_block(worker_env, nats_server, nats_names, monkeypatch,
                                                                chunk, raw):
    """Anyone who may publish to the subjects can send anything: what is not a storable v1 change is a
    dead letter (the message kept as it came), acked; the valid changes around it are stored. Also when
    the batch is read and COPied in chunks (a bad message in a later chunk), through nats-py's public
    path (Msg objects, one publish per ack) instead of the raw one, and without orjson."""
    from bemi.worker import ingest, jetstream

    monkeypatch.setattr(ingest, "CHUNK", chunk)
    if not raw:
        monkeypatch.setattr(jetstream, "_raw_delivery", lambda *args: False)
        monkeypatch.setattr(message, "_orjson", None)  # the json module's path (orjson is optional)
    env = worker_env
    table = f"nz_c{chunk}"
    stream = tracked(env, f"CREATE TABLE {table} (id int PRIMARY KEY)", nats_server, nats_names)
    env.execute(f"INSERT INTO {table} VALUES (1)")
    env.run_once(publish=stream)  # the stream, and one real change
    good = {"v": 1, "source": "x/1", "database": "other_db", "schema": "public", "table": "t", "primary_key": "7",
            "operation": "CREATE", "before": {}, "after": {"id": 7, "n": 1.50}, "context": {"a": 1},
            "committed_at": "2026-01-02T03:04:05.123456+00:00", "queued_at": "2026-01-02T03:04:06+00:00",
            "transaction_id": 9, "position": 100, "commit_position": 200, "change_index": 0, "chain_link": None}
    bad = [
        b"not json at all",
        b"\xff\xfe not utf-8",
        json.dumps({**good, "v": 2, "change_index": 1}).encode(),
        json.dumps({**good, "before": "a string", "change_index": 2}).encode(),
        json.dumps({**good, "committed_at": "yesterday", "change_index": 3}).encode(),
        json.dumps({**good, "committed_at": "2026-13-45T00:00:00+00:00", "change_index": 6}).encode(),
        json.dumps({**good, "table": "t" * 300, "change_index": 4}).encode(),
        json.dumps({**good, "after": {"nul": "\u0000"}, "change_index": 5}).encode(),
        b"[" * 5000 + b"]" * 5000,
        b"x" * 5000,  # larger than max_message_bytes below
    ]

    async def publish() -> None:
        import nats

        nc = await nats.connect(stream.url)
        try:
            js = nc.jetstream()
            for i, data in enumerate(bad):
                await js.publish(f"{stream.prefix}.other_db.public.t", data, headers={"Nats-Msg-Id": f"bad{i}"})
            await js.publish(f"{stream.prefix}.other_db.public.t",
                             json.dumps(good).replace('"n": 1.5', '"n": 1.50').encode(),
                             headers={"Nats-Msg-Id": "good"})
        finally:
            await nc.close()

    asyncio.run(publish())
    ingester = ingest_once(env, stream, max_message_bytes=4096)
    assert ingester._pull.raw is raw
    assert ingester.stats.dead_letters == len(bad)
    assert ingester.stored == 2 and ingester.stats.written == {("t", "CREATE"): 1, (table, "CREATE"): 1}
    rows = env.execute("SELECT database, after::text FROM bemi.changes ORDER BY database")
    assert [r[0] for r in rows] == ["other_db", env.execute("SELECT current_database()")[0][0]]
    assert json.loads(rows[0][1]) == {"id": 7, "n": 1.50} and "1.50" in rows[0][1]
    dead = env.execute("SELECT change, error FROM bemi._bemi_worker_failures WHERE source = %s ORDER BY id",
                       [f"nats:{stream.stream}"])
    assert sorted(bytes(d[0]) for d in dead) == sorted(bad)
    assert all(d[1] for d in dead)
    env.execute("DELETE FROM bemi._bemi_worker_failures WHERE source = %s", [f"nats:{stream.stream}"])


def test_a_pull_request_delivers_at_most_its_bytes_and_the_rest_follows(nats_server, nats_names):
    """A batch is bounded by bytes as well as by count: 40 messages of 1 KB with 5 KB per request come in
    requests of at most 5 messages, none lost; the bound never falls below what one message may weigh."""
    from bemi.worker.jetstream import JetStream, PullConsumer

    stream = StreamSettings(url=nats_server.url, stream=nats_names["stream"], prefix=nats_names["prefix"])
    js = JetStream(stream)
    try:
        js.ensure_stream()
        js.publish([(f"{stream.prefix}.db.public.t", b"x" * 1000, f"m{i}") for i in range(40)])
        js.wait_acked()
        api = js.nats.js.api
        js.call(js.js.add_consumer(stream.stream, api.ConsumerConfig(
            durable_name="bytes", ack_policy=api.AckPolicy.EXPLICIT, filter_subject=f"{stream.prefix}.>")))
        pull = js.call(PullConsumer(js, stream.stream, "bytes", max_bytes=1).start())
        assert pull.max_bytes == 2 * js.max_payload  # never below one message
        pull.max_bytes = 5000
        sizes = []
        while True:
            msgs = js.call(pull.fetch(1000, 0.2))
            if not msgs:
                break
            sizes.append(len(msgs))
            js.call(pull.ack(msgs))
        assert sum(sizes) == 40 and max(sizes) <= 5 and len(sizes) >= 8
    finally:
        js.close()


def test_the_example_webhook_forwarder_delivers_every_change_once_acked_after_2xx(worker_env, nats_server,
                                                                                  nats_names):
    """examples/nats_webhook.py against the real server: each change POSTed as its v1 document; a
    webhook that fails once gets it again."""
    import http.server
    import importlib.util
    import os
    import threading

    from tests.workerapp.harness import ROOT

    env = worker_env
    stream = tracked(env, "CREATE TABLE nz_d (id int PRIMARY KEY, v text)", nats_server, nats_names)
    env.execute(env.context(user="bob") + "INSERT INTO nz_d SELECT g, 'v' || g FROM generate_series(1, 20) g")
    env.run_once(publish=stream)

    received: list[tuple[str, dict]] = []
    failed_once: set[str] = set()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            key = self.headers["Idempotency-Key"]
            if key.endswith(":3") and key not in failed_once:  # the fourth change fails the first time
                failed_once.add(key)
                self.send_response(500)
            else:
                received.append((key, json.loads(body)))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    spec = importlib.util.spec_from_file_location("nats_webhook", os.path.join(ROOT, "examples", "nats_webhook.py"))
    assert spec and spec.loader
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        import time

        delivered = asyncio.run(example.forward(stream.url, url, stream.stream, f"{stream.prefix}.>", once=True))
        deadline = time.monotonic() + 30
        while delivered < 20 and time.monotonic() < deadline:  # the failed one after the nak's delay (5 s)
            time.sleep(1)
            delivered += asyncio.run(example.forward(stream.url, url, stream.stream, f"{stream.prefix}.>",
                                                     once=True))
        assert delivered == 20 and len(failed_once) == 1  # the failed one was delivered again
    finally:
        server.shutdown()
    assert len(received) == 20 and len({k for k, _ in received}) == 20
    documents = {d["primary_key"]: d for _, d in received}
    assert documents["5"]["after"] == {"id": 5, "v": "v5"} and documents["5"]["context"] == {"user": "bob"}
    assert documents["5"]["v"] == 1 and documents["5"]["operation"] == "CREATE"
    assert documents["5"]["table"] == "nz_d" and len(documents["5"]["chain_link"]) == 64


def test_manage_py_bemi_worker_publishes_and_ingests(worker_env, nats_server, nats_names):
    from django.core.management import call_command

    env = worker_env
    stream = tracked(env, "CREATE TABLE nz_e (id int PRIMARY KEY)", nats_server, nats_names)
    env.execute(env.context(via="manage.py") + "INSERT INTO nz_e SELECT generate_series(1, 50)")
    names = {"stream": stream.stream, "subject_prefix": stream.prefix, "verbosity": 0}
    call_command("bemi_worker", once=True, slot=env.slot, publication=env.publication, publish=stream.url, **names)
    assert env.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'nz_e'") == [(0,)]
    call_command("bemi_worker", "ingest", once=True, nats_from=stream.url, **names)
    assert env.execute("SELECT count(*), min(context::text) FROM bemi.changes WHERE \"table\" = 'nz_e'") == [
        (50, '{"via": "manage.py"}')]


def test_metrics_of_the_reader_and_the_ingester(worker_env, nats_server, nats_names):
    """/metrics: published and duplicate counters (reader); stored changes, duplicates skipped and the
    consumer's pending messages (ingester)."""
    import urllib.request

    pytest.importorskip("prometheus_client")
    from bemi.worker.metrics import MetricsServer

    env = worker_env
    stream = tracked(env, "CREATE TABLE nz_f (id int PRIMARY KEY)", nats_server, nats_names)
    env.execute("INSERT INTO nz_f SELECT generate_series(1, 30)")

    def scrape(stats) -> str:
        server = MetricsServer(stats, port=0).start()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}/metrics") as response:
                return response.read().decode()
        finally:
            server.stop()

    reader = env.run_once(publish=stream)
    text = scrape(reader.stats)
    assert "bemi_nats_published_total 30.0" in text and "bemi_nats_publish_duplicates_total 0.0" in text
    assert "bemi_nats_consumer_pending" not in text

    ingester = Ingester(IngestConfig(stream=stream, destination_dsn=env.dsn, fetch_timeout=0.3, batch=10))
    ingester.setup()
    try:
        ingester.consumer_info()
        assert ingester.stats.nats_consumer_pending == 30
        assert ingester.step() == 10
        ingester.finish_storing()  # (stored in another thread while the next batch is read)
        import time

        deadline = time.monotonic() + 10
        ingester.consumer_info()
        while (ingester.stats.nats_consumer_pending + ingester.stats.nats_consumer_ack_pending != 20
               and time.monotonic() < deadline):  # the acks reach the server a moment later
            time.sleep(0.1)
            ingester.consumer_info()
        text = scrape(ingester.stats)
        assert 'bemi_changes_written_total{operation="CREATE",table="nz_f"} 10.0' in text
        # 20 not stored yet: not delivered, or delivered ahead (the next batch is fetched while one is stored)
        pending, ack_pending = ingester.stats.nats_consumer_pending, ingester.stats.nats_consumer_ack_pending
        assert pending + ack_pending == 20
        assert f"bemi_nats_consumer_pending {pending:.1f}" in text
        assert f"bemi_nats_consumer_ack_pending {ack_pending:.1f}" in text
        assert "bemi_nats_ingest_duplicates_total 0.0" in text
        assert "bemi_nats_published" not in text
    finally:
        ingester.close()


def test_bemi_status_shows_the_stream_and_the_consumers_lag(worker_env, nats_server, nats_names, capsys):
    from bemi.cli import status_main

    env = worker_env
    stream = tracked(env, "CREATE TABLE nz_g (id int PRIMARY KEY)", nats_server, nats_names)
    env.execute("INSERT INTO nz_g SELECT generate_series(1, 25)")
    env.run_once(publish=stream)
    ingester = Ingester(IngestConfig(stream=stream, destination_dsn=env.dsn, fetch_timeout=0.3))
    ingester.setup()  # the consumer, nothing stored yet
    ingester.close()
    base = ["--dsn", env.dsn, "--slot", env.slot, "--publication", env.publication,
            "--nats", stream.url, "--nats-stream", stream.stream]

    def status(*extra: str) -> tuple[int, str]:
        code = status_main([*base, *extra])
        return code, capsys.readouterr().out

    code, out = status("--json")
    nats = json.loads(out)["nats"]
    assert nats["messages"] == 25 and nats["consumer_exists"]
    assert nats["consumer_pending"] + nats["consumer_ack_pending"] == 25 and nats["consumer_lag_seconds"] > 0
    assert nats["reader_checkpoint"]["end_lsn"] > 0
    code, out = status()
    assert "nats stream   " + stream.stream in out and "nats consumer bemi_ingest: " in out

    ingest_once(env, stream)
    code, out = status("--json")
    nats = json.loads(out)["nats"]
    assert (nats["consumer_pending"], nats["consumer_ack_pending"], nats["consumer_lag_seconds"]) == (0, 0, 0.0)

    code, out = status_main(["--dsn", env.dsn, "--slot", env.slot, "--publication", env.publication,
                             "--nats", "nats://127.0.0.1:1", "--json"]), capsys.readouterr().out
    assert code == 1 and any("cannot reach NATS" in p for p in json.loads(out)["problems"])


def test_a_change_larger_than_nats_takes_is_a_dead_letter_and_blocks_nothing(worker_env, nats_server, nats_names):
    """Any role may write a row larger than the server's max_payload: the reader publishes its identity as
    a dead letter (not chained) and goes on; the chain of the rest verifies."""
    env = worker_env
    stream = tracked(env, "CREATE TABLE nz_h (id int PRIMARY KEY, v text)", nats_server, nats_names)
    env.execute("INSERT INTO nz_h VALUES (1, 'small'), (2, repeat('x', 20000)), (3, 'small too')")
    env.run_once(publish=stream, publish_max_message=8192)
    ingester = ingest_once(env, stream)
    assert ingester.stats.dead_letters == 1
    assert env.execute("SELECT primary_key FROM bemi.changes WHERE \"table\" = 'nz_h' ORDER BY 1") == [("1",), ("3",)]
    (error, change), = env.execute("SELECT error, change FROM bemi._bemi_worker_failures WHERE source = %s",
                                   [f"nats:{stream.stream}"])
    assert "max_payload" in error and json.loads(bytes(change))["primary_key"] == "2"
    with verify.connect(env.dsn) as conn:
        report = verify.verify(conn)
    assert report.exit_code == verify.EXIT_INTACT, verify.render_text(report)
    env.execute("DELETE FROM bemi._bemi_worker_failures WHERE source = %s", [f"nats:{stream.stream}"])


def test_two_ingesters_share_the_consumer_and_make_each_partition_once(worker_env, nats_server, nats_names):
    """Changes of months that have no partition yet, stored by two ingesters at once: every change
    once, each in its month's partition (made by one of them, under partitions.py's lock), none left
    in changes_default."""
    import threading

    env = worker_env
    env.run_once()  # bemi.changes (partitioned)
    stream = settings(nats_server, nats_names)
    months = ["2019-03", "2019-04", "2019-05"]

    async def publish() -> None:
        import nats

        nc = await nats.connect(stream.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name=stream.stream, subjects=[f"{stream.prefix}.>"])
            for i in range(3000):
                doc = {"v": 1, "source": "s/1", "database": "two_db", "schema": "public", "table": "t",
                       "primary_key": str(i), "operation": "CREATE", "before": {}, "after": {"id": i},
                       "context": {}, "committed_at": f"{months[i % 3]}-15T10:00:00+00:00",
                       "queued_at": f"{months[i % 3]}-15T10:00:01+00:00", "transaction_id": i, "position": i,
                       "commit_position": i, "change_index": 0, "chain_link": None}
                await js.publish(f"{stream.prefix}.two_db.public.t", json.dumps(doc).encode(),
                                 headers={"Nats-Msg-Id": f"two{i}"})
        finally:
            await nc.close()

    asyncio.run(publish())
    ingesters = [Ingester(IngestConfig(stream=stream, destination_dsn=env.dsn, once=True, fetch_timeout=0.3,
                                       batch=100)) for _ in range(2)]
    codes: list[int] = []
    threads = [threading.Thread(target=lambda i=i: codes.append(i.run())) for i in ingesters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert codes == [0, 0]
    assert all(i.stored > 0 for i in ingesters), [i.stored for i in ingesters]  # both took a share
    assert sum(i.stored for i in ingesters) == 3000
    rows = env.execute("SELECT tableoid::regclass::text, count(*), count(DISTINCT primary_key) FROM bemi.changes "
                       "WHERE database = 'two_db' GROUP BY 1 ORDER BY 1")
    assert rows == [("changes_p20190301", 1000, 1000), ("changes_p20190401", 1000, 1000),
                    ("changes_p20190501", 1000, 1000)], rows
    for name in ("changes_p20190301", "changes_p20190401", "changes_p20190501"):
        env.execute(f"DROP TABLE bemi.{name}")


def test_masked_and_ignored_columns_are_applied_by_the_reader(worker_env, nats_server, nats_names):
    """The stream never carries a masked value, and an update of ignored columns only is not published."""
    from bemi import tracking as tr

    env = worker_env
    env.execute("CREATE TABLE nz_m (id int PRIMARY KEY, secret text, seen timestamptz)")
    rules = tr.Tracking.build(masked_columns=["nz_m.secret"], ignored_columns=["nz_m.seen"])
    env.run_once(tracking=rules, masking_key="k" * 32)
    stream = settings(nats_server, nats_names)
    env.execute("INSERT INTO nz_m VALUES (1, 'hunter2', now())")
    env.execute("UPDATE nz_m SET seen = now() + interval '1 day' WHERE id = 1")  # ignored columns only
    env.run_once(publish=stream, tracking=rules, masking_key="k" * 32)

    async def contents() -> list[bytes]:
        import nats

        nc = await nats.connect(stream.url)
        try:
            sub = await nc.jetstream().subscribe(f"{stream.prefix}.>", ordered_consumer=True)
            out = []
            while True:
                try:
                    out.append((await sub.next_msg(timeout=1)).data)
                except Exception:
                    return out
        finally:
            await nc.close()

    messages = asyncio.run(contents())
    assert len(messages) == 1 and b"hunter2" not in messages[0]
    ingest_once(env, stream)
    (after,), = env.execute("SELECT after::text FROM bemi.changes WHERE \"table\" = 'nz_m'")
    assert "hunter2" not in after and json.loads(after)["secret"] != "hunter2"


def test_an_ingester_drops_partitions_older_than_its_retention(worker_env, nats_server, nats_names, caplog):
    """`bemi-worker ingest --retention` keeps `changes` as the direct worker's --retention does: whole
    partitions older than the retention dropped, the cut recorded in _bemi_pruned, the new changes stored."""
    from datetime import datetime, timedelta, timezone

    from tests.test_prune import past

    env = worker_env
    stream = tracked(env, "CREATE TABLE nz_r2 (id int PRIMARY KEY)", nats_server, nats_names)
    env.execute("INSERT INTO nz_r2 VALUES (1)")
    env.run_once(publish=stream)
    past(env, "2024-01", 31)
    past(env, "2024-02", 2)
    caplog.set_level("INFO", logger="bemi.worker")
    ingest_once(env, stream, retention=timedelta(days=30),
                clock=lambda: datetime(2024, 3, 10, tzinfo=timezone.utc))
    assert "dropped partition bemi.changes_p20240101 (2024-01-01 .. 2024-02-01, 93 changes)" in caplog.text
    assert env.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'old_t'") == [(6,)]
    assert env.execute("SELECT primary_key FROM bemi.changes WHERE \"table\" = 'nz_r2'") == [("1",)]
    assert env.execute("SELECT pruned_before, pruned_by FROM bemi._bemi_pruned") == [
        (datetime(2024, 2, 1, tzinfo=timezone.utc), "bemi-worker ingest --retention")]


def test_messages_planted_in_a_readers_name_never_stop_it(worker_env, nats_server, nats_names):
    """Whoever may publish to the subjects can send messages with the reader's message ids and anything in
    them; reading back what it published after its checkpoint, the reader skips what it did not write."""
    stream = tracked(worker_env, "CREATE TABLE nz_p (id int PRIMARY KEY)", nats_server, nats_names, empty=True)
    env = worker_env
    env.execute("INSERT INTO nz_p VALUES (1)")
    env.run_once(publish=stream)

    async def plant() -> None:
        import nats

        nc = await nats.connect(stream.url)
        try:
            js = nc.jetstream()
            first = await js.get_msg(stream.stream, seq=1)
            source = first.headers["Nats-Msg-Id"].rsplit(":", 2)[0]
            for msg_id, data in [(f"{source}:garbage", b"{}"), (f"{source}:999999999999:0", b"not json"),
                                 (f"{source}:999999999998:0", b'{"queued_at": "yesterday"}'),
                                 (f"{source}:999999999997:0", b"[1]"), (f"{source}:999999999996:0", b"\xff")]:
                await js.publish(first.subject, data, headers={"Nats-Msg-Id": msg_id})
        finally:
            await nc.close()

    asyncio.run(plant())
    env.execute("INSERT INTO nz_p VALUES (2)")
    env.run_once(publish=stream)  # reads back what follows its checkpoint: the planted messages
    ingester = ingest_once(env, stream)
    assert env.execute("SELECT primary_key FROM bemi.changes WHERE \"table\" = 'nz_p' ORDER BY 1") == [("1",), ("2",)]
    assert ingester.stats.dead_letters == 5
    env.execute("DELETE FROM bemi._bemi_worker_failures WHERE source = %s", [f"nats:{stream.stream}"])
