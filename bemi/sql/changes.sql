-- The `changes` table the worker writes (one row per changed row) and its
-- published indexes. Idempotent: safe to run on every worker start.
--
-- Published columns first (compat.md). Ours, after them:
--   commit_position  LSN of the source transaction's commit
--   change_index     order of the change inside that transaction (0-based)
-- (database, commit_position, change_index) identifies a change; the
-- published unique key on `position` is not used because every row of one
-- COPY shares one LSN.
CREATE TABLE IF NOT EXISTS changes (
    "id" uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    "database" varchar(255) NOT NULL,
    "schema" varchar(255) NOT NULL,
    "table" varchar(255) NOT NULL,
    "primary_key" varchar(255),
    "operation" text NOT NULL,
    "before" jsonb NOT NULL DEFAULT '{}'::jsonb,
    "after" jsonb NOT NULL DEFAULT '{}'::jsonb,
    "context" jsonb NOT NULL DEFAULT '{}'::jsonb,
    "committed_at" timestamptz NOT NULL,
    "queued_at" timestamptz NOT NULL DEFAULT now(),
    "created_at" timestamptz NOT NULL DEFAULT now(),
    "transaction_id" bigint NOT NULL,
    "position" bigint NOT NULL,
    "commit_position" bigint NOT NULL,
    "change_index" integer NOT NULL
);

CREATE INDEX IF NOT EXISTS changes_committed_at_index ON changes ("committed_at");
CREATE INDEX IF NOT EXISTS changes_table_index ON changes ("table");
CREATE INDEX IF NOT EXISTS changes_primary_key_index ON changes ("primary_key");
CREATE INDEX IF NOT EXISTS changes_operation_index ON changes ("operation");
CREATE INDEX IF NOT EXISTS changes_before_index ON changes USING gin ("before" jsonb_path_ops);
CREATE INDEX IF NOT EXISTS changes_after_index ON changes USING gin ("after" jsonb_path_ops);
CREATE INDEX IF NOT EXISTS changes_context_index ON changes USING gin ("context" jsonb_path_ops);
CREATE UNIQUE INDEX IF NOT EXISTS changes_identity_index
    ON changes ("database", "commit_position", "change_index");
