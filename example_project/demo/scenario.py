"""The Bemi documentation's scenario as real HTTP requests, sent like a browser (and an API client) would.

Create "Sleep", "Eat" and "Repeat" with the list page's form, complete
"Sleep" with ``PUT``, delete "Eat" with ``DELETE``. Five changes, each made
inside a request, so each carries that request's context.
"""

from __future__ import annotations

import html
import http.client
import re
from http.cookies import SimpleCookie
from urllib.parse import urlencode

from example_project.demo import DemoError, note

EXPECTED_CHANGES = 5
_TODO = re.compile(r'data-todo-id="(\d+)" data-task="([^"]*)"')
_CHANGE = re.compile(r'<tr class="change" data-operation="(\w+)" data-who="([^"]*)"')


class Client:
    """A tiny HTTP client that keeps cookies and sends Django's CSRF token."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                expect: tuple[int, ...] = (200, 204, 302), show: str = "") -> str:
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if method != "GET":
            headers["X-CSRFToken"] = self.cookies.get("csrftoken", "")
        if form is not None:
            body = urlencode({**form, "csrfmiddlewaretoken": self.cookies.get("csrftoken", "")})
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        for header in response.headers.get_all("Set-Cookie") or []:
            for name, morsel in SimpleCookie(header).items():
                self.cookies[name] = morsel.value
        if show:
            note(f"{method:<6} {path:<20} {show:<17} -> {response.status}")
        if response.status not in expect:
            raise DemoError(f"{method} {path} answered {response.status}:\n{text[:2000]}",
                            "Read .demo/app.log for the app's side.")
        return text

    def log_in(self, username: str, password: str) -> None:
        self.request("GET", "/accounts/login/")
        self.request("POST", "/accounts/login/", {"username": username, "password": password}, expect=(302,))
        if "sessionid" not in self.cookies:
            raise DemoError(f"logging in as {username!r} failed", "Read .demo/app.log.")

    def todo_ids(self) -> dict[str, int]:
        return {html.unescape(task): int(pk) for pk, task in _TODO.findall(self.request("GET", "/"))}


def run(client: Client) -> dict[str, int]:
    """Drive the scenario; return the ids of the todos by task."""
    client.request("GET", "/")  # the CSRF cookie, as a browser gets it
    for task in ("Sleep", "Eat", "Repeat"):
        client.request("POST", "/todos/", {"task": task}, expect=(302,), show=f"task={task}")
    ids = client.todo_ids()
    if set(ids) != {"Sleep", "Eat", "Repeat"}:
        raise DemoError(f"the list page shows {sorted(ids)} instead of Sleep, Eat and Repeat",
                        "Read .demo/app.log.")
    client.request("PUT", f"/todos/{ids['Sleep']}/complete/", expect=(204,), show="(complete Sleep)")
    client.request("DELETE", f"/todos/{ids['Eat']}/", expect=(204,), show="(delete Eat)")
    return ids


def show_history(client: Client, ids: dict[str, int]) -> None:
    """Read each todo's history page, as a person would, and say what it lists."""
    for task, pk in ids.items():
        page = client.request("GET", f"/todos/{pk}/", expect=(200,))
        changes = [f"{op} by {html.unescape(who)}" for op, who in _CHANGE.findall(page)]
        note(f"http://127.0.0.1:{client.port}/todos/{pk}/ ({task}): {', '.join(changes) or 'no changes'}")
