"""The ``/*Bemi ... Bemi*/`` statement trigger: whose marker counts, and its answer kept per query string.

Issue 18, row 9: a role that may not emit messages got its marker honoured
when its statement ran code as another role (a foreign key's ON DELETE
CASCADE runs as the owner of the referencing table, a SECURITY DEFINER
function as its owner): the trigger read the caller's query text but asked
the privilege of current_user. Issue 20: the trigger's answer is computed
once per query string (keyed by statement_timestamp()); these tests prove
that two strings never share it. Everything is read back from the WAL.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from bemi import sql


class Roles:
    """A database owned by ``app`` (who may emit), with ``intruder`` (LOGIN only, may not) and a WAL slot."""

    def __init__(self, server) -> None:
        self.server = server
        suffix = uuid.uuid4().hex[:8]
        self.app, self.intruder, self.database = f"app_{suffix}", f"intruder_{suffix}", f"trig_{suffix}"
        self.slot = f"trig_{suffix}"
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{self.app}" LOGIN')
            conn.execute(f'CREATE ROLE "{self.intruder}" LOGIN')
            conn.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.app}"')
        self.su = psycopg.connect(server.dsn(self.database), autocommit=True)
        self.su.execute(sql.read("tracking.sql") + sql.read("install.sql"))
        # docs/security.md: only the application's role may label its writes.
        self.su.execute("REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC")
        self.su.execute(f'GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO "{self.app}"')
        self.su.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [self.slot])
        self.as_app = psycopg.connect(server.dsn(self.database, user=self.app), autocommit=True)
        self.as_intruder = psycopg.connect(server.dsn(self.database, user=self.intruder), autocommit=True)

    def messages(self) -> list[dict]:
        """The contexts of the ``_bemi`` messages written since the last call."""
        rows = self.su.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", [self.slot])
        out = []
        for (data,) in rows:
            if data.startswith("message: transactional: 1 prefix: _bemi, sz: "):
                out.append(json.loads(data.split(" content:", 1)[1]))
        return out

    def close(self) -> None:
        self.as_app.close()
        self.as_intruder.close()
        self.su.execute("SELECT pg_drop_replication_slot(%s)", [self.slot])
        self.su.close()
        with psycopg.connect(self.server.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{self.app}"')
            conn.execute(f'DROP ROLE IF EXISTS "{self.intruder}"')


@pytest.fixture
def roles(pg_server):
    r = Roles(pg_server)
    yield r
    r.close()


FORGED = ' /*Bemi {"user_id": "forged"} Bemi*/'


def test_a_cascade_into_a_table_of_a_role_that_may_emit_does_not_honour_the_intruders_marker(roles):
    roles.as_app.execute("CREATE TABLE public.parent (id int PRIMARY KEY)")
    roles.as_app.execute("CREATE TABLE public.child (id int PRIMARY KEY, "
                         "parent_id int REFERENCES public.parent ON DELETE CASCADE)")
    roles.as_app.execute("INSERT INTO public.parent VALUES (1); INSERT INTO public.child VALUES (1, 1)")
    roles.as_app.execute(f'GRANT SELECT, DELETE ON public.parent TO "{roles.intruder}"')
    roles.messages()
    warnings: list[str] = []
    roles.as_intruder.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
    roles.as_intruder.execute("DELETE FROM public.parent WHERE id = 1" + FORGED)
    assert roles.as_app.execute("SELECT count(*) FROM public.child").fetchone()[0] == 0  # the cascade ran
    assert roles.messages() == []
    assert any(f"role {roles.intruder} may not execute" in w for w in warnings)


def test_a_security_definer_function_does_not_honour_the_intruders_marker(roles):
    roles.as_app.execute("CREATE TABLE public.audit_me (id int PRIMARY KEY)")
    roles.as_app.execute(
        "CREATE FUNCTION public.add(n int) RETURNS void LANGUAGE sql SECURITY DEFINER "
        "SET search_path = pg_catalog, pg_temp AS $$ INSERT INTO public.audit_me VALUES (n) $$")
    roles.as_app.execute(f'GRANT EXECUTE ON FUNCTION public.add(int) TO "{roles.intruder}"')
    roles.messages()
    roles.as_intruder.execute("SELECT public.add(1)" + FORGED)
    assert roles.as_app.execute("SELECT count(*) FROM public.audit_me").fetchone()[0] == 1
    assert roles.messages() == []


def test_the_role_set_with_set_role_decides(roles):
    roles.su.execute(f'GRANT "{roles.intruder}" TO "{roles.app}"')
    roles.as_app.execute("CREATE TABLE public.notes (id int PRIMARY KEY)")
    roles.as_app.execute(f'GRANT INSERT ON public.notes TO "{roles.intruder}"')
    roles.messages()
    roles.as_app.execute(f'SET ROLE "{roles.intruder}"')
    roles.as_app.execute("INSERT INTO public.notes VALUES (1)" + FORGED)
    roles.as_app.execute("RESET ROLE")
    roles.as_app.execute('INSERT INTO public.notes VALUES (2) /*Bemi {"user_id": "app"} Bemi*/')
    assert roles.messages() == [{"user_id": "app"}]


def test_the_role_that_may_emit_still_labels_its_writes_also_through_cascades(roles):
    roles.as_app.execute("CREATE TABLE public.parent (id int PRIMARY KEY)")
    roles.as_app.execute("CREATE TABLE public.child (id int PRIMARY KEY, "
                         "parent_id int REFERENCES public.parent ON DELETE CASCADE)")
    roles.as_app.execute("INSERT INTO public.parent VALUES (1); INSERT INTO public.child VALUES (1, 1)")
    roles.messages()
    roles.as_app.execute('DELETE FROM public.parent WHERE id = 1 /*Bemi {"user_id": 7} Bemi*/')
    assert roles.messages() == [{"user_id": 7}, {"user_id": 7}]  # parent's trigger, then child's


# -- once per query string, never shared between two ---------------------------------------------


#: Strings of more than 8 kB keep their answer in bemi.statement_context; shorter ones are read at once.
LONG = "/* " + "x" * 9000 + " */ "
LENGTHS = pytest.mark.parametrize("pad", ["", LONG], ids=["short", "long"])


@LENGTHS
def test_every_statement_of_one_string_gets_its_marker_and_the_next_string_its_own(roles, pad):
    roles.as_app.execute("CREATE TABLE public.notes (id int PRIMARY KEY)")
    roles.messages()
    with roles.as_app.transaction():
        roles.as_app.execute(pad + "INSERT INTO public.notes VALUES (1); INSERT INTO public.notes VALUES (2)"
                             ' /*Bemi {"s": 1} Bemi*/')
        roles.as_app.execute(pad + "INSERT INTO public.notes VALUES (3)")  # no marker: nothing, not {"s": 1}
        roles.as_app.execute(pad + 'INSERT INTO public.notes VALUES (4) /*Bemi {"s": 2} Bemi*/')
        roles.as_app.execute('INSERT INTO public.notes VALUES (5) /*Bemi {"s": 3} Bemi*/')  # short after long
        roles.as_app.execute(pad + "INSERT INTO public.notes VALUES (6); INSERT INTO public.notes VALUES (7)")
    assert roles.messages() == [{"s": 1}, {"s": 1}, {"s": 2}, {"s": 3}]


@LENGTHS
def test_statements_pipelined_back_to_back_never_share_an_answer(roles, pad):
    """Extended protocol, sent in one network write: the server still times each message apart."""
    roles.as_app.execute("CREATE TABLE public.notes (id int PRIMARY KEY)")
    roles.messages()
    expected = []
    with roles.as_app.transaction(), roles.as_app.pipeline():
        for i in range(200):
            marker = f' /*Bemi {{"n": {i}}} Bemi*/' if i % 3 else ""
            roles.as_app.execute(f"{pad if i % 2 else ''}INSERT INTO public.notes VALUES ({i}){marker}")
            if marker:
                expected.append({"n": i})
    assert roles.messages() == expected


def test_a_marker_inside_a_short_string_that_does_not_end_it_is_not_honoured(roles):
    """The short path looks for ' Bemi*/' first; finding it, the rules of the marker decide as before."""
    roles.as_app.execute("CREATE TABLE public.notes (id int PRIMARY KEY, note text)")
    roles.messages()
    roles.as_app.execute("INSERT INTO public.notes VALUES (1, ' /*Bemi {\"user_id\": 1} Bemi*/')")
    roles.as_app.execute("INSERT INTO public.notes VALUES (2, ' /*Bemi {\"user_id\": 2} Bemi*/') "
                         '/*Bemi {"user_id": 3} Bemi*/ ;')
    assert roles.messages() == [{"user_id": 3}]


def test_a_hand_set_answer_does_not_bypass_the_privilege(roles):
    """bemi.statement_context is a setting any session may set: it never grants what the role may not do."""
    roles.as_app.execute("CREATE TABLE public.notes (id int PRIMARY KEY)")
    roles.as_app.execute(f'GRANT INSERT ON public.notes TO "{roles.intruder}"')
    roles.messages()
    with roles.as_intruder.transaction():
        roles.as_intruder.execute(
            "SELECT pg_catalog.set_config('bemi.statement_context', statement_timestamp()::text "
            "|| ' {\"user_id\": \"forged\"}', true); INSERT INTO public.notes VALUES (1)")
    assert roles.messages() == []
