"""`changes` tables of earlier versions, for the tests and benchmarks that upgrade or compare them.

Both are the tables as they were made, so that conversion (``bemi_partition``),
takeover (``--takeover``) and the 0.1.3 switch are tested on the real shapes.
"""

from __future__ import annotations

__all__ = ["PREVIOUS_CHANGES", "PUBLISHED_CHANGES"]

#: bemi/sql/changes.sql of this project's previous version (unpartitioned).
PREVIOUS_CHANGES = """
CREATE TABLE changes (
    "id" uuid PRIMARY KEY DEFAULT gen_random_uuid(), "database" varchar(255) NOT NULL,
    "schema" varchar(255) NOT NULL, "table" varchar(255) NOT NULL, "primary_key" varchar(255),
    "operation" text NOT NULL, "before" jsonb NOT NULL DEFAULT '{}'::jsonb, "after" jsonb NOT NULL DEFAULT '{}'::jsonb,
    "context" jsonb NOT NULL DEFAULT '{}'::jsonb, "committed_at" timestamptz NOT NULL,
    "queued_at" timestamptz NOT NULL DEFAULT now(), "created_at" timestamptz NOT NULL DEFAULT now(),
    "transaction_id" bigint NOT NULL, "position" bigint NOT NULL, "commit_position" bigint NOT NULL,
    "change_index" integer NOT NULL);
CREATE INDEX changes_committed_at_index ON changes ("committed_at");
CREATE INDEX changes_table_index ON changes ("table");
CREATE INDEX changes_primary_key_index ON changes ("primary_key");
CREATE INDEX changes_operation_index ON changes ("operation");
CREATE INDEX changes_before_index ON changes USING gin ("before" jsonb_path_ops);
CREATE INDEX changes_after_index ON changes USING gin ("after" jsonb_path_ops);
CREATE INDEX changes_context_index ON changes USING gin ("context" jsonb_path_ops);
CREATE UNIQUE INDEX changes_identity_index ON changes ("database", "commit_position", "change_index");
"""

#: The published worker's table: no commit_position / change_index, a unique key on position.
PUBLISHED_CHANGES = """
CREATE TABLE changes (
    "id" uuid PRIMARY KEY DEFAULT gen_random_uuid(), "database" varchar(255) NOT NULL,
    "schema" varchar(255) NOT NULL, "table" varchar(255) NOT NULL, "primary_key" varchar(255),
    "operation" text NOT NULL, "before" jsonb NOT NULL DEFAULT '{}', "after" jsonb NOT NULL DEFAULT '{}',
    "context" jsonb NOT NULL DEFAULT '{}', "committed_at" timestamptz NOT NULL,
    "queued_at" timestamptz NOT NULL, "created_at" timestamptz NOT NULL DEFAULT now(),
    "transaction_id" bigint NOT NULL, "position" bigint NOT NULL);
CREATE UNIQUE INDEX changes_position_table_schema_database_operation_unique
    ON changes ("position", "table", "schema", "database", "operation");
"""
