"""Activity, revert and recover in a real browser (Chromium via chromedriver, as tests/test_browser_admin.py).

With BEMI_UPDATE_SCREENSHOT=1 the screenshots replace docs/admin-activity.png, docs/admin-revert.png and
docs/admin-recover.png (docs/admin.md shows them); otherwise they go to a temporary folder.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User

from tests.queryapp.models import Todo
from tests.test_browser_admin import browser  # noqa: F401  (the fixture)

DOCS = Path(__file__).resolve().parent.parent / "docs"
MASK_A = "bemi-masked:0123456789abcdef01234567"
MASK_B = "bemi-masked:ffffffffffffffffffffffff"
PERMISSIONS = ("bemi.view_bemichange", "bemi.revert_change", "queryapp.view_todo", "queryapp.change_todo",
               "queryapp.add_todo", "queryapp.delete_todo")


def screenshot(browser, name: str) -> None:
    folder = DOCS if os.environ.get("BEMI_UPDATE_SCREENSHOT") else Path(tempfile.mkdtemp())
    shot = folder / name
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def story(tx_recorder):
    """A morning of a Todo app: user 42 plans the day in one request, user 7 completes one, a job cleans up."""
    when = dt.datetime(2023, 12, 11, 9, 0, tzinfo=dt.timezone.utc)
    plan = {"user_id": 42, "path": "/todo/bulk", "method": "POST"}
    for index, (pk, task) in enumerate([(26, "Sleep"), (27, "Eat"), (28, "Repeat")]):
        Todo.objects.create(id=pk, task=task)
        tx_recorder.position -= 10 if index else 0  # one transaction: same positions, the next index
        tx_recorder.add("todo", pk, "CREATE", after=tx_recorder.row("todo", pk), context=plan, committed_at=when,
                        change_index=index)
    with tx_recorder.track(Todo, 26, {"user_id": 7, "path": "/todo/26/complete", "method": "PUT"},
                           at=when + dt.timedelta(minutes=12)):
        Todo.objects.filter(id=26).update(is_completed=True, task="Sleep 8 hours")
    with tx_recorder.track(Todo, 27, {"job": "cleanup", "batch": 3}, at=when + dt.timedelta(minutes=30)):
        Todo.objects.filter(id=27).delete()
    tx_recorder.add("todo", 28, "UPDATE", before={"id": 28, "task": MASK_A, "is_completed": False},
                    after={"id": 28, "task": MASK_B, "is_completed": False},
                    context={"user_id": 42, "path": "/todo/28", "method": "PATCH"},
                    committed_at=when + dt.timedelta(minutes=45))
    user = User.objects.create_user("clerk", "clerk@example.com", "s3cret-pass", is_staff=True)
    for codename in PERMISSIONS:
        app, code = codename.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app, codename=code))
    return tx_recorder


def login(browser, live_server, next_url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{live_server.url}/admin/login/?next={next_url}")
    browser.find_element(By.NAME, "username").send_keys("clerk")
    browser.find_element(By.NAME, "password").send_keys("s3cret-pass")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()


def test_activity_page_in_a_browser(live_server, browser, story):  # noqa: F811
    from selenium.webdriver.common.by import By

    login(browser, live_server, "/admin/bemi/bemichange/")
    browser.find_element(By.CSS_SELECTOR, "a.bemi-activity-link").click()
    assert browser.current_url.endswith("/admin/bemi/bemichange/activity/")
    transactions = browser.find_elements(By.CSS_SELECTOR, "#bemi-activity tr.bemi-transaction")
    assert len(transactions) == 4
    browser.find_element(By.ID, "ctx-user_id").send_keys("42")
    browser.find_element(By.CSS_SELECTOR, "#bemi-activity-filters input[type=submit]").click()
    _wait_for_url(browser, "ctx.user_id=42")
    transactions = browser.find_elements(By.CSS_SELECTOR, "#bemi-activity tr.bemi-transaction")
    assert len(transactions) == 2
    masked, planned = transactions
    assert [c.text for c in planned.find_elements(By.CSS_SELECTOR, "td.bemi-ctx-value")] == ["42", "/todo/bulk", ""]
    assert [r.find_element(By.CSS_SELECTOR, ".bemi-object").text.splitlines()[0]
            for r in planned.find_elements(By.CSS_SELECTOR, "tr.bemi-row")] == ["todo 28", "todo 27", "todo 26"]
    # a masked value reads as changed, never as its digest
    assert masked.find_element(By.CSS_SELECTOR, "table.bemi-diff tbody").text == "task masked masked"
    assert "bemi-masked:" not in browser.page_source and "0123456789abcdef" not in browser.page_source
    screenshot(browser, "admin-activity.png")
    planned.find_element(By.CSS_SELECTOR, "a.bemi-history-link").click()
    assert "/admin/queryapp/todo/" in browser.current_url and browser.current_url.endswith("/history/")


def test_revert_from_the_history_page_in_a_browser(live_server, browser, story):  # noqa: F811
    from selenium.webdriver.common.by import By

    login(browser, live_server, "/admin/queryapp/todo/26/history/")
    newest = browser.find_elements(By.CSS_SELECTOR, "#bemi-history tr.bemi-change")[0]
    newest.find_element(By.CSS_SELECTOR, "a.bemi-revert").click()
    _wait_for_url(browser, "/admin/bemi/bemichange/revert/")
    assert "Revert changes" in browser.find_element(By.CSS_SELECTOR, "#content h1").text
    step = browser.find_element(By.CSS_SELECTOR, "#bemi-revert-steps tr.bemi-step")
    assert step.find_element(By.CSS_SELECTOR, ".bemi-action").text == "UPDATE"
    assert step.find_element(By.CSS_SELECTOR, "table.bemi-writes tbody").text.splitlines() == [
        "task Sleep 8 hours Sleep", "is_completed true false"]
    screenshot(browser, "admin-revert.png")
    browser.find_element(By.CSS_SELECTOR, "#bemi-revert-form input[type=submit]").click()
    _wait_for_url(browser, "/history/")
    assert "Reverted 1 change (1 row written)." in browser.find_element(By.CSS_SELECTOR, ".messagelist").text
    assert Todo.objects.filter(id=26).values_list("task", "is_completed").get() == ("Sleep", False)


def test_revert_action_shows_conflicts_in_a_browser(live_server, browser, story):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    login(browser, live_server, "/admin/bemi/bemichange/?operation__exact=CREATE")
    for box in browser.find_elements(By.CSS_SELECTOR, "#result_list input.action-select"):
        box.click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("revert_selected")
    browser.find_element(By.CSS_SELECTOR, "button[name=index], .actions button").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bemi-revert-steps tr.bemi-step")) == 3
    problems = browser.find_element(By.ID, "bemi-revert-steps").text
    assert "changed the row after it" in problems
    assert not browser.find_element(By.CSS_SELECTOR, "#bemi-revert-form input[type=submit]").is_enabled()
    assert Todo.objects.count() == 2


def test_recover_deleted_in_a_browser(live_server, browser, story):  # noqa: F811
    from selenium.webdriver.common.by import By

    login(browser, live_server, "/admin/queryapp/todo/")
    browser.find_element(By.CSS_SELECTOR, "a.bemi-recover-link").click()
    _wait_for_url(browser, "/admin/queryapp/todo/recover/")
    rows = browser.find_elements(By.CSS_SELECTOR, "#bemi-recover tr.bemi-deleted")
    assert [r.find_element(By.CSS_SELECTOR, ".bemi-pk").text for r in rows] == ["27"]
    assert "job: cleanup · batch: 3" in rows[0].find_element(By.CSS_SELECTOR, ".bemi-who").text
    assert rows[0].find_element(By.CSS_SELECTOR, "table.bemi-diff").text.splitlines() == [
        "id 27", "task Eat", "is_completed false"]
    screenshot(browser, "admin-recover.png")
    rows[0].find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    browser.find_element(By.CSS_SELECTOR, "#bemi-recover-form input[type=submit]").click()
    _wait_for_url(browser, "/admin/bemi/bemichange/revert/")
    assert "Restore deleted rows" in browser.find_element(By.CSS_SELECTOR, "#content h1").text
    browser.find_element(By.CSS_SELECTOR, "#bemi-revert-form input[type=submit]").click()
    _wait_for_url(browser, "/admin/queryapp/todo/recover/")
    assert Todo.objects.get(id=27).task == "Eat"


def _wait_for_url(browser, part: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(lambda b: part in b.current_url)
