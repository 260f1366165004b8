-- bemi: remove what install.sql created (`python manage.py migrate bemi zero`).
-- REPLICA IDENTITY FULL is left on the tables: it is a table setting other
-- tools may rely on; reset it with ALTER TABLE ... REPLICA IDENTITY DEFAULT.
DO $bemi$
BEGIN
  DROP EVENT TRIGGER IF EXISTS _bemi_create_table_trigger;
  DROP EVENT TRIGGER IF EXISTS _bemi_set_replica_identity_trigger;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'bemi: no privilege to drop event triggers; a superuser must run DROP EVENT TRIGGER _bemi_create_table_trigger, _bemi_set_replica_identity_trigger;';
END;
$bemi$;

DO $bemi$
DECLARE
  path text := pg_catalog.current_setting('search_path');
  t record;
BEGIN
  -- Pinned while this block runs (see install.sql), then restored.
  PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
  FOR t IN
    SELECT tg.tgname, n.nspname, c.relname
    FROM pg_trigger tg
    JOIN pg_proc p ON p.oid = tg.tgfoid
    JOIN pg_class c ON c.oid = tg.tgrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE p.oid = to_regprocedure('public._bemi_row_trigger_func()') AND NOT tg.tgisinternal
  LOOP
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I.%I', t.tgname, t.nspname, t.relname);
  END LOOP;
  PERFORM pg_catalog.set_config('search_path', path, true);
END;
$bemi$;

DROP FUNCTION IF EXISTS public._bemi_create_table_trigger_func();
DROP FUNCTION IF EXISTS public._bemi_set_replica_identity_func();
DROP PROCEDURE IF EXISTS public._bemi_create_triggers();
DROP PROCEDURE IF EXISTS public._bemi_set_replica_identity();
DROP FUNCTION IF EXISTS public._bemi_create_trigger(regclass);
DROP FUNCTION IF EXISTS public._bemi_set_replica_identity_on(regclass);
DROP FUNCTION IF EXISTS public._bemi_publish(regclass);
DROP FUNCTION IF EXISTS public._bemi_is_tracked(regclass);
DROP FUNCTION IF EXISTS public._bemi_tables();
DROP FUNCTION IF EXISTS public._bemi_tracked_tables(jsonb);
DROP FUNCTION IF EXISTS public._bemi_is_tracked(regclass, jsonb);
DROP TABLE IF EXISTS public._bemi_tracking;
DROP FUNCTION IF EXISTS public._bemi_row_trigger_func();
DROP FUNCTION IF EXISTS public._bemi_context_from_query(text);
