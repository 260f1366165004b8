"""Values: every common type stored exactly as ``to_jsonb()`` of the source row shows it."""

from __future__ import annotations

import pytest

from bemi.worker.values import JsonValues, sanitize_json_text

COLUMNS = """
    id bigint PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric, n2 numeric(12, 4),
    t text, vc varchar(20), c char(4), qc "char", nm name,
    j json, jb jsonb,
    d date, ts timestamp, tstz timestamptz, ts3 timestamp(3), tm time, tmtz timetz, iv interval,
    u uuid, by bytea, e mood_v, dom posint_v, domtxt email_v,
    ia int[], ia2 int[], ta text[], ja jsonb[], tsa timestamptz[], da date[], ba bool[], na numeric[],
    ea mood_v[], ua uuid[], fa float8[],
    ip inet, cidr_ cidr, mac macaddr, bits bit(3), vbits varbit, pt point, bx box, money_ money,
    rng int4range, tsv tsvector, o oid, addr addr_v, addrs addr_v[], bxa box[]
"""

ROWS = [
    # typical values
    """(1, true, 1, 2, 3, 1.5, 2.25, 3.14159, 12.5, 'text', 'varchar', 'ch', 'q', 'nm',
        '{"a": [1, 2.50, {"b": null}], "c": "d"}', '{"a": [1, 2.50, {"b": null}], "c": "d"}',
        '2023-12-11', '2023-12-11 17:09:09.12', '2023-12-11 17:09:09.12+00', '2023-12-11 17:09:09.1234',
        '17:09:09.5', '17:09:09+05:30', '1 year 2 mons 3 days 04:05:06.7',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\xdeadbeef', 'happy', 7, 'a@b.c',
        '{1,2,3}', '{{1,2},{3,4}}', '{"a","b,c","d\\"e","f\\\\g",NULL,""}',
        ARRAY['{"x": 1}'::jsonb, '[1, "two"]'::jsonb], '{"2023-12-11 17:09:09+00","infinity"}',
        '{2023-12-11,NULL}', '{t,f}', '{1.10,NaN,-0}', '{sad,ok}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}',
        '{1.5,Infinity,-Infinity,NaN}',
        '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '101', '1101', '(1.5,2)', '((0,0),(1,1))', 12.34,
        '[1,10)', 'a fat cat', 42,
        ROW('Main "St", 1\\', 5, '{a,"b c"}', '2023-12-11 17:09:09.5+00', ROW(true, 1.50))::addr_v,
        ARRAY[ROW('x', NULL, '{}', NULL, NULL)::addr_v, NULL], '{(1,1),(0,0);(2,2),(1,1)}')""",
    # edges: extreme numbers, infinities, BC, unicode, empty values
    """(2, false, -32768, -2147483648, 9223372036854775807, 'NaN', 'Infinity',
        123456789012345678901234567890.123456789012345678901234567890, -0.0001,
        'ünï ☃ "quoted" \\ back', '', '    ', '"', '',
        '[]', '{}',
        '4713-01-01 BC', 'infinity', '-infinity', '0044-03-15 12:00:00 BC',
        '00:00:00', '00:00:00-01', '-3 days -00:00:01',
        '00000000-0000-0000-0000-000000000000', '\\x', 'sad', 1, '',
        '{}', '[0:1]={7,8}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{-0,1e-7,1.7976931348623157e308}',
        '::1', '::/0', '00:00:00:00:00:00', '000', '', '(0,0)', '((0,0),(0,0))', -0.5,
        'empty', '', 0, ROW(NULL, NULL, NULL, NULL, NULL)::addr_v, '{}', '{}')""",
    # dates and times at the ends of Python's range and beyond
    """(3, NULL, 0, 0, -9223372036854775808, -1.5e-10, 1e300, 0, 0, NULL, NULL, NULL, NULL, NULL,
        '"just a string"', '12.50', '10000-01-01', '10000-01-01 00:00:00', '10000-01-01 00:00:00+00',
        '0001-01-01 00:00:00', '24:00:00', '24:00:00+14', '0',
        NULL, NULL, NULL, NULL, NULL, '{{NULL}}', NULL, '{{{"a"}}}', '{null}', NULL, NULL, NULL, NULL,
        NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)""",
    # all NULL
    "(4" + ", NULL" * 52 + ")",
]


@pytest.fixture
def every_type(worker_env):
    env = worker_env
    env.execute("DROP TABLE IF EXISTS every_type_w; DROP TYPE IF EXISTS mood_v; DROP DOMAIN IF EXISTS posint_v; "
                "DROP DOMAIN IF EXISTS email_v; DROP TYPE IF EXISTS addr_v; DROP TYPE IF EXISTS pair_v")
    env.execute("CREATE TYPE mood_v AS ENUM ('sad', 'ok', 'happy')")
    env.execute("CREATE DOMAIN posint_v AS integer CHECK (VALUE > 0)")
    env.execute("CREATE DOMAIN email_v AS text")
    env.execute("CREATE TYPE pair_v AS (flag bool, amount numeric)")
    env.execute("CREATE TYPE addr_v AS (street text, n int, tags text[], at timestamptz, pair pair_v)")
    env.execute(f"CREATE TABLE every_type_w ({COLUMNS})")
    env.execute("ALTER TABLE every_type_w REPLICA IDENTITY FULL")
    yield env
    env.execute("DROP TABLE IF EXISTS every_type_w; DROP TYPE mood_v; DROP DOMAIN posint_v; DROP DOMAIN email_v; "
                "DROP TYPE addr_v; DROP TYPE pair_v")


def test_every_type_matches_to_jsonb_of_the_source_row(every_type):
    env = every_type
    env.run_once()
    assert env.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'every_type_w'")[0][0] == 53
    for row in ROWS:
        env.execute(f"INSERT INTO every_type_w VALUES {row}")
    expected_after = dict(env.execute("SELECT id, to_jsonb(row_)::text FROM every_type_w row_"))
    env.execute("UPDATE every_type_w SET b = NOT b WHERE id < 3")
    updated_after = dict(env.execute("SELECT id, to_jsonb(row_)::text FROM every_type_w row_"))
    env.run_once()
    created = dict(env.execute("SELECT primary_key::bigint, after::text FROM bemi.changes WHERE operation = 'CREATE'"))
    assert sorted(created) == [1, 2, 3, 4]
    for key, expected in expected_after.items():
        assert created[key] == expected, f"row {key}"
    for key, before, after in env.execute("SELECT primary_key::bigint, before::text, after::text FROM bemi.changes "
                                          "WHERE operation = 'UPDATE'"):
        assert before == expected_after[key]
        assert after == updated_after[key]


def test_json_column_with_nul_escape_is_stored_with_a_replacement_character(worker_env):
    env = worker_env
    env.execute("CREATE TABLE json_nul_w (id int PRIMARY KEY, j json)")
    env.run_once()
    env.execute("""INSERT INTO json_nul_w VALUES (1, '{"a": "x\\u0000y", "b": "\\\\u0000", "c": "\\ud800"}')""")
    env.run_once()
    (after,) = [r["after"] for r in env.changes()]
    assert after == {"id": 1, "j": {"a": "x\ufffdy", "b": "\\u0000", "c": "\ufffd"}}


# -- pure -------------------------------------------------------------------------------------

@pytest.mark.parametrize("oid, text, fragment", [
    (20, b"9223372036854775807", "9223372036854775807"),
    (1700, b"1.50", "1.50"),
    (1700, b"NaN", '"NaN"'),
    (701, b"-Infinity", '"-Infinity"'),
    (16, b"t", "true"),
    (1184, b"2023-12-11 17:09:09.12+00", '"2023-12-11T17:09:09.12+00:00"'),
    (1184, b"2023-12-11 17:09:09+05:30", '"2023-12-11T17:09:09+05:30"'),
    (1184, b"0044-03-15 12:00:00+00 BC", '"0044-03-15T12:00:00+00:00 BC"'),
    (1114, b"infinity", '"infinity"'),
    (1082, b"2023-12-11", '"2023-12-11"'),
    (17, b"\\xdeadbeef", '"\\\\xdeadbeef"'),
    (1007, b"[0:1]={{1,NULL},{3,4}}", "[[1,null],[3,4]]"),
    (1009, b'{"a,b","c\\"d",NULL}', '["a,b","c\\"d",null]'),
    (3802, b'{"a": 1}', '{"a": 1}'),
    (25, "ünï".encode(), '"ünï"'),
    (1020, b"{(1,1),(0,0);(2,2),(1,1)}", '["(1,1),(0,0)","(2,2),(1,1)"]'),  # box[]: ';' between elements
])
def test_fragments(oid, text, fragment):
    assert JsonValues().format(oid)(text) == fragment


def test_sanitize_json_text_only_touches_real_escapes():
    assert sanitize_json_text('{"a": "\\u0000"}') == '{"a": "\\ufffd"}'
    assert sanitize_json_text('{"a": "\\\\u0000"}') == '{"a": "\\\\u0000"}'
    assert sanitize_json_text('"\\ud83d\\ude00 \\udc00"') == '"\\ud83d\\ude00 \\ufffd"'
