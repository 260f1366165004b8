"""Which statements carry the context (bemi.statements, no database)."""

import pytest

from bemi.statements import is_tracked_write

WRITES = [
    'INSERT INTO "t" ("a") VALUES (%s) RETURNING "t"."id"',
    "insert into t values (1)",
    'UPDATE "t" SET "a" = %s WHERE "t"."id" = %s',
    'DELETE FROM "t" WHERE "t"."id" IN (%s, %s)',
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
    "  \n\t INSERT INTO t VALUES (1)",
    "-- a comment\nINSERT INTO t VALUES (1)",
    "/* a comment */ UPDATE t SET a = 1",
    "/* multi\nline */ -- and more\n  DELETE FROM t",
    "(INSERT INTO t VALUES (1))",
    "WITH x AS (INSERT INTO t (a) VALUES (1) RETURNING id) SELECT id FROM x",
    "WITH x AS (SELECT 1) UPDATE t SET a = 1",
    "with recursive x as (select 1) delete from t where id in (select * from x)",
    "WITH x AS (SELECT 1) MERGE INTO t USING x ON true WHEN MATCHED THEN DELETE",
    "SELECT 1; INSERT INTO t VALUES (1)",
    "INSERT INTO t SELECT * FROM s ON CONFLICT (id) DO UPDATE SET a = EXCLUDED.a",
]

NOT_WRITES = [
    'SELECT "t"."id" FROM "t" WHERE "t"."a" = %s',
    "select 'insert into t values (1)'",
    'SELECT "t"."id" FROM "t" FOR UPDATE',
    "WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x",
    "WITH x AS (SELECT * FROM t FOR NO KEY UPDATE) SELECT * FROM x",
    "WITH x AS (SELECT 'delete from t' AS q) SELECT q FROM x",
    "WITH x AS (SELECT 1 AS a) SELECT a FROM x -- UPDATE t",
    "CREATE TABLE t (id int)",
    "ALTER TABLE t ADD COLUMN update_count int",
    "DROP TABLE t",
    "TRUNCATE t",
    "COPY t FROM STDIN",
    "SET search_path = public",
    "SAVEPOINT s1",
    "RELEASE SAVEPOINT s1",
    "BEGIN",
    "COMMIT",
    "EXPLAIN SELECT 1",
    "VALUES (1)",
    "SELECT 1;",
    "SELECT 'a;b'",
    "",
    "   ",
    "-- only a comment",
    "/* unterminated",
    "SELECT pg_logical_emit_message(true, '_bemi', 'x')",
]


@pytest.mark.parametrize("sql", WRITES)
def test_writes(sql):
    assert is_tracked_write(sql) is True


@pytest.mark.parametrize("sql", NOT_WRITES)
def test_not_writes(sql):
    assert is_tracked_write(sql) is False


def test_long_sql_is_classified_without_cache():
    from bemi.statements import _classify_cached

    long_insert = "INSERT INTO t (a) VALUES " + ", ".join(["(%s)"] * 5000)
    before = _classify_cached.cache_info().currsize
    assert is_tracked_write(long_insert)
    assert not is_tracked_write("SELECT " + ", ".join(["1"] * 5000))
    assert _classify_cached.cache_info().currsize == before
