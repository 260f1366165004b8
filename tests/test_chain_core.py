"""The hash chain of tamper evidence (issue 18), its pure part: canonical bytes and links (bemi/chain.py).

The worker's sink, bemi_verify and the NATS reader all compute links with bemi/chain.py; here its canonical
form is checked against what a real jsonb gives back.
"""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg

from bemi.chain import GENESIS, Chain, canonical_json, change_bytes, epoch_micros, link

UTC = timezone.utc

# JSON text as the worker may write it (values.py fragments, json columns, contexts) that jsonb
# normalises: key order and duplicates, whitespace, escapes, numbers.
ODD_JSON = [
    '{}', '[]', '{"a":{}}', '[[],[[]],{}]', '{"b":1,"a":2,"aa":3,"é":4,"z":5}', '{"k":1,"k":2}',
    '{ "spaced" :  [ 1 , 2 ] }', '{"s":"caf\\u00e9 \\ud83d\\ude00 😀 \\" \\\\ \\/ \\n\\t\\r\\b\\f \\u001f \\u007f"}',
    '{"n":[0,-0,-0.0,1.50,1.5,1e2,1.0E+2,1E-7,-1.25e-05,0.1e1,123456789012345678901234567890.000100]}',
    '{"big":9223372036854775807,"bigger":-99999999999999999999999999999999999999}',
    '{"long":' + "7" * 5000 + '}', '{"longf":1e5000}', '{"tiny":1e-300}',
    '{"nested":[[1,[2,[3,[4,{"x":[null,true,false]}]]]]]}', '{"null":null,"t":true,"f":false}',
    '{"\\u0041":"key escaped","":"empty key"}', '"just a string"', '17', 'null',
]


def test_canonical_bytes_are_the_same_from_the_workers_text_and_from_jsonb(pg_server):
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        for text in ODD_JSON:
            (server,), = conn.execute("SELECT %s::jsonb::text", [text]).fetchall()
            assert canonical_json(text) == canonical_json(server), text
        # Different values stay different: a number is not its text, scale is kept, -0 is 0.
        assert canonical_json('{"a":1.5}') != canonical_json('{"a":"1.5"}')
        assert canonical_json('{"a":1.50}') != canonical_json('{"a":1.5}')
        assert canonical_json('{"a":-0}') == canonical_json('{"a":0}')
        assert canonical_json('{"a":1e2}') == canonical_json('{"a":100}')
        assert canonical_json('{"a":[1,2]}') != canonical_json('{"a":[2,1]}')


def test_the_writers_chain_and_the_verifiers_bytes_agree():
    at = datetime(2026, 12, 2, 4, 30, 1, 123456, tzinfo=UTC)
    chain = Chain(GENESIS, "dätabase")
    rows = [("public", "t\tab", None, "CREATE", "{}", '{"b":1.50,"a":"\\u00e9"}', '{"SQL":"x"}', at, 5, 6, 7, 0),
            ("other", "t\tab", "k\n1", "UPDATE", '{"a":1}', '{"a":2}', '{"SQL":"x"}', at, 5, 8, 7, 1)]
    prev = GENESIS
    for schema, table, pk, op, before, after, ctx, committed, xid, pos, cpos, idx in rows:
        got = chain.append(schema, table, pk, op, before, after, ctx, committed, 99, xid, pos, cpos, idx)
        data = change_bytes("dätabase", schema, table, pk, op, canonical_json(before), canonical_json(after),
                            canonical_json(ctx), epoch_micros(committed), 99, xid, pos, cpos, idx)
        assert got == link(prev, data)
        prev = got
    mark = chain.mark()
    chain.append("public", "t", "1", "DELETE", "{}", "{}", "{}", at, 1, 1, 1, 1, 0)
    chain.reset(mark)
    assert chain.head == prev
