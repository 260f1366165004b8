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
  t record;
BEGIN
  FOR t IN
    SELECT tg.tgname, tg.tgrelid::regclass AS rel
    FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
    WHERE p.proname = '_bemi_row_trigger_func' AND NOT tg.tgisinternal
  LOOP
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', t.tgname, t.rel);
  END LOOP;
END;
$bemi$;

DROP FUNCTION IF EXISTS _bemi_create_table_trigger_func();
DROP FUNCTION IF EXISTS _bemi_set_replica_identity_func();
DROP PROCEDURE IF EXISTS _bemi_create_triggers();
DROP PROCEDURE IF EXISTS _bemi_set_replica_identity();
DROP FUNCTION IF EXISTS _bemi_create_trigger(regclass);
DROP FUNCTION IF EXISTS _bemi_set_replica_identity_on(regclass);
DROP FUNCTION IF EXISTS _bemi_publish(regclass);
DROP FUNCTION IF EXISTS _bemi_is_tracked(regclass);
DROP FUNCTION IF EXISTS _bemi_tables();
DROP FUNCTION IF EXISTS _bemi_row_trigger_func();
DROP FUNCTION IF EXISTS _bemi_context_from_query(text);
