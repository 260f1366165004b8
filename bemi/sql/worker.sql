-- The worker's bookkeeping in the destination database (idempotent; schema-qualified,
-- run with search_path = pg_catalog, pg_temp).
--
-- _bemi_worker_checkpoints: one row per (source, slot), where `source` is unique
-- to the source database (the cluster's system identifier and the database's oid:
-- two clusters that both have a database `app` never share a checkpoint). It
-- holds the commit position of the last source transaction whose changes are
-- stored, written in the same destination transaction as those `changes` rows,
-- so after a crash the worker knows exactly which transactions the slot may hand
-- out again and skips them. (Tables made before `source` existed are upgraded by
-- the worker: bemi/worker/sink.py.) `chain_head`: the link of the last change
-- stored (bemi/chain.py), committed with it: where the chain continues.
CREATE TABLE IF NOT EXISTS bemi._bemi_worker_checkpoints (
    "slot" text NOT NULL,
    "database" text NOT NULL,
    "commit_lsn" pg_lsn NOT NULL,
    "end_lsn" pg_lsn NOT NULL,
    "transaction_id" bigint,
    "committed_at" timestamptz,
    "changes" bigint NOT NULL DEFAULT 0,
    "updated_at" timestamptz NOT NULL DEFAULT pg_catalog.now(),
    "source" text NOT NULL,
    "chain_head" bytea,
    PRIMARY KEY ("source", "slot")
);

-- _bemi_worker_failures: the dead letters. A change the destination rejected
-- (a `json` value `jsonb` cannot hold, a character the destination's encoding
-- cannot store...), as far as it could be built, with its position and the
-- error. Stored in the same transaction as the changes around it and the
-- checkpoint: exactly once, like them. See docs/worker.md (inspect and replay).
CREATE TABLE IF NOT EXISTS bemi._bemi_worker_failures (
    "id" bigserial PRIMARY KEY,
    "source" text NOT NULL,
    "slot" text NOT NULL,
    "database" text NOT NULL,
    "schema" text,
    "table" text,
    "operation" text,
    "primary_key" text,
    "transaction_id" bigint,
    "position" bigint,
    "commit_position" bigint,
    "change_index" integer,
    "committed_at" timestamptz,
    "change" bytea NOT NULL,
    "error" text NOT NULL,
    "sqlstate" text,
    "failed_at" timestamptz NOT NULL DEFAULT pg_catalog.now()
);
