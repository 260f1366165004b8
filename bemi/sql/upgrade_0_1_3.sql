-- bemi: remove what the published bemi-django (0.1.3 and earlier) left that
-- install.sql does not replace by itself. Run right before install.sql, in the
-- same transaction (migration bemi.0003_upgrade does both); by hand:
--   psql -1 -f upgrade_0_1_3.sql -f install.sql
-- A no-op on a database set up by this package.
--
-- The published migration gives every table of schema public (`changes`
-- included) a trigger `_bemi_row_trigger_<table>` that fires BEFORE ... FOR EACH
-- ROW. install.sql redefines `_bemi_row_trigger_func()` as a statement-level
-- function that returns NULL: left attached to a BEFORE ROW trigger, that NULL
-- would silently cancel every write to the table. So every row-level trigger
-- calling a function of that name is dropped here, on every table, whatever it
-- is named; install.sql then puts its statement triggers on the tracked tables.
-- The published functions and procedure (`_bemi_row_trigger_func`,
-- `_bemi_create_triggers`, `_bemi_create_table_trigger_func`) and event trigger
-- `_bemi_create_table_trigger` (and those of Bemi's hosted setup,
-- `_bemi_set_replica_identity*`) have the names install.sql uses in schema
-- public: it replaces them there. The published migration created them in the
-- first schema of the migrating role's search_path, though: copies outside
-- public are dropped here, with an event trigger of those names calling one.

CREATE FUNCTION pg_temp._bemi_drop_published_leftovers()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $bemi$
DECLARE
  t record;
  dropped integer := 0;
BEGIN
  FOR t IN
    SELECT tg.tgname, c.relname, n.nspname
    FROM pg_catalog.pg_trigger tg
    JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) tg.tgfoid
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tg.tgrelid
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    WHERE p.proname OPERATOR(pg_catalog.=) '_bemi_row_trigger_func'::pg_catalog.name
      AND NOT tg.tgisinternal
      AND (tg.tgtype::pg_catalog.int4 OPERATOR(pg_catalog.&) 1) OPERATOR(pg_catalog.=) 1  -- FOR EACH ROW
    ORDER BY n.nspname, c.relname, tg.tgname
  LOOP
    BEGIN
      EXECUTE pg_catalog.format('DROP TRIGGER %I ON %I.%I', t.tgname, t.nspname, t.relname);
    EXCEPTION WHEN insufficient_privilege THEN
      -- Never go on: install.sql would turn the trigger left here into one that cancels every write.
      RAISE EXCEPTION 'bemi: no privilege to drop the per-row trigger % of the published bemi-django on %.%',
        t.tgname, t.nspname, t.relname
        USING HINT = 'Run the migration as the owner of the table (or a superuser), or have the owner run: DROP TRIGGER '
          OPERATOR(pg_catalog.||) pg_catalog.quote_ident(t.tgname) OPERATOR(pg_catalog.||) ' ON '
          OPERATOR(pg_catalog.||) pg_catalog.quote_ident(t.nspname) OPERATOR(pg_catalog.||) '.'
          OPERATOR(pg_catalog.||) pg_catalog.quote_ident(t.relname) OPERATOR(pg_catalog.||) ';';
    END;
    dropped := dropped OPERATOR(pg_catalog.+) 1;
  END LOOP;
  IF dropped OPERATOR(pg_catalog.>) 0 THEN
    RAISE NOTICE 'bemi: dropped % per-row trigger(s) of the published bemi-django (replaced by one statement trigger per tracked table)', dropped;
  END IF;

  FOR t IN
    SELECT e.evtname
    FROM pg_catalog.pg_event_trigger e
    JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) e.evtfoid
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
    WHERE e.evtname OPERATOR(pg_catalog.=) ANY (ARRAY['_bemi_create_table_trigger', '_bemi_set_replica_identity_trigger']::pg_catalog.name[])
      AND n.nspname OPERATOR(pg_catalog.<>) 'public'::pg_catalog.name
  LOOP
    BEGIN
      EXECUTE pg_catalog.format('DROP EVENT TRIGGER %I', t.evtname);
      RAISE NOTICE 'bemi: dropped event trigger % of the published bemi-django (install.sql creates ours)', t.evtname;
    EXCEPTION WHEN insufficient_privilege THEN
      RAISE NOTICE 'bemi: no privilege to drop event trigger % of the published bemi-django; a superuser must run DROP EVENT TRIGGER %;', t.evtname, t.evtname;
    END;
  END LOOP;

  FOR t IN
    SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text AS routine
    FROM pg_catalog.pg_proc p
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
    WHERE p.proname OPERATOR(pg_catalog.=) ANY (ARRAY['_bemi_row_trigger_func', '_bemi_create_triggers',
        '_bemi_create_table_trigger_func', '_bemi_set_replica_identity', '_bemi_set_replica_identity_func']::pg_catalog.name[])
      AND p.pronargs OPERATOR(pg_catalog.=) 0
      AND n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['public', 'pg_catalog']::pg_catalog.name[])
      AND n.nspname OPERATOR(pg_catalog.!~) '^pg_temp'
    ORDER BY 1
  LOOP
    BEGIN
      EXECUTE pg_catalog.format('DROP ROUTINE %s', t.routine);  -- regprocedure text: qualified and quoted
      RAISE NOTICE 'bemi: dropped % of the published bemi-django (ours is in schema public)', t.routine;
    EXCEPTION WHEN insufficient_privilege OR dependent_objects_still_exist THEN
      RAISE NOTICE 'bemi: could not drop % of the published bemi-django: %', t.routine, SQLERRM;
    END;
  END LOOP;
  RETURN dropped;
END;
$bemi$;

SELECT pg_temp._bemi_drop_published_leftovers();
DROP FUNCTION pg_temp._bemi_drop_published_leftovers();
