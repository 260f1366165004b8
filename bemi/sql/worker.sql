-- The worker's bookkeeping in the destination database (idempotent).
--
-- One row per (slot, source database): the commit position of the last source
-- transaction whose changes are stored. It is written in the same destination
-- transaction as those `changes` rows, so after a crash the worker knows
-- exactly which transactions the slot may hand out again and skips them.
CREATE TABLE IF NOT EXISTS _bemi_worker_checkpoints (
    "slot" text NOT NULL,
    "database" text NOT NULL,
    "commit_lsn" pg_lsn NOT NULL,
    "end_lsn" pg_lsn NOT NULL,
    "transaction_id" bigint,
    "committed_at" timestamptz,
    "changes" bigint NOT NULL DEFAULT 0,
    "updated_at" timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("slot", "database")
);
