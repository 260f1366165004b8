"""The sink's COPY text: every character a name, a key or a value may hold arrives as it was.

Sink.write() escapes the texts that may need COPY escapes (backslash, tab, newline,
carriage return) in one pass per row and counts rows per run of a table; this puts
those characters everywhere they can be: schema and table names, primary keys, values,
JSON with raw whitespace, and a change without a primary key (COPY's NULL).
"""

from __future__ import annotations

NAMES = ['tab\there', 'new\nline', 'back\\slash', 'cr\rturn', '\\N']


def test_names_keys_and_values_with_copy_specials_are_stored_as_they_are(worker_env):
    env = worker_env
    for name in NAMES:
        quoted = '"' + name.replace('"', '""') + '"'
        env.execute(f"DROP TABLE IF EXISTS {quoted}")
        env.execute(f"CREATE TABLE {quoted} (k text PRIMARY KEY, j json, t text)")
    env.execute("DROP TABLE IF EXISTS copy_nokey; CREATE TABLE copy_nokey (t text)")
    try:
        env.run_once()
        keys = ["a\tb", "c\nd", "e\\f", "g\rh", "\\N", "\\\\N", "", "plain"]
        for name in NAMES:
            quoted = '"' + name.replace('"', '""') + '"'
            for key in keys:
                env.execute(f"INSERT INTO {quoted} VALUES (%s, %s, %s)",
                            [key, '{"a":\t[1,\n2],\r\n "b\\\\": "x\\ty"}', key + "\t\\\n"])
        env.execute("INSERT INTO copy_nokey VALUES ('no key\there'), (NULL)")
        env.run_once()
        for name in NAMES:
            rows = env.changes('"table" = %s', [name])
            assert sorted(r["primary_key"] for r in rows) == sorted(keys), name
            quoted = '"' + name.replace('"', '""') + '"'
            expected = {k: j for k, j in env.execute(f"SELECT k, to_jsonb(r) FROM {quoted} r")}
            assert {r["primary_key"]: r["after"] for r in rows} == expected
            assert all(r["schema"] == "public" for r in rows)
        rows = env.changes("\"table\" = 'copy_nokey'")
        assert [(r["primary_key"], r["after"]) for r in rows] == [(None, {"t": "no key\there"}), (None, {"t": None})]
    finally:
        for name in NAMES:
            env.execute('DROP TABLE IF EXISTS "' + name.replace('"', '""') + '"')
        env.execute("DROP TABLE copy_nokey")
