-- The `changes` table the worker writes (one row per changed row), its
-- published indexes, and its partitions' safety net. Idempotent: safe to run
-- on every worker start. (Works with `psql -f` too: every name that resolution
-- could take from another schema is qualified, defaults included.)
--
-- Partitioned by range on committed_at (UTC): bemi/worker/partitions.py adds
-- one partition per day, week or month (`changes_p20250101`) ahead of time.
-- `changes_default` (the DEFAULT partition) takes a change for which no
-- partition exists at that moment (see docs/retention.md), so no write fails;
-- the worker moves such rows into their own partition within a minute.
--
-- Published columns first (compat.md). Ours, after them:
--   commit_position  LSN of the source transaction's commit
--   change_index     order of the change inside that transaction (0-based)
--   chain_link       sha256 of the previous change's link and this change's
--                    canonical bytes, per database in commit order (bemi/chain.py;
--                    bemi_verify checks it; NULL on changes stored before it existed)
-- A change is identified by (database, commit_position, change_index); a
-- unique index on a partitioned table must contain the partition key, and
-- committed_at is the same for every change of one transaction, so
-- changes_identity_index adds it without changing what it identifies. The
-- published unique key on `position` is not used: every row of one COPY
-- shares one LSN. The primary key is (id, committed_at) for the same reason.
--
-- In schema `bemi` (bemi/tables.py), owned by the worker's role: the
-- application's role may neither drop nor replace anything there
-- (docs/security.md). The worker creates the schema first and checks who
-- owns it (bemi/trust.py); `psql -f` on a fresh database creates it here.
DO $$
BEGIN
    IF pg_catalog.to_regnamespace('bemi') IS NULL THEN  -- (IF NOT EXISTS would need CREATE on the database)
        CREATE SCHEMA bemi;
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS bemi.changes (
    "id" uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    "database" varchar(255) NOT NULL,
    "schema" varchar(255) NOT NULL,
    "table" varchar(255) NOT NULL,
    "primary_key" varchar(255),
    "operation" text NOT NULL,
    "before" jsonb NOT NULL DEFAULT '{}'::jsonb,
    "after" jsonb NOT NULL DEFAULT '{}'::jsonb,
    "context" jsonb NOT NULL DEFAULT '{}'::jsonb,
    "committed_at" timestamptz NOT NULL,
    "queued_at" timestamptz NOT NULL DEFAULT pg_catalog.now(),
    "created_at" timestamptz NOT NULL DEFAULT pg_catalog.now(),
    "transaction_id" bigint NOT NULL,
    "position" bigint NOT NULL,
    "commit_position" bigint NOT NULL,
    "change_index" integer NOT NULL,
    "chain_link" bytea,
    CONSTRAINT changes_pkey PRIMARY KEY ("id", "committed_at")
) PARTITION BY RANGE ("committed_at");

CREATE INDEX IF NOT EXISTS changes_committed_at_index ON bemi.changes ("committed_at");
CREATE INDEX IF NOT EXISTS changes_table_index ON bemi.changes ("table");
CREATE INDEX IF NOT EXISTS changes_primary_key_index ON bemi.changes ("primary_key");
CREATE INDEX IF NOT EXISTS changes_operation_index ON bemi.changes ("operation");
CREATE INDEX IF NOT EXISTS changes_before_index ON bemi.changes USING gin ("before" jsonb_path_ops);
CREATE INDEX IF NOT EXISTS changes_after_index ON bemi.changes USING gin ("after" jsonb_path_ops);
CREATE INDEX IF NOT EXISTS changes_context_index ON bemi.changes USING gin ("context" jsonb_path_ops);
CREATE UNIQUE INDEX IF NOT EXISTS changes_identity_index
    ON bemi.changes ("database", "commit_position", "change_index", "committed_at");

-- The DEFAULT partition (only when `changes` is partitioned: an unpartitioned
-- table of an earlier version is left as it is until `manage.py bemi_partition`).
DO $$
BEGIN
    IF (SELECT c.relkind FROM pg_catalog.pg_class c
        WHERE c.oid OPERATOR(pg_catalog.=) 'bemi.changes'::pg_catalog.regclass::pg_catalog.oid)
       OPERATOR(pg_catalog.=) 'p'::pg_catalog."char"
       AND pg_catalog.to_regclass('bemi.changes_default') IS NULL THEN
        -- made under a _bemi name so that the `migrate bemi` event triggers leave it alone
        CREATE TABLE bemi._bemi_changes_default PARTITION OF bemi.changes DEFAULT;
        ALTER TABLE bemi._bemi_changes_default RENAME TO changes_default;
    END IF;
END
$$;

-- What was pruned (bemi_prune, the worker's retention): time travel before
-- `pruned_before` says so instead of answering from incomplete history.
CREATE TABLE IF NOT EXISTS bemi._bemi_pruned (
    "pruned_before" timestamptz NOT NULL,
    "pruned_at" timestamptz NOT NULL DEFAULT pg_catalog.now(),
    "partitions" text[] NOT NULL DEFAULT '{}',
    "changes" bigint NOT NULL DEFAULT 0,
    "pruned_by" text NOT NULL DEFAULT ''
);
