-- bemi: the one rule that decides which tables are tracked (bemi/tracking.py,
-- docs/tracking.md). Used by the triggers and replica identity of install.sql,
-- by its event trigger for tables created later, and by the worker for the
-- publication's membership. Run before install.sql by `migrate bemi`, and by
-- the worker when it is missing. Idempotent. Needs PostgreSQL 14+.
--
-- public._bemi_tracking holds one row:
--   rules       {"schemas": [regex...], "ignored_tables": [[schema regex, table regex]...]}
--               written by `migrate bemi` from the Django settings and by the worker
--               from its flags (bemi/tracking.py translates the shell-style patterns into
--               regexes that Python and PostgreSQL read alike);
--   settings    the settings as the user wrote them (a worker started without flags uses them);
--   own_tables  oids of bemi's own tables in this database (`changes`, the worker's
--               checkpoints): never tracked, whatever they are called or renamed to.
--               (Deciding by name let anyone hide a table's writes by renaming it
--               `changes` or `_bemi...`.)

-- As in install.sql: refuse to run over functions another role owns (CREATE OR
-- REPLACE keeps the owner, who could then rewrite what the event trigger runs).
DO $bemi$
DECLARE
  path text := pg_catalog.current_setting('search_path');
  routine text;
  owner_name name;
  owners text := '';
  fixes text := '';
BEGIN
  PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
  FOREACH routine IN ARRAY ARRAY[  -- all of bemi's: install.sql runs next, with the same check
    'public._bemi_is_tracked(regclass)', 'public._bemi_is_tracked(regclass,jsonb)',
    'public._bemi_tracked_tables(jsonb)', 'public._bemi_tables()',
    'public._bemi_context_from_query(text)', 'public._bemi_row_trigger_func()',
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
            HINT = format('Check them, then as %I run: %sand install again (manage.py migrate bemi, or psql -f bemi/sql/tracking.sql -f bemi/sql/install.sql): it rewrites their bodies.', current_user, fixes);
  END IF;
  PERFORM pg_catalog.set_config('search_path', path, true);
END;
$bemi$;

CREATE TABLE IF NOT EXISTS public._bemi_tracking (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  rules jsonb NOT NULL
    DEFAULT '{"schemas": ["^(?:public)$"], "ignored_tables": [["^(?:public)$", "^(?:django_session)$"]]}',
  settings jsonb NOT NULL DEFAULT '{}',
  own_tables oid[] NOT NULL DEFAULT '{}',
  generated_key bytea,
  updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  updated_by text NOT NULL DEFAULT 'default'
);
INSERT INTO public._bemi_tracking DEFAULT VALUES ON CONFLICT DO NOTHING;
-- Every role that creates a table runs the event trigger, which reads the rules.
-- generated_key (the standalone worker's masking key) is readable by the owner only.
REVOKE ALL ON public._bemi_tracking FROM PUBLIC;
GRANT SELECT (singleton, rules, settings, own_tables, updated_at, updated_by) ON public._bemi_tracking TO PUBLIC;

-- Is this relation tracked under these rules? A partition is decided by its root
-- (its rows are recorded under the root's name).
CREATE OR REPLACE FUNCTION public._bemi_is_tracked(rel regclass, rules jsonb)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $bemi$
  SELECT EXISTS (
    SELECT 1
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_class r
      ON r.oid = CASE WHEN c.relispartition THEN pg_catalog.pg_partition_root(c.oid) ELSE c.oid END
    JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
    WHERE c.oid OPERATOR(pg_catalog.=) rel::oid
      AND c.relkind IN ('r', 'p')
      AND c.relpersistence OPERATOR(pg_catalog.=) 'p'
      AND r.oid OPERATOR(pg_catalog.<>) 'public._bemi_tracking'::pg_catalog.regclass::oid
      AND EXISTS (
        SELECT 1 FROM pg_catalog.jsonb_array_elements_text(rules OPERATOR(pg_catalog.->) 'schemas') s(re)
        WHERE n.nspname::text OPERATOR(pg_catalog.~) s.re)
      AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.jsonb_array_elements(rules OPERATOR(pg_catalog.->) 'ignored_tables') t(p)
        WHERE n.nspname::text OPERATOR(pg_catalog.~) (t.p OPERATOR(pg_catalog.->>) 0)
          AND r.relname::text OPERATOR(pg_catalog.~) (t.p OPERATOR(pg_catalog.->>) 1))
      AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.jsonb_array_elements_text(rules OPERATOR(pg_catalog.->) 'own_tables') o(id)
        WHERE o.id OPERATOR(pg_catalog.=) r.oid::text)
      AND NOT EXISTS (
        SELECT 1 FROM public._bemi_tracking b WHERE r.oid OPERATOR(pg_catalog.=) ANY (b.own_tables))
  );
$bemi$;

-- The same under the rules stored in public._bemi_tracking.
CREATE OR REPLACE FUNCTION public._bemi_is_tracked(rel regclass)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $bemi$
  SELECT COALESCE((SELECT public._bemi_is_tracked(rel, b.rules) FROM public._bemi_tracking b), false);
$bemi$;

-- Every tracked table and partition, under the given rules (NULL: the stored ones).
CREATE OR REPLACE FUNCTION public._bemi_tracked_tables(rules jsonb DEFAULT NULL)
RETURNS SETOF regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $bemi$
  SELECT c.oid::pg_catalog.regclass
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p')
    AND n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema', 'pg_toast']::name[])
    AND public._bemi_is_tracked(c.oid::pg_catalog.regclass,
          COALESCE(rules, (SELECT b.rules FROM public._bemi_tracking b)))
  ORDER BY n.nspname, c.relname;
$bemi$;
