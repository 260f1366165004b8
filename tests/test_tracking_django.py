"""No credentials in `changes` by default: a real login and password change through Django, the worker, redact."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import override_settings

from bemi import tracking as tr

pytestmark = pytest.mark.django_db(transaction=True)


def run_worker(env, **options):
    call_command("bemi_worker", once=True, slot=env.slot, publication=env.publication, verbosity=0, **options)


def all_changes_text(env) -> str:
    return env.execute("SELECT coalesce(string_agg(c::text, ' '), '') FROM bemi.changes c")[0][0]


def test_login_and_password_change_leave_no_session_key_and_no_hash(worker_env, client, settings):
    env = worker_env
    run_worker(env)
    user = User.objects.create_superuser("ann", "ann@example.com", "old-Secret-pw-1")
    hashes = [User.objects.get(pk=user.pk).password]
    response = client.post("/admin/login/?next=/admin/", {"username": "ann", "password": "old-Secret-pw-1"})
    assert response.status_code == 302
    sessions = [client.cookies["sessionid"].value]
    response = client.post("/admin/password_change/", {
        "old_password": "old-Secret-pw-1", "new_password1": "new-Secret-pw-2", "new_password2": "new-Secret-pw-2"})
    assert response.status_code == 302, response.content[:500]
    hashes.append(User.objects.get(pk=user.pk).password)
    sessions.append(client.cookies["sessionid"].value)
    sessions += [s for (s,) in env.execute("SELECT session_key FROM django_session")]
    assert hashes[0] != hashes[1]
    run_worker(env)

    text = all_changes_text(env)
    assert env.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'auth_user'")[0][0] >= 3
    for secret in hashes + [h.split("$")[-1] for h in hashes] + sessions:
        assert secret not in text
    assert "django_session" not in text
    # yet the password change is visible as a change (and the login's last_login update too)
    from bemi.models import BemiChange

    changes = list(BemiChange.objects.filter(table="auth_user").updated())
    password_changes = [c for c in changes if "password" in c.diff()]
    assert len(password_changes) == 1
    before, after = password_changes[0].diff()["password"]
    assert before.startswith(tr.MASK_PREFIX) and after.startswith(tr.MASK_PREFIX) and before != after
    key = tr.column_key(tr.derive_key(settings.SECRET_KEY), "public", "auth_user", "password")
    assert (before, after) == (tr.mask_json_value(key, hashes[0]), tr.mask_json_value(key, hashes[1]))
    assert any("last_login" in c.diff() and "password" not in c.diff() for c in changes)


def test_bemi_redact_applies_the_settings_to_history_recorded_before(worker_env, capsys):
    env = worker_env
    with override_settings(BEMI_UNSAFE_TRACK_BUILTINS=["django_session", "auth_user.password"]):
        run_worker(env)  # as an earlier version did: everything in full
        user = User.objects.create_user("bob", password="pw-Bob-123456")
        user.set_password("pw-Bob-654321")
        user.save()
        env.execute("INSERT INTO django_session VALUES ('leakedsessionkey', 'x', now() + interval '1 day')")
        run_worker(env)
    hashes = [h for (h,) in env.execute("SELECT DISTINCT after->>'password' FROM bemi.changes WHERE \"table\" = 'auth_user'")]
    assert len(hashes) == 2 and "leakedsessionkey" in all_changes_text(env)
    try:
        call_command("bemi_redact", dry_run=True)
        out = capsys.readouterr().out
        assert "would delete 1 change(s) of ignored table django_session" in out
        assert "would mask auth_user.password in 2 change(s)" in out  # the create and the update
        assert "leakedsessionkey" in all_changes_text(env)  # dry run: nothing changed

        # Django's connection has the application's search_path: a `changes` earlier on it is not ours.
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("CREATE SCHEMA redact_shadow")
            cursor.execute("CREATE TABLE redact_shadow.changes AS SELECT * FROM bemi.changes")
            cursor.execute("SET search_path = redact_shadow, public")
        try:
            call_command("bemi_redact", batch_size=1)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET search_path")
                shadow = cursor.execute("SELECT count(*) FROM redact_shadow.changes c "
                                        "WHERE c::text LIKE '%%leakedsessionkey%%'")
                shadow = cursor.fetchone()[0]
                cursor.execute("DROP SCHEMA redact_shadow CASCADE")
        assert shadow == 1  # untouched: bemi_redact works on bemi.changes only
        text = all_changes_text(env)
        assert "leakedsessionkey" not in text and not any(h in text for h in hashes)
        key = tr.column_key(tr.derive_key("bemi-tests"), "public", "auth_user", "password")  # tests.settings.SECRET_KEY
        stored = [h for (h,) in env.execute(
            "SELECT after->>'password' FROM bemi.changes WHERE \"table\" = 'auth_user' ORDER BY commit_position")]
        assert stored[-1] == tr.mask_json_value(key, User.objects.get(pk=user.pk).password)  # as the worker would

        call_command("bemi_redact")  # resumable: a second run finds nothing left to do
        assert "deleted 0 change(s) of ignored tables, masked values in 0 change(s)" in capsys.readouterr().out
    finally:
        env.execute("DELETE FROM django_session WHERE session_key = 'leakedsessionkey'")


def test_bemi_redact_masks_a_masked_primary_key_in_primary_key_too(worker_env, capsys):
    """Issue 18, row 10: bemi_redact masked before/after and left the token raw in changes.primary_key."""
    env = worker_env
    table = f"api_token_{env.slot[-6:]}"
    env.execute(f"CREATE TABLE public.{table} (key text PRIMARY KEY, owner text)")
    try:
        run_worker(env)  # publishes the new table
        env.execute(f"INSERT INTO public.{table} VALUES ('tok-secret-1', 'ann'), ('tok-secret-2', 'bob')")
        env.execute(f"UPDATE public.{table} SET owner = 'carl' WHERE key = 'tok-secret-2'")
        env.execute(f"DELETE FROM public.{table} WHERE key = 'tok-secret-1'")
        run_worker(env)
        where = f"\"table\" = '{table}'"
        assert env.execute(f"SELECT count(*) FROM bemi.changes WHERE {where} AND primary_key LIKE 'tok-secret-%%'")[0][0] == 4
        # As an earlier bemi_redact left a change: before/after masked with the one key, primary_key raw.
        legacy = tr.legacy_marker(tr.derive_key("bemi-tests"), b"tok-secret-2")
        env.execute(f"UPDATE bemi.changes SET after = jsonb_set(after, '{{key}}', to_jsonb(%s::text)), "
                    f"before = jsonb_set(before, '{{key}}', to_jsonb(%s::text)) "
                    f"WHERE {where} AND operation = 'UPDATE'", [legacy, legacy])
        with override_settings(BEMI_MASKED_COLUMNS=[f"{table}.key"]):
            call_command("bemi_redact", no_progress=True)
            rows = env.execute(f"SELECT operation, primary_key, before->>'key', after->>'key' FROM bemi.changes "
                               f"WHERE {where} ORDER BY commit_position, change_index")
            assert "tok-secret" not in all_changes_text(env)
            key = tr.column_key(tr.derive_key("bemi-tests"), "public", table, "key")
            one, two = tr.mask_json_value(key, "tok-secret-1"), tr.mask_json_value(key, "tok-secret-2")
            assert rows == [("CREATE", one, None, one), ("CREATE", two, None, two),
                            ("UPDATE", two, two, two), ("DELETE", one, one, None)]  # as the worker writes them
            call_command("bemi_redact", no_progress=True)  # nothing left to do
            assert "masked values in 0 change(s)" in capsys.readouterr().out
    finally:
        env.execute(f"DROP TABLE IF EXISTS public.{table}")
