"""The admin's activity page through Django's test client: filters, grouping by transaction, keyset pages."""

import datetime as dt
import re

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext

from bemi import admin_activity
from bemi.models import BemiChange
from tests.queryapp.factory import BASE
from tests.queryapp.models import Todo


@pytest.fixture
def staff(client):
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    return client


@pytest.fixture
def activity(recorder):
    """User 42 creates 1 and 2 in one request (one transaction), user 7 completes 1; a job deletes 2 a day later."""
    add = recorder.add
    request = {"user_id": 42, "path": "/todo/new", "method": "POST", "SQL": "INSERT ..."}
    add("todo", 1, "CREATE", after={"id": 1, "task": "a", "is_completed": False}, context=request, committed_at=BASE)
    recorder.position -= 10  # same transaction: same position, next index
    add("todo", 2, "CREATE", after={"id": 2, "task": "b", "is_completed": False}, context=request, committed_at=BASE,
        change_index=1)
    add("todo", 1, "UPDATE", before={"id": 1, "task": "a", "is_completed": False},
        after={"id": 1, "task": "a", "is_completed": True}, context={"user_id": 7, "path": "/todo/1"},
        committed_at=BASE + dt.timedelta(minutes=5))
    add("todo", 2, "DELETE", before={"id": 2, "task": "b", "is_completed": False}, context={"job": "cleanup", "batch": 3},
        committed_at=BASE + dt.timedelta(days=1))
    add("queryapp_project", 1, "CREATE", after={"id": 1, "name": "Home"}, context={"user_id": "42"},
        committed_at=BASE + dt.timedelta(days=1, minutes=1))
    return recorder


def rows(response) -> list[list[str]]:
    """Per transaction: its context columns and its rows' operation and object."""
    body = response.content.decode()
    found = []
    table = body.split('<table id="bemi-activity">', 1)[-1].split('<p class="paginator">', 1)[0]
    for tx in table.split('<tr class="bemi-transaction">')[1:]:
        columns = [re.sub(r"\s+", " ", c).strip() for c in re.findall(r'<td class="bemi-ctx-value">(.*?)</td>', tx, flags=re.S)]
        changes = [f"{op} {re.sub(r'<.*', '', obj, flags=re.S).strip()}" for op, obj in re.findall(
            r'<td class="bemi-op [^"]+">(\w+)</td>\s*<td class="bemi-object">(.*?)</td>', tx, flags=re.S)]
        found.append(columns + changes)
    return found


def test_everything_newest_first_grouped_by_transaction(activity, staff):
    page = staff.get("/admin/bemi/bemichange/activity/")
    assert page.status_code == 200
    assert rows(page) == [
        ["42", "", "", "CREATE queryapp_project 1"],
        ["", "", "cleanup", "DELETE todo 2"],
        ["7", "/todo/1", "", "UPDATE todo 1"],
        ["42", "/todo/new", "", "CREATE todo 2", "CREATE todo 1"],
    ]
    body = page.content.decode()
    assert '<th scope="col" class="bemi-key">user_id</th>' in body and "batch: 3" in body
    assert body.count('href="/admin/queryapp/todo/1/history/"') == 2  # Todo has a history page; Project none
    assert "is_completed" in body and "false" in body


def test_what_did_user_42_do_yesterday(activity, staff):
    since, until = BASE.date().isoformat(), (BASE + dt.timedelta(days=1)).date().isoformat()
    page = staff.get(f"/admin/bemi/bemichange/activity/?ctx.user_id=42&since={since}&until={until}")
    assert rows(page) == [["42", "/todo/new", "", "CREATE todo 2", "CREATE todo 1"]]
    # 42 as a number or as text: both match
    assert len(rows(staff.get("/admin/bemi/bemichange/activity/?ctx.user_id=42"))) == 2


def test_what_did_this_job_change_and_other_context_keys(activity, staff):
    assert rows(staff.get("/admin/bemi/bemichange/activity/?ctx.job=cleanup")) == [["", "", "cleanup", "DELETE todo 2"]]
    assert rows(staff.get("/admin/bemi/bemichange/activity/?ctx=batch%3D3")) == [["", "", "cleanup", "DELETE todo 2"]]
    assert rows(staff.get("/admin/bemi/bemichange/activity/?ctx.path=%2Ftodo%2F1")) == [["7", "/todo/1", "", "UPDATE todo 1"]]


def test_table_and_operation(activity, staff):
    assert [r[-1] for r in rows(staff.get("/admin/bemi/bemichange/activity/?table=todo&operation=update"))] == ["UPDATE todo 1"]
    assert [r[-1] for r in rows(staff.get("/admin/bemi/bemichange/activity/?table=public.queryapp_project"))] == [
        "CREATE queryapp_project 1"]


def test_bad_filters_are_said_and_ignored(activity, staff):
    page = staff.get("/admin/bemi/bemichange/activity/?since=yesterday&operation=DROP")
    body = page.content.decode()
    assert "Unknown operation &#x27;DROP&#x27;" in body and "since: not a date and time" in body
    assert len(rows(page)) == 4


def test_keyset_pages_without_count(activity, staff, monkeypatch):
    monkeypatch.setattr(admin_activity, "PAGE_SIZE", 2)
    with CaptureQueriesContext(connection) as queries:
        first = staff.get("/admin/bemi/bemichange/activity/")
    on_changes = [q["sql"] for q in queries if 'FROM "bemi"."changes"' in q["sql"]]
    assert len(on_changes) == 1 and "COUNT(" not in on_changes[0].upper() and "OFFSET" not in on_changes[0]
    assert on_changes[0].endswith("LIMIT 3")
    assert [r[-1] for r in rows(first)] == ["CREATE queryapp_project 1", "DELETE todo 2"]
    older = re.search(r'href="\?([^"]+)" id="bemi-older"', first.content.decode()).group(1)
    with CaptureQueriesContext(connection) as queries:
        second = staff.get("/admin/bemi/bemichange/activity/?" + older.replace("&amp;", "&"))
    keyset = [q["sql"] for q in queries if 'FROM "bemi"."changes"' in q["sql"]][0]
    assert '"bemi"."changes"."committed_at" <= ' in keyset  # a bound the committed_at index can start from
    assert [r[-1] for r in rows(second)] == ["UPDATE todo 1", "CREATE todo 2"]
    third = re.search(r'href="\?([^"]+)" id="bemi-older"', second.content.decode()).group(1)
    assert [r[-1] for r in rows(staff.get("/admin/bemi/bemichange/activity/?" + third.replace("&amp;", "&")))] == [
        "CREATE todo 1"]


def test_needs_the_view_permission(activity, client):
    client.force_login(User.objects.create_user("clerk", "c@example.com", "pw", is_staff=True))
    assert client.get("/admin/bemi/bemichange/activity/").status_code == 403
    assert BemiChange.objects.count() == 5
    assert Todo.objects.count() == 0
