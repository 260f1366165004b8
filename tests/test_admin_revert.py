"""Revert, restore and activity in the admin, through Django's test client (test_browser_admin.py: a real browser)."""

import html
import re

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from bemi.models import BemiChange
from tests.queryapp.models import Todo
from tests.queryapp.fixtures import record_a_request

REQUEST = {"user_id": 7, "path": "/todo/bulk", "request_id": "r-1"}
MASK_A = "bemi-masked:0123456789abcdef01234567"
MASK_B = "bemi-masked:ffffffffffffffffffffffff"


def make_request_changes(recorder):
    return record_a_request(recorder, REQUEST)


@pytest.fixture
def request_changes(recorder):
    return make_request_changes(recorder)


def todos():
    return list(Todo.objects.order_by("id").values_list("id", "task", "is_completed"))


def text(response) -> str:
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", response.content.decode(), flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))


def user_with(*codenames: str, superuser: bool = False) -> Client:
    user = User.objects.create_user("clerk", "clerk@example.com", "pw", is_staff=True, is_superuser=superuser)
    for codename in codenames:
        app, code = codename.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app, codename=code))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


ALL = ("bemi.view_bemichange", "bemi.revert_change", "queryapp.view_todo", "queryapp.change_todo",
       "queryapp.add_todo", "queryapp.delete_todo")


def ids(changes) -> list[str]:
    return [str(c.id) for c in changes]


def csrf(client: Client, url: str) -> str:
    page = client.get(url)
    assert page.status_code == 200, page.status_code
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)


def test_the_permission_exists_after_migrate(db):
    assert Permission.objects.filter(content_type__app_label="bemi", codename="revert_change").exists()


@pytest.mark.django_db(transaction=True)
def test_confirmation_shows_what_is_written_then_the_revert_is_labelled(tx_recorder, wal):
    make_request_changes(tx_recorder)
    client = user_with(*ALL)
    chosen = ids(BemiChange.objects.context({"request_id": "r-1"}).desc())
    url = "/admin/bemi/bemichange/revert/?" + "&".join(f"id={i}" for i in chosen)
    page = client.get(url)
    assert page.status_code == 200
    shown = text(page)
    assert "INSERT Column Now Written id — 2 task — Eat is_completed — false" in shown
    assert "UPDATE Column Now Written task Slept Sleep is_completed true false" in shown
    assert "DELETE" in shown and 'type="submit" value="Yes, revert">' in page.content.decode()
    assert todos() == [(1, "Slept", True), (3, "Repeat", False)]  # the page wrote nothing
    token = csrf(client, url)
    wal.read()
    done = client.post("/admin/bemi/bemichange/revert/", {"id": chosen, "confirm": "yes", "csrfmiddlewaretoken": token,
                                                          "next": "/admin/queryapp/todo/"})
    assert done.status_code == 302 and done["Location"] == "/admin/queryapp/todo/"
    assert todos() == [(1, "Sleep", False), (2, "Eat", False)]
    contexts = [m.json for m in wal.messages("_bemi")]
    assert [c["bemi_revert"] for c in contexts] == chosen
    for context in contexts:
        assert context["bemi_reverted_by"] == {"user_id": User.objects.get(username="clerk").pk, "username": "clerk"}
        assert context["bemi_reverted_changes"] == chosen


def test_the_changelist_action_opens_the_confirmation(request_changes):
    client = user_with(*ALL)
    token = csrf(client, "/admin/bemi/bemichange/")
    chosen = ids(BemiChange.objects.filter(primary_key="1"))
    page = client.post("/admin/bemi/bemichange/", {"action": "revert_selected", "_selected_action": chosen,
                                                   "csrfmiddlewaretoken": token})
    assert page.status_code == 200 and "Revert changes" in text(page)
    assert 'name="id" value="%s"' % chosen[0] in page.content.decode()
    assert todos() == [(1, "Slept", True), (3, "Repeat", False)]


@pytest.mark.parametrize("lacking", ["bemi.revert_change", "queryapp.change_todo", "queryapp.add_todo", "queryapp.delete_todo"])
def test_without_a_permission_nothing_is_written(request_changes, lacking):
    client = user_with(*[p for p in ALL if p != lacking])
    chosen = ids(BemiChange.objects.context({"request_id": "r-1"}))
    assert client.get("/admin/bemi/bemichange/revert/?" + "&".join(f"id={i}" for i in chosen)).status_code == 403
    token = csrf(client, "/admin/bemi/bemichange/")
    response = client.post("/admin/bemi/bemichange/revert/", {"id": chosen, "confirm": "yes", "csrfmiddlewaretoken": token})
    assert response.status_code == 403
    if lacking == "bemi.revert_change":  # the action is not offered either, and posting it does nothing
        assert "revert_selected" not in client.get("/admin/bemi/bemichange/").content.decode()
        client.post("/admin/bemi/bemichange/", {"action": "revert_selected", "_selected_action": chosen, "confirm": "yes",
                                                "csrfmiddlewaretoken": token})
    assert todos() == [(1, "Slept", True), (3, "Repeat", False)]


def test_a_table_without_a_model_needs_a_superuser(recorder):
    recorder.add("legacy_notes", 1, "CREATE", after={"id": 1})
    client = user_with(*ALL)
    change = BemiChange.objects.get()
    response = client.get(f"/admin/bemi/bemichange/revert/?id={change.id}")
    assert response.status_code == 403


def test_csrf_is_required(request_changes):
    client = user_with(*ALL)
    chosen = ids(BemiChange.objects.context({"request_id": "r-1"}))
    response = client.post("/admin/bemi/bemichange/revert/", {"id": chosen, "confirm": "yes"})
    assert response.status_code == 403
    assert todos() == [(1, "Slept", True), (3, "Repeat", False)]


def test_conflicts_are_shown_and_block_the_revert(request_changes):
    with request_changes.track(Todo, 1, {"request_id": "r-2"}):
        Todo.objects.filter(id=1).update(task="Nap")
    client = user_with(*ALL)
    chosen = ids(BemiChange.objects.context({"request_id": "r-1"}))
    url = "/admin/bemi/bemichange/revert/?" + "&".join(f"id={i}" for i in chosen)
    page = client.get(url)
    assert "changed the row after it" in text(page) and "'request_id': 'r-2'" in text(page)
    assert 'value="Yes, revert" disabled' in page.content.decode()
    token = csrf(client, url)
    response = client.post("/admin/bemi/bemichange/revert/", {"id": chosen, "confirm": "yes", "csrfmiddlewaretoken": token})
    assert response.status_code == 409 and "Nothing was written" in text(response)
    assert todos() == [(1, "Nap", True), (3, "Repeat", False)]


def test_a_masked_value_reads_as_masked_and_is_not_restored(recorder):
    Todo.objects.create(id=1, task="now")
    recorder.add("todo", 1, "UPDATE", before={"id": 1, "task": MASK_A, "is_completed": False},
                 after={"id": 1, "task": MASK_B, "is_completed": False}, context=REQUEST)
    client = user_with(*ALL)
    change = BemiChange.objects.get()
    page = client.get(f"/admin/bemi/bemichange/revert/?id={change.id}")
    shown = text(page)
    assert "bemi-masked:" not in page.content.decode()
    assert "task masked masked" in shown and "value of task before it is masked" in shown
    history = client.get("/admin/queryapp/todo/1/history/")
    assert "bemi-masked:" not in history.content.decode() and "task masked masked" in text(history)
    activity = client.get("/admin/bemi/bemichange/activity/")
    assert "bemi-masked:" not in activity.content.decode() and "task masked masked" in text(activity)


def test_recover_lists_rows_deleted_and_not_created_again(recorder):
    for pk, task in [(1, "one"), (2, "two"), (3, "three")]:
        with recorder.track(Todo, pk):
            Todo.objects.create(id=pk, task=task)
    for pk in (1, 2, 3):
        with recorder.track(Todo, pk, {"user_id": 9}):
            Todo.objects.filter(id=pk).delete()
    with recorder.track(Todo, 2):
        Todo.objects.create(id=2, task="two again")  # created again: not recoverable
    Todo.objects.create(id=3, task="three, unrecorded")  # exists again (the worker has not recorded it yet)
    recorder.add("todo", 4, "UPDATE", before={"id": 4, "task": "a", "is_completed": False},
                 after={"id": 4, "task": "b", "is_completed": False})
    recorder.add("todo", 4, "DELETE", before={"id": 4, "task": "b", "is_completed": False},
                 committed_at=BemiChange.objects.get(primary_key="4").committed_at)  # same transaction, after it
    client = user_with(*ALL)
    page = client.get("/admin/queryapp/todo/recover/")
    assert page.status_code == 200
    rows = re.findall(r'<td class="bemi-pk">(\w+)</td>', page.content.decode())
    assert rows == ["4", "1"]
    assert "Recover deleted" in client.get("/admin/queryapp/todo/").content.decode()
    delete_1 = BemiChange.objects.deleted().get(primary_key="1")
    url = f"/admin/bemi/bemichange/revert/?id={delete_1.id}&next=/admin/queryapp/todo/recover/"
    assert "Restore deleted rows" in text(client.get(url))
    done = client.post("/admin/bemi/bemichange/revert/", {"id": [str(delete_1.id)], "confirm": "yes",
                                                          "csrfmiddlewaretoken": csrf(client, url)})
    assert done.status_code == 302 and Todo.objects.get(id=1).task == "one"


def test_recover_needs_view_permission_and_hides_restore_without_revert(recorder):
    with recorder.track(Todo, 1):
        Todo.objects.create(id=1, task="one")
    with recorder.track(Todo, 1):
        Todo.objects.filter(id=1).delete()
    client = user_with("queryapp.view_todo")
    page = client.get("/admin/queryapp/todo/recover/")
    assert page.status_code == 200 and "Restore selected" not in text(page)
    nobody = Client()
    assert nobody.get("/admin/queryapp/todo/recover/").status_code == 302  # to the login page
