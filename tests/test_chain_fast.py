"""The chain's fast path: rows of tables of canonical types are written in canonical form already
(keys sorted, compact, values that parse back to the same text), so the chain hashes their text as it
is. It must give the very bytes of the generic canonical form (bemi/chain.py), which bemi_verify
computes from the jsonb read back: checked here on real pgoutput messages of awkward values."""

from __future__ import annotations

from bemi.chain import GENESIS, Chain, canonical_json
from bemi.worker.stitch import Stitcher
from bemi.worker.values import JsonValues

BIG = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)"  # stored out of line (TOAST)


def test_the_fast_path_gives_the_bytes_of_the_generic_canonical_form(worker_env):
    env = worker_env
    env.execute("DROP TABLE IF EXISTS fast_t, fast_k, fast_n")
    env.execute("DROP TYPE IF EXISTS fast_mood")
    env.execute("CREATE TYPE fast_mood AS ENUM ('ok', 'é \"q\" \\')")
    # Columns of every canonical kind, in an order far from their names' order (upper case, unicode, quotes).
    env.execute('CREATE TABLE fast_t (id int8 PRIMARY KEY, zeta text, "Ärger" varchar(40), "a""q" int2, '
                '"ключ" int4, "é" bool, d date, ts timestamp, tz timestamptz, u uuid, b bytea, m fast_mood, '
                'ta text[], ia int4[], "Z" time, iv interval, o oid, e text)')
    env.execute("ALTER TABLE fast_t REPLICA IDENTITY FULL")
    env.execute('CREATE TABLE fast_k (id int PRIMARY KEY, "b" text, "a" text)')
    env.execute("ALTER TABLE fast_k REPLICA IDENTITY DEFAULT")  # key-only old rows (bemi's trigger made it FULL)
    env.execute("CREATE TABLE fast_n (id int PRIMARY KEY, n numeric, f float8, j json, jb jsonb)")
    env.execute(f'CREATE PUBLICATION "{env.publication}" FOR TABLE fast_t, fast_k, fast_n')
    env.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [env.slot])
    env.execute(env.context(user="ünï") + """
        INSERT INTO fast_t VALUES
          (-9223372036854775808, 'café 😀 "q" \\ back', E'tab\\tnew\\nline\\r\\x01\\x1f ctrl', -32768, 2147483647,
           true, 'infinity', '0044-03-15 12:00:00 BC', '2026-12-02 12:00:00.123456+05:30',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff5c22', 'é "q" \\', '{{"a,b","{}"},{NULL,"\\"q\\" \\\\"}}',
           '{{1,-2},{NULL,4}}', '24:00:00', '1 day -02:00:00.5', 4294967295, ''),
          (0, '', '', 0, 0, false, '-infinity', '-infinity', 'infinity', NULL, '\\x', 'ok', '{}', '{}', NULL,
           NULL, 0, NULL),
          (1, NULL, E'\\u2028 \\u00a0 \\u007f', NULL, NULL, NULL, '2000-02-29', '2000-02-29 23:59:59.999999',
           '1970-01-01 00:00:00+00', NULL, NULL, NULL, '{""}', '{0}', '00:00:00.000001', '0', 1, """ + BIG + """)
    """)
    env.execute("UPDATE fast_t SET \"é\" = NOT coalesce(\"é\", false) WHERE id = 1")  # e unchanged, TOASTed
    env.execute("UPDATE fast_t SET zeta = E'new\\nline' WHERE id = 0")
    env.execute("DELETE FROM fast_t WHERE id = -9223372036854775808")
    env.execute("INSERT INTO fast_k VALUES (1, 'b', 'a'), (2, NULL, '\"')")
    env.execute("UPDATE fast_k SET a = 'A' WHERE id = 1")
    env.execute("DELETE FROM fast_k WHERE id = 2")
    env.execute("INSERT INTO fast_n VALUES (1, 1.50, 1e300, '{\"b\": 1, \"a\": 2}', '{\"y\": 1.0}'), (2, 100, 0.5, "
                "'[]', '{}')")

    stitcher = Stitcher(JsonValues(), lambda rel: ["id"], 0)
    rows: list = []
    for lsn, data in env.execute(
            "SELECT (lsn - '0/0')::int8, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s, 'messages', 'true')", [env.slot, env.publication]):
        stitcher.feed(lsn, bytes(data), rows)
    by_table = {t: [r for r in rows if r.table == t] for t in ("fast_t", "fast_k", "fast_n")}
    assert [len(v) for v in by_table.values()] == [6, 4, 2]
    assert any(r.before.startswith('{"id":') and r.before.endswith("}") and "," not in r.before
               for r in by_table["fast_k"])  # a key-only old row
    fast, generic = Chain(GENESIS, "db"), Chain(GENESIS, "db")
    for r in rows:
        assert r.canonical is (r.table != "fast_n"), r
        if r.canonical:
            assert canonical_json(r.before) == r.before and canonical_json(r.after) == r.after, r
        for text in (r.before, r.after):  # and what bemi_verify computes from the jsonb read back
            (server,), = env.execute("SELECT %s::jsonb::text", [text])
            assert canonical_json(server) == canonical_json(text), text
        args = (r.schema, r.table, r.primary_key, r.operation, r.before, r.after, r.context, r.committed_at, 7,
                r.transaction_id, r.position, r.commit_position, r.change_index)
        assert fast.append(*args, canonical=r.canonical) == generic.append(*args), r
    big = [r for r in by_table["fast_t"] if r.operation == "UPDATE" and '"e":"' in r.before]
    assert big and all(len(r.after) > 12_000 for r in big)  # the unchanged TOASTed value from the old row
