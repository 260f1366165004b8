"""Which statements carry the context (bemi.statements, no database)."""

import pytest

from bemi.statements import is_tracked_write, may_write

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
    # Issue 18, row 12: what hid a write from the first-keyword rule.
    "EXPLAIN ANALYZE UPDATE t SET a = 1",
    "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t",
    "explain analyse verbose insert into t values (1)",
    "/* /* */ SELECT */ UPDATE t SET a = 1",
    "/* /* /* */ */ INSERT */ DELETE FROM t",
    "/* /* */ ; */ UPDATE t SET a = 1",
    "SELECT E'\\''; UPDATE t SET a = 1 -- '",
    "SELECT $$;$$; UPDATE t SET a = 1",
    "SELECT $x$ $$ ; $x$; DELETE FROM t",
    'SELECT 1 AS "a;b"; DELETE FROM t',
    "WITH x AS (SELECT 1) /* FOR */ UPDATE t SET a = 1",
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
    "SELECT 'a''; UPDATE t SET a = 1 --'",
    "SELECT $$; UPDATE t SET a = 1$$",
    "/* UPDATE t */ SELECT 1",
    "/* /* */ UPDATE t */ SELECT 1",
    "SELECT \"update\" FROM t",
]

# Statements after which a context that ended must be reset (they may run code that writes).
MAY_WRITE = WRITES + [
    "SELECT f()",
    "select * from t where f(a)",
    "VALUES (f())",
    "CALL p()",
    "DO $$BEGIN INSERT INTO t VALUES (1); END$$",
    "COPY t FROM STDIN",
    "TRUNCATE t",
    "ALTER TABLE t ADD COLUMN b int DEFAULT f()",
    "CREATE TABLE u AS SELECT f()",
    "EXPLAIN ANALYZE SELECT f()",
    "/* SET */ SELECT f()",
    "/* /* */ SET */ SELECT f()",
    "SET a = 1; SELECT f()",
    "SAVEPOINT s; SELECT f()",
    "(SELECT f())",
    "$$x$$",
]

NEVER_WRITES = [
    "SET search_path = public",
    "set local statement_timeout = 0",
    "RESET ALL",
    "SHOW search_path",
    "SAVEPOINT s1",
    "RELEASE SAVEPOINT s1",
    "ROLLBACK TO SAVEPOINT s1",
    "COMMIT",
    "BEGIN",
    "-- x\n SET a = 1",
    "/* /* */ SELECT */ SET a = 1",
    "SET a = 1; SET b = 2;",
    "",
    "  ",
]


@pytest.mark.parametrize("sql", WRITES)
def test_writes(sql):
    assert is_tracked_write(sql) is True


@pytest.mark.parametrize("sql", NOT_WRITES)
def test_not_writes(sql):
    assert is_tracked_write(sql) is False


@pytest.mark.parametrize("sql", MAY_WRITE)
def test_may_write(sql):
    assert may_write(sql) is True


@pytest.mark.parametrize("sql", NEVER_WRITES)
def test_never_writes(sql):
    assert may_write(sql) is False


def test_long_sql_is_classified_without_cache():
    from bemi.statements import _classify_cached

    long_insert = "INSERT INTO t (a) VALUES " + ", ".join(["(%s)"] * 5000)
    before = _classify_cached.cache_info().currsize
    assert is_tracked_write(long_insert)
    assert not is_tracked_write("SELECT " + ", ".join(["1"] * 5000))
    assert _classify_cached.cache_info().currsize == before
