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
--
-- Security (docs/security.md): event triggers run these functions as whoever
-- runs CREATE TABLE, often a superuser. So every function lives in schema
-- public under a fixed, qualified name, pins `SET search_path = pg_catalog,
-- pg_temp` or (the two that run on every write) qualifies every name, so that
-- a function or operator planted in public, e.g. public.left(name, integer)
-- or public.=(oid, regclass), is never found; and the event-trigger
-- functions do nothing unless every function they call is owned by the owner
-- of the event trigger. Installing over functions another role owns is refused.

-- Refuse to run over functions another role owns. CREATE OR REPLACE keeps a
-- function's owner: after a first install by the application's role, a
-- superuser re-running this file to add the event triggers would leave the
-- functions those triggers call in the hands of a role that can rewrite them,
-- and the triggers run them with the privileges of whoever runs CREATE TABLE.
DO $bemi$
DECLARE
  path text := pg_catalog.current_setting('search_path');
  routine text;
  owner_name name;
  owners text := '';
  fixes text := '';
BEGIN
  PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
  FOREACH routine IN ARRAY ARRAY[
    'public._bemi_context_from_query(text)', 'public._bemi_row_trigger_func()',
    'public._bemi_is_tracked(regclass)', 'public._bemi_is_tracked(regclass,jsonb)',
    'public._bemi_tracked_tables(jsonb)', 'public._bemi_tables()',
    'public._bemi_create_trigger(regclass)', 'public._bemi_create_triggers()',
    'public._bemi_set_replica_identity_on(regclass)', 'public._bemi_set_replica_identity()',
    'public._bemi_publish(regclass)', 'public._bemi_create_table_trigger_func()',
    'public._bemi_set_replica_identity_func()'
  ] LOOP
    SELECT r.rolname INTO owner_name
    FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
    WHERE p.oid = to_regprocedure(routine);
    IF owner_name IS NOT NULL AND owner_name <> current_user THEN
      owners := owners || format('%s (owner %I) ', routine, owner_name);
      fixes := fixes || format('ALTER ROUTINE %s OWNER TO %I; ', routine, current_user);
    END IF;
  END LOOP;
  IF fixes <> '' THEN
    RAISE EXCEPTION 'bemi: refusing to install over functions owned by another role than % (who runs this install): %', current_user, owners
      USING DETAIL = 'A role that owns them can rewrite what bemi''s triggers run with the privileges of whoever fires them.',
            HINT = format('Check them, then as %I run: %sand install again (psql -f bemi/sql/install.sql, or manage.py migrate bemi zero, then migrate bemi): it rewrites their bodies.', current_user, fixes);
  END IF;
  PERFORM pg_catalog.set_config('search_path', path, true);
END;
$bemi$;

-- Only the end of the query is looked at, so that the cost per statement does
-- not grow with the query string (each statement of a string of many sees the
-- whole string in current_query()). In UTF8 databases the tail is cut by
-- bytes (right() would count the characters of the whole string every time);
-- a marker of more than 65,536 bytes is ignored.
--
-- These two run for every write statement: instead of `SET search_path`
-- (about 60 microseconds per call, measured) every name in them is
-- schema-qualified, types and operators included, which is as tight.
CREATE OR REPLACE FUNCTION public._bemi_context_from_query(query pg_catalog.text)
RETURNS pg_catalog.text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $bemi$
DECLARE
  utf8 pg_catalog.bytea;
  size pg_catalog.int4;
  tail pg_catalog.bytea;
  width pg_catalog.int4;
  context pg_catalog.text;
  found pg_catalog.int4 := 0;
  first pg_catalog.int4;
  len pg_catalog.int4;
BEGIN
  IF query IS NULL THEN
    RETURN NULL;
  END IF;
  IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.=) 'UTF8' THEN
    utf8 := pg_catalog.convert_to(query, 'UTF8');  -- the same bytes (checked, not converted)
    size := pg_catalog.octet_length(utf8);
    -- First the last 256 bytes: most queries end without a marker.
    tail := pg_catalog.rtrim(
      pg_catalog.substring(utf8, GREATEST(1, size OPERATOR(pg_catalog.-) 255)),
      '\x20090a0d0c0b3b'::pg_catalog.bytea);  -- white space and ;
    IF pg_catalog.octet_length(tail) OPERATOR(pg_catalog.>=) 7
       AND pg_catalog.substring(tail, pg_catalog.octet_length(tail) OPERATOR(pg_catalog.-) 6)
           OPERATOR(pg_catalog.<>) '\x2042656d692a2f'::pg_catalog.bytea THEN
      RETURN NULL;  -- does not end with ' Bemi*/'
    END IF;
  END IF;
  -- The marker starts at the last '/*Bemi ' (its JSON cannot hold '/*'): look
  -- for it in the last 4 KB, then in the last 64 KB.
  FOREACH width IN ARRAY ARRAY[4096, 65600] LOOP
    IF utf8 IS NOT NULL THEN
      tail := pg_catalog.substring(utf8, GREATEST(1, size OPERATOR(pg_catalog.-) width OPERATOR(pg_catalog.+) 1));
      -- Start at a character boundary (skip UTF-8 continuation bytes).
      WHILE pg_catalog.octet_length(tail) OPERATOR(pg_catalog.>) 0
            AND pg_catalog.get_byte(tail, 0) OPERATOR(pg_catalog.>=) 128
            AND pg_catalog.get_byte(tail, 0) OPERATOR(pg_catalog.<=) 191 LOOP
        tail := pg_catalog.substring(tail, 2);
      END LOOP;
      context := pg_catalog.convert_from(tail, 'UTF8');
    ELSE
      context := pg_catalog.right(query, width);  -- single-byte encodings: no walk over the string
    END IF;
    context := pg_catalog.rtrim(context, E' \t\n\r\f\x0B;');
    IF pg_catalog.right(context, 7) OPERATOR(pg_catalog.<>) ' Bemi*/' THEN
      RETURN NULL;
    END IF;
    found := pg_catalog.strpos(pg_catalog.reverse(context), ' imeB*/');  -- '/*Bemi ' reversed
    EXIT WHEN found OPERATOR(pg_catalog.>) 0
      OR pg_catalog.octet_length(context) OPERATOR(pg_catalog.>=) pg_catalog.octet_length(query);
  END LOOP;
  IF found OPERATOR(pg_catalog.=) 0 THEN
    RETURN NULL;
  END IF;
  -- '/*Bemi ' starts at character n - found - 5; the JSON runs up to ' Bemi*/'.
  first := pg_catalog.length(context) OPERATOR(pg_catalog.-) found OPERATOR(pg_catalog.-) 5;
  len := pg_catalog.length(context) OPERATOR(pg_catalog.-) first OPERATOR(pg_catalog.-) 13;
  IF len OPERATOR(pg_catalog.<) 0 THEN
    RETURN NULL;
  END IF;
  context := pg_catalog.substr(context, first OPERATOR(pg_catalog.+) 7, len);
  IF pg_catalog.strpos(context, '*/') OPERATOR(pg_catalog.>) 0
     OR pg_catalog.strpos(context, '/*') OPERATOR(pg_catalog.>) 0 THEN
    RETURN NULL;  -- not one comment
  END IF;
  BEGIN
    IF pg_catalog.jsonb_typeof(context::pg_catalog.jsonb) OPERATOR(pg_catalog.<>) 'object' THEN
      RETURN NULL;
    END IF;
  EXCEPTION WHEN others THEN
    RETURN NULL;
  END;
  RETURN context;
END;
$bemi$;

-- The statement trigger. Two rules of docs/database.md live here:
--
-- * Once per long query string. A string of N statements fires it N times and
--   current_query() copies the whole string each time (N x its length). The
--   answer depends on the string only, and statement_timestamp() is the time
--   the server received the client message holding the string: the same for
--   every statement of it, different for the next message, which the backend
--   reads only after this one ran (the trigger alone takes longer than the
--   timestamp's microsecond). So for a string of more than 8 kB the answer is
--   kept in the custom setting bemi.statement_context, transaction-local, as
--   '<statement_timestamp> <context>'. A shorter string (a single write, the
--   usual case) is read at once: a copy of at most 8 kB and one search for
--   ' Bemi*/', without which no marker ends it; keeping the answer would cost
--   more (the timestamp as text, set_config). The setting is read at every
--   statement; the timestamp is formatted and compared only when a long
--   string left an answer in this transaction.
--   A role that sets it by hand gains nothing: it only decides which context
--   its own writes get, which it may do with a marker, and the privilege
--   below is checked every time, never remembered.
-- * Whose marker counts. current_user is not who wrote the query text: a
--   foreign key's ON DELETE CASCADE runs as the owner of the referencing
--   table, a SECURITY DEFINER function as its owner, and both fire this
--   trigger with the caller's current_query(). The marker counts when the
--   role the session acts as (SET ROLE's, else the login role: the one whose
--   privileges the query text was written with) may execute
--   pg_logical_emit_message, and current_user too (else the call would fail
--   the write).
CREATE OR REPLACE FUNCTION public._bemi_row_trigger_func()
RETURNS trigger
LANGUAGE plpgsql AS $bemi$
DECLARE
  cached pg_catalog.text := pg_catalog.current_setting('bemi.statement_context', true);
  stamp pg_catalog.text;
  query pg_catalog.text;
  context pg_catalog.text;
  actor pg_catalog.text;
  emit pg_catalog.regprocedure;
BEGIN
  IF cached OPERATOR(pg_catalog.<>) '' THEN  -- NULL or '': no long string ran in this transaction
    stamp := pg_catalog.statement_timestamp()::pg_catalog.text OPERATOR(pg_catalog.||) ' ';
  END IF;
  IF stamp IS NOT NULL AND pg_catalog.starts_with(cached, stamp) THEN
    context := pg_catalog.substr(cached, pg_catalog.length(stamp) OPERATOR(pg_catalog.+) 1);
  ELSE
    query := pg_catalog.current_query();
    IF pg_catalog.octet_length(query) OPERATOR(pg_catalog.>) 8192 THEN
      context := COALESCE(public._bemi_context_from_query(query), '');
      PERFORM pg_catalog.set_config('bemi.statement_context', COALESCE(stamp,
          pg_catalog.statement_timestamp()::pg_catalog.text OPERATOR(pg_catalog.||) ' ')
        OPERATOR(pg_catalog.||) context, true);
    ELSIF pg_catalog.strpos(query, ' Bemi*/') OPERATOR(pg_catalog.=) 0 THEN
      context := '';  -- no marker: a single write without one, the usual case
    ELSE
      context := COALESCE(public._bemi_context_from_query(query), '');
    END IF;
  END IF;
  IF context OPERATOR(pg_catalog.<>) '' THEN
    actor := pg_catalog.current_setting('role');
    IF actor OPERATOR(pg_catalog.=) 'none' THEN
      actor := session_user;
    END IF;
    emit := COALESCE(
      pg_catalog.to_regprocedure('pg_catalog.pg_logical_emit_message(boolean,text,text,boolean)'),
      pg_catalog.to_regprocedure('pg_catalog.pg_logical_emit_message(boolean,text,text)'));
    -- EXECUTE revoked (docs/security.md): never fail the write. Asked, not caught: an
    -- EXCEPTION block is a subtransaction, and logical decoding then hands out the
    -- message after the statement's rows, which would get the previous context.
    IF pg_catalog.has_function_privilege(actor, emit, 'EXECUTE')
       AND pg_catalog.has_function_privilege(emit, 'EXECUTE') THEN
      PERFORM pg_catalog.pg_logical_emit_message(true, '_bemi'::pg_catalog.text, context);
    ELSE
      RAISE WARNING 'bemi: role % may not execute pg_logical_emit_message: the /*Bemi ... Bemi*/ context is ignored',
        CASE WHEN pg_catalog.has_function_privilege(actor, emit, 'EXECUTE') THEN current_user ELSE actor END;
    END IF;
  END IF;
  IF TG_LEVEL OPERATOR(pg_catalog.=) 'ROW' THEN
    -- Attached per row (a trigger the published bemi-django left, see upgrade_0_1_3.sql):
    -- returning NULL from a BEFORE ROW trigger would silently cancel the write.
    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
      RETURN OLD;
    END IF;
    RETURN NEW;
  END IF;
  RETURN NULL;
END;
$bemi$;

-- Which tables are tracked is decided by public._bemi_is_tracked(regclass), one
-- rule over the settings in public._bemi_tracking (tracking.sql, run before
-- this file; docs/tracking.md), which every function below uses.

CREATE OR REPLACE FUNCTION public._bemi_create_trigger(rel regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $bemi$
DECLARE
  relname text := (SELECT c.relname FROM pg_class c WHERE c.oid = rel);
BEGIN
  IF NOT public._bemi_is_tracked(rel) THEN
    RETURN;
  END IF;
  -- %s of a regclass is schema-qualified here (public is not on the path).
  EXECUTE format(
    'CREATE OR REPLACE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s '
    'FOR EACH STATEMENT EXECUTE FUNCTION public._bemi_row_trigger_func()',
    left('_bemi_row_trigger_' || relname, 63), rel
  );
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'bemi: no privilege to create a trigger on %; run CALL public._bemi_create_triggers(); as its owner', rel;
END;
$bemi$;

-- Brings the triggers in line with the tracking rule: one on every tracked table
-- (partitions included: a statement may name one), none on the others.
CREATE OR REPLACE PROCEDURE public._bemi_create_triggers()
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $bemi$
DECLARE
  t record;
BEGIN
  PERFORM public._bemi_create_trigger(rel) FROM public._bemi_tracked_tables() AS rel;
  FOR t IN
    SELECT tg.tgname, n.nspname, c.relname
    FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE tg.tgfoid = 'public._bemi_row_trigger_func()'::regprocedure AND NOT tg.tgisinternal
      AND NOT public._bemi_is_tracked(tg.tgrelid::regclass)
  LOOP
    BEGIN
      EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I.%I', t.tgname, t.nspname, t.relname);
      RAISE NOTICE 'bemi: %.% is no longer tracked: dropped its trigger', t.nspname, t.relname;
    EXCEPTION WHEN insufficient_privilege THEN
      RAISE NOTICE 'bemi: no privilege to drop trigger % on %.% (no longer tracked); its owner should run DROP TRIGGER',
        t.tgname, t.nspname, t.relname;
    END;
  END LOOP;
END;
$bemi$;

CREATE OR REPLACE FUNCTION public._bemi_set_replica_identity_on(rel regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $bemi$
BEGIN
  IF NOT public._bemi_is_tracked(rel)
     OR (SELECT c.relreplident FROM pg_class c WHERE c.oid = rel) = 'f' THEN
    RETURN;
  END IF;
  EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', rel);
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'bemi: no privilege to set REPLICA IDENTITY FULL on %; "before" values will be incomplete. Run ALTER TABLE % REPLICA IDENTITY FULL; as its owner', rel, rel;
END;
$bemi$;

CREATE OR REPLACE PROCEDURE public._bemi_set_replica_identity()
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $bemi$
BEGIN
  PERFORM public._bemi_set_replica_identity_on(rel) FROM public._bemi_tracked_tables() AS rel;
END;
$bemi$;

-- Publications the worker manages carry this comment (bemi/worker/publication.py,
-- MANAGED_PUBLICATION_COMMENT). A new table joins them in the transaction
-- that creates it, so its very first rows are published: the worker's own
-- periodic refresh would only add it a moment later. ALTER PUBLICATION locks
-- the publication until the end of the transaction: a second CREATE TABLE
-- while another transaction holds that lock does not wait (lock_timeout) but
-- leaves the table to the worker's refresh, with a NOTICE.
CREATE OR REPLACE FUNCTION public._bemi_publish(rel regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '20ms' AS $bemi$
DECLARE
  pub text;
BEGIN
  IF NOT public._bemi_is_tracked(rel) OR (SELECT c.relispartition FROM pg_class c WHERE c.oid = rel) THEN
    RETURN;
  END IF;
  FOR pub IN
    SELECT p.pubname FROM pg_publication p
    WHERE NOT p.puballtables
      AND obj_description(p.oid, 'pg_publication') IN ('bemi: tracked tables', 'bemi: tables of schema public')
      AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr WHERE pr.prpubid = p.oid AND pr.prrelid = rel)
  LOOP
    BEGIN
      EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', pub, rel);
    EXCEPTION WHEN others THEN
      RAISE NOTICE 'bemi: could not add % to publication %: %; the worker adds it on its next refresh',
        rel, pub, SQLERRM;
    END;
  END LOOP;
-- The lock_timeout above also bounds the look-ups: a lock held elsewhere must not fail the CREATE TABLE.
EXCEPTION WHEN lock_not_available THEN
  RAISE NOTICE 'bemi: could not publish % now: %; the worker adds it on its next refresh', rel, SQLERRM;
END;
$bemi$;

-- Event trigger functions: act on the tables the DDL command just created.
-- They run with the privileges of whoever runs CREATE TABLE (often a
-- superuser): they do nothing unless every function of the chain is owned by
-- the role that owns bemi's event triggers (a superuser).
CREATE OR REPLACE FUNCTION public._bemi_create_table_trigger_func()
RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $bemi$
DECLARE
  cmd record;
BEGIN
  IF EXISTS (
    SELECT 1 FROM pg_event_trigger e, pg_proc p
    WHERE e.evtname IN ('_bemi_create_table_trigger', '_bemi_set_replica_identity_trigger')
      AND p.oid IN ('public._bemi_create_table_trigger_func()'::regprocedure,
                    'public._bemi_create_trigger(regclass)'::regprocedure,
                    'public._bemi_is_tracked(regclass)'::regprocedure,
                    'public._bemi_is_tracked(regclass,jsonb)'::regprocedure,
                    'public._bemi_tracked_tables(jsonb)'::regprocedure)
      AND p.proowner <> e.evtowner
  ) THEN
    RAISE WARNING 'bemi: not adding the trigger to the new table: a function it would run is not owned by the owner of the event trigger; reinstall bemi as a superuser (see docs/security.md)';
    RETURN;
  END IF;
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type = 'table' LOOP
    PERFORM public._bemi_create_trigger(cmd.objid::regclass);
  END LOOP;
END;
$bemi$;

CREATE OR REPLACE FUNCTION public._bemi_set_replica_identity_func()
RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $bemi$
DECLARE
  cmd record;
BEGIN
  IF EXISTS (
    SELECT 1 FROM pg_event_trigger e, pg_proc p
    WHERE e.evtname IN ('_bemi_create_table_trigger', '_bemi_set_replica_identity_trigger')
      AND p.oid IN ('public._bemi_set_replica_identity_func()'::regprocedure,
                    'public._bemi_set_replica_identity_on(regclass)'::regprocedure,
                    'public._bemi_publish(regclass)'::regprocedure,
                    'public._bemi_is_tracked(regclass)'::regprocedure,
                    'public._bemi_is_tracked(regclass,jsonb)'::regprocedure,
                    'public._bemi_tracked_tables(jsonb)'::regprocedure)
      AND p.proowner <> e.evtowner
  ) THEN
    RAISE WARNING 'bemi: not setting the replica identity of the new table: a function it would run is not owned by the owner of the event trigger; reinstall bemi as a superuser (see docs/security.md)';
    RETURN;
  END IF;
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type = 'table' LOOP
    PERFORM public._bemi_set_replica_identity_on(cmd.objid::regclass);
    -- After the identity: published without one, its UPDATE/DELETE would fail.
    -- (Event triggers fire in name order: this one runs last.)
    PERFORM public._bemi_publish(cmd.objid::regclass);
  END LOOP;
END;
$bemi$;

CALL public._bemi_create_triggers();
CALL public._bemi_set_replica_identity();

-- Event triggers need superuser. Without it, installing still succeeds and says
-- what to run after creating new tables.
DO $bemi$
BEGIN
  DROP EVENT TRIGGER IF EXISTS _bemi_create_table_trigger;
  CREATE EVENT TRIGGER _bemi_create_table_trigger ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
    EXECUTE FUNCTION public._bemi_create_table_trigger_func();
  DROP EVENT TRIGGER IF EXISTS _bemi_set_replica_identity_trigger;
  CREATE EVENT TRIGGER _bemi_set_replica_identity_trigger ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
    EXECUTE FUNCTION public._bemi_set_replica_identity_func();
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'bemi: no privilege to create event triggers (superuser needed), so new tables are not tracked automatically. After creating tables, run: CALL public._bemi_create_triggers(); CALL public._bemi_set_replica_identity();';
END;
$bemi$;
