"""The admin views, through Django's test client (the real browser test is test_browser_admin.py)."""

import html
import re

import pytest
from django.contrib import admin
from django.contrib.auth.models import User

from bemi.admin import BemiChangeAdmin
from bemi.models import BemiChange
from tests.queryapp.models import Todo

PUT = {"user_id": 187234, "method": "PUT", "path": "/todo/26/complete", "SQL": 'UPDATE "todo" SET ...'}


@pytest.fixture
def history(recorder):
    with recorder.track(Todo, 26, {"user_id": 187234, "method": "POST", "path": "/todo"}):
        Todo.objects.create(id=26, task="Sleep")
    with recorder.track(Todo, 26, PUT):
        Todo.objects.filter(id=26).update(is_completed=True, task="Sleep <b>well</b>")
    with recorder.track(Todo, 27, {"user_id": 5, "method": "POST", "path": "/todo"}):
        Todo.objects.create(id=27, task="Eat")
    return recorder


@pytest.fixture
def staff(client):
    user = User.objects.create_superuser("admin", "admin@example.com", "pw")
    client.force_login(user)
    return client


def text(response) -> str:
    """The visible text of a page, roughly: tags out, whitespace squeezed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", response.content.decode(), flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))


def test_registered_read_only(history, staff):
    assert isinstance(admin.site._registry[BemiChange], BemiChangeAdmin)
    assert staff.get("/admin/bemi/bemichange/add/").status_code == 403
    change = BemiChange.objects.updated().get()
    url = f"/admin/bemi/bemichange/{change.pk}/change/"
    assert staff.post(url, {"operation": "DELETE"}).status_code == 403
    assert staff.post(f"/admin/bemi/bemichange/{change.pk}/delete/").status_code == 403
    assert BemiChange.objects.updated().get().operation == "UPDATE"


def test_changelist_filters_and_search(history, staff):
    page = text(staff.get("/admin/bemi/bemichange/"))
    assert "3 changes" in page
    assert page.index("Dec. 11, 2023, 5:09 p.m. CREATE todo 27") < page.index("Dec. 11, 2023, 5:09 p.m. CREATE todo 26")  # newest first
    assert "By table" in page and "By operation" in page and "By committed at" in page
    page = text(staff.get("/admin/bemi/bemichange/?operation__exact=UPDATE"))
    assert "path: /todo/26/complete · method: PUT · user_id: 187234" in page  # jsonb key order
    assert "is_completed, task" in page or "task, is_completed" in page
    assert "method: POST" not in page
    page = text(staff.get("/admin/bemi/bemichange/?q=%2Ftodo%2F26"))
    assert "method: PUT" in page and "method: POST" not in page
    page = text(staff.get("/admin/bemi/bemichange/?q=user_id%3D5"))  # key=value: containment, JSON value
    assert "user_id: 5" in page and "user_id: 187234" not in page
    page = text(staff.get("/admin/bemi/bemichange/?q=method%3DPUT"))  # not JSON: a string
    assert "method: PUT" in page and "method: POST" not in page
    page = text(staff.get("/admin/bemi/bemichange/?q=nothing-matches"))
    assert "method: " not in page


def test_change_detail_shows_a_readable_diff(history, staff):
    change = BemiChange.objects.updated().get()
    response = staff.get(f"/admin/bemi/bemichange/{change.pk}/change/")
    body = response.content.decode()
    assert '<td class="bemi-before">Sleep</td><td class="bemi-after">Sleep &lt;b&gt;well&lt;/b&gt;</td>' in body
    assert '<th scope="row">is_completed</th><td class="bemi-before">false</td><td class="bemi-after">true</td>' in body
    page = text(response)
    assert 'UPDATE "todo" SET ...' in page
    assert "Save" not in page  # read-only


def test_history_view_of_an_object(history, staff):
    response = staff.get("/admin/queryapp/todo/26/history/")
    assert response.status_code == 200
    page = text(response)
    assert "Change history: Sleep <b>well</b>" in page
    assert page.index("UPDATE") < page.index("CREATE")  # newest first
    assert "path: /todo/26/complete · method: PUT · user_id: 187234" in page
    assert "2 changes" in page
    assert "Eat" not in page  # another row's change
    body = response.content.decode()
    update = BemiChange.objects.updated().get()
    assert f'href="/admin/bemi/bemichange/{update.pk}/change/"' in body


def test_history_of_a_row_without_changes(recorder, staff):
    Todo.objects.create(id=40, task="Quiet")
    assert "No change of this row is recorded yet" in text(staff.get("/admin/queryapp/todo/40/history/"))


def test_history_needs_permission(history, client):
    user = User.objects.create_user("visitor", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get("/admin/queryapp/todo/26/history/").status_code == 403
    assert client.get("/admin/bemi/bemichange/").status_code == 403
