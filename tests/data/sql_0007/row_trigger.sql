-- public._bemi_row_trigger_func() as migration 0007 installed it (before 0008): every statement
-- formatted its statement_timestamp() and set bemi.statement_context. For tests/test_migration.py.
CREATE OR REPLACE FUNCTION public._bemi_row_trigger_func()
RETURNS trigger
LANGUAGE plpgsql AS $bemi$
DECLARE
  stamp pg_catalog.text := pg_catalog.statement_timestamp()::pg_catalog.text OPERATOR(pg_catalog.||) ' ';
  cached pg_catalog.text := pg_catalog.current_setting('bemi.statement_context', true);
  context pg_catalog.text;
  actor pg_catalog.text;
  emit pg_catalog.regprocedure;
BEGIN
  IF cached IS NOT NULL AND pg_catalog.starts_with(cached, stamp) THEN
    context := pg_catalog.substr(cached, pg_catalog.length(stamp) OPERATOR(pg_catalog.+) 1);
  ELSE
    context := COALESCE(public._bemi_context_from_query(pg_catalog.current_query()), '');
    PERFORM pg_catalog.set_config('bemi.statement_context', stamp OPERATOR(pg_catalog.||) context, true);
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
