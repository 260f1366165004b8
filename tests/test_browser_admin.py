"""The admin history UI in a real browser: Debian's Chromium driven by Selenium against the live server.

./scripts/test installs chromium and chromium-driver when it runs as root; elsewhere these tests
skip and say what to install. With BEMI_UPDATE_SCREENSHOT=1 the history page's screenshot
replaces docs/admin-history.png (docs/admin.md shows it); otherwise it goes to a temporary file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from tests.queryapp.models import Todo

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "admin-history.png"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,860",
]


@pytest.fixture
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed: run ./scripts/test as root (it installs them) or "
            "apt-get install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="bemi-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def todo_history(tx_recorder):
    who = {"user_id": 187234, "method": "POST", "path": "/todo"}
    with tx_recorder.track(Todo, 26, {**who, "SQL": 'INSERT INTO "todo" ("id", "task", "is_completed") VALUES (...)'}):
        Todo.objects.create(id=26, task="Sleep")
    with tx_recorder.track(Todo, 26, {**who, "method": "PATCH", "path": "/todo/26", "SQL": 'UPDATE "todo" SET "task" = ...'}):
        Todo.objects.filter(id=26).update(task="Sleep 8 hours")
    with tx_recorder.track(Todo, 26, {"user_id": 5, "method": "PUT", "path": "/todo/26/complete", "SQL": 'UPDATE "todo" SET "is_completed" = ...'}):
        Todo.objects.filter(id=26).update(is_completed=True)
    User.objects.create_superuser("admin", "admin@example.com", "s3cret-pass")


def test_history_page_in_a_browser(live_server, browser, todo_history):
    from selenium.webdriver.common.by import By

    browser.get(f"{live_server.url}/admin/login/?next=/admin/queryapp/todo/26/change/")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys("s3cret-pass")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    assert browser.find_element(By.NAME, "task").get_attribute("value") == "Sleep 8 hours"

    browser.find_element(By.LINK_TEXT, "HISTORY" if _uppercase(browser) else "History").click()
    assert browser.current_url.endswith("/admin/queryapp/todo/26/history/")
    assert "Change history: Sleep 8 hours" in browser.find_element(By.CSS_SELECTOR, "#content h1").text

    rows = browser.find_elements(By.CSS_SELECTOR, "#bemi-history tr.bemi-change")
    assert [r.find_element(By.CSS_SELECTOR, ".bemi-op").text for r in rows] == ["UPDATE", "UPDATE", "CREATE"]
    newest = rows[0]
    assert newest.find_element(By.CSS_SELECTOR, ".bemi-who").text.startswith("path: /todo/26/complete · method: PUT · user_id: 5")
    assert newest.find_element(By.CSS_SELECTOR, "table.bemi-diff tbody").text == "is_completed false true"
    assert rows[1].find_element(By.CSS_SELECTOR, "table.bemi-diff tbody").text == "task Sleep Sleep 8 hours"
    created = rows[2].find_element(By.CSS_SELECTOR, "table.bemi-diff tbody").text.splitlines()
    assert created == ["id — 26", "task — Sleep", "is_completed — false"]
    # The SQL stays folded until asked for.
    sql = newest.find_element(By.TAG_NAME, "details")
    assert not sql.find_element(By.TAG_NAME, "code").is_displayed()
    sql.find_element(By.TAG_NAME, "summary").click()
    assert sql.find_element(By.TAG_NAME, "code").text == 'UPDATE "todo" SET "is_completed" = ...'
    assert "3 changes" in browser.find_element(By.CSS_SELECTOR, "p.paginator").text
    shot = SCREENSHOT if os.environ.get("BEMI_UPDATE_SCREENSHOT") else Path(tempfile.mkdtemp()) / "history.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Each entry links to the read-only change page with the same diff.
    newest.find_element(By.CSS_SELECTOR, "th a").click()
    assert "UPDATE todo 26" in browser.find_element(By.TAG_NAME, "h2").text or "UPDATE todo 26" in browser.title
    assert browser.find_element(By.CSS_SELECTOR, "table.bemi-diff tbody").text == "is_completed false true"
    assert not browser.find_elements(By.CSS_SELECTOR, "input[type=submit][name=_save]")


def test_change_list_filters_in_a_browser(live_server, browser, todo_history):
    from selenium.webdriver.common.by import By

    browser.get(f"{live_server.url}/admin/login/?next=/admin/bemi/bemichange/")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys("s3cret-pass")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")) == 3
    browser.find_element(By.LINK_TEXT, "CREATE").click()
    _wait_for_url(browser, "operation__exact=CREATE")  # else the rows may still be the old page's
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 1 and "CREATE" in rows[0].text
    browser.get(f"{live_server.url}/admin/bemi/bemichange/")
    search = browser.find_element(By.ID, "searchbar")
    search.send_keys("/todo/26/complete\n")
    _wait_for_url(browser, "q=")
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 1 and "user_id: 5" in rows[0].text


def _wait_for_url(browser, part: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(lambda b: part in b.current_url)


def _uppercase(browser) -> bool:
    from selenium.webdriver.common.by import By

    return bool(browser.find_elements(By.LINK_TEXT, "HISTORY"))
