-- bemi: install the trigger functions that carry application context into the
-- write-ahead log. Run by `python manage.py migrate bemi`; also usable by hand
-- (`psql -f install.sql`). Idempotent. Needs PostgreSQL 14+.
--
-- Names are those of the published bemi-django. Differences on purpose:
--   * the triggers fire BEFORE each statement, not AFTER each row: one message
--     per statement, emitted before the rows it labels;
--   * only a /*Bemi <JSON> Bemi*/ comment that ENDS the query counts (a string
--     literal can contain marker-like text but can never end the query), its
--     JSON must not contain "/*" or "*/" (it could not, inside a comment) and
--     must be an object; anything else is ignored;
--   * the JSON is emitted as written (no percent-decoding, no re-encoding).
-- The Django execute wrapper does not need these triggers: it emits the
-- message itself. They serve other writers (psql, other services, the
-- published libraries' convention).

CREATE OR REPLACE FUNCTION _bemi_context_from_query(query text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $bemi$
DECLARE
  context text;
BEGIN
  IF query IS NULL OR strpos(query, ' Bemi*/') = 0 THEN
    RETURN NULL;
  END IF;
  context := substring(
    query from '/\*Bemi ((?:[^*/]|\*(?!/)|/(?!\*))*) Bemi\*/[[:space:];]*$'
  );
  IF context IS NULL THEN
    RETURN NULL;
  END IF;
  BEGIN
    IF jsonb_typeof(context::jsonb) <> 'object' THEN
      RETURN NULL;
    END IF;
  EXCEPTION WHEN others THEN
    RETURN NULL;
  END;
  RETURN context;
END;
$bemi$;

CREATE OR REPLACE FUNCTION _bemi_row_trigger_func()
RETURNS trigger
LANGUAGE plpgsql AS $bemi$
DECLARE
  context text := _bemi_context_from_query(current_query());
BEGIN
  IF context IS NOT NULL THEN
    PERFORM pg_logical_emit_message(true, '_bemi', context);
  END IF;
  RETURN NULL;
END;
$bemi$;

-- Is this relation one that bemi tracks? Tables of schema public, except the
-- worker's own (`changes`, `_bemi*`).
CREATE OR REPLACE FUNCTION _bemi_is_tracked(rel regclass)
RETURNS boolean
LANGUAGE sql STABLE AS $bemi$
  SELECT EXISTS (
    SELECT 1
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = rel
      AND n.nspname = 'public'
      AND c.relkind IN ('r', 'p')
      AND c.relname <> 'changes'
      AND left(c.relname, 5) <> '_bemi'
  );
$bemi$;

-- The candidate tables: every table of schema public (filtered by _bemi_is_tracked).
CREATE OR REPLACE FUNCTION _bemi_tables()
RETURNS SETOF regclass
LANGUAGE sql STABLE AS $bemi$
  SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY c.relname;
$bemi$;

CREATE OR REPLACE FUNCTION _bemi_create_trigger(rel regclass)
RETURNS void
LANGUAGE plpgsql AS $bemi$
DECLARE
  relname text := (SELECT c.relname FROM pg_class c WHERE c.oid = rel);
BEGIN
  IF NOT _bemi_is_tracked(rel) THEN
    RETURN;
  END IF;
  EXECUTE format(
    'CREATE OR REPLACE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s '
    'FOR EACH STATEMENT EXECUTE FUNCTION _bemi_row_trigger_func()',
    left('_bemi_row_trigger_' || relname, 63), rel
  );
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'bemi: no privilege to create a trigger on %; run CALL _bemi_create_triggers(); as its owner', rel;
END;
$bemi$;

CREATE OR REPLACE PROCEDURE _bemi_create_triggers()
LANGUAGE plpgsql AS $bemi$
BEGIN
  PERFORM _bemi_create_trigger(rel) FROM _bemi_tables() AS rel;
END;
$bemi$;

CREATE OR REPLACE FUNCTION _bemi_set_replica_identity_on(rel regclass)
RETURNS void
LANGUAGE plpgsql AS $bemi$
BEGIN
  IF NOT _bemi_is_tracked(rel)
     OR (SELECT c.relreplident FROM pg_class c WHERE c.oid = rel) = 'f' THEN
    RETURN;
  END IF;
  EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', rel);
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'bemi: no privilege to set REPLICA IDENTITY FULL on %; "before" values will be incomplete. Run ALTER TABLE % REPLICA IDENTITY FULL; as its owner', rel, rel;
END;
$bemi$;

CREATE OR REPLACE PROCEDURE _bemi_set_replica_identity()
LANGUAGE plpgsql AS $bemi$
BEGIN
  PERFORM _bemi_set_replica_identity_on(rel) FROM _bemi_tables() AS rel;
END;
$bemi$;

-- Publications the worker manages carry this comment (bemi/worker/slot.py,
-- MANAGED_PUBLICATION_COMMENT). A new table joins them in the transaction
-- that creates it, so its very first rows are published: the worker's own
-- periodic refresh would only add it a moment later.
CREATE OR REPLACE FUNCTION _bemi_publish(rel regclass)
RETURNS void
LANGUAGE plpgsql AS $bemi$
DECLARE
  pub text;
BEGIN
  IF NOT _bemi_is_tracked(rel) OR (SELECT c.relispartition FROM pg_class c WHERE c.oid = rel) THEN
    RETURN;
  END IF;
  FOR pub IN
    SELECT p.pubname FROM pg_publication p
    WHERE NOT p.puballtables
      AND obj_description(p.oid, 'pg_publication') = 'bemi: tables of schema public'
      AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr WHERE pr.prpubid = p.oid AND pr.prrelid = rel)
  LOOP
    BEGIN
      EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', pub, rel);
    EXCEPTION WHEN others THEN
      RAISE NOTICE 'bemi: could not add % to publication %: %; the worker adds it on its next refresh',
        rel, pub, SQLERRM;
    END;
  END LOOP;
END;
$bemi$;

-- Event trigger functions: act on the tables the DDL command just created.
CREATE OR REPLACE FUNCTION _bemi_create_table_trigger_func()
RETURNS event_trigger
LANGUAGE plpgsql AS $bemi$
DECLARE
  cmd record;
BEGIN
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type = 'table' LOOP
    PERFORM _bemi_create_trigger(cmd.objid::regclass);
  END LOOP;
END;
$bemi$;

CREATE OR REPLACE FUNCTION _bemi_set_replica_identity_func()
RETURNS event_trigger
LANGUAGE plpgsql AS $bemi$
DECLARE
  cmd record;
BEGIN
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type = 'table' LOOP
    PERFORM _bemi_set_replica_identity_on(cmd.objid::regclass);
    -- After the identity: published without one, its UPDATE/DELETE would fail.
    -- (Event triggers fire in name order: this one runs last.)
    PERFORM _bemi_publish(cmd.objid::regclass);
  END LOOP;
END;
$bemi$;

CALL _bemi_create_triggers();
CALL _bemi_set_replica_identity();

-- Event triggers need superuser. Without it, installing still succeeds and says
-- what to run after creating new tables.
DO $bemi$
BEGIN
  DROP EVENT TRIGGER IF EXISTS _bemi_create_table_trigger;
  CREATE EVENT TRIGGER _bemi_create_table_trigger ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
    EXECUTE FUNCTION _bemi_create_table_trigger_func();
  DROP EVENT TRIGGER IF EXISTS _bemi_set_replica_identity_trigger;
  CREATE EVENT TRIGGER _bemi_set_replica_identity_trigger ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
    EXECUTE FUNCTION _bemi_set_replica_identity_func();
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'bemi: no privilege to create event triggers (superuser needed), so new tables are not tracked automatically. After creating tables, run: CALL _bemi_create_triggers(); CALL _bemi_set_replica_identity();';
END;
$bemi$;
