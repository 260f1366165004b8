"""The example app's views: ``python manage.py test todos`` (tests/test_demo.py runs it).

The whole path (request context -> WAL -> worker -> changes) is exercised by
``./scripts/demo`` and its test; here the ``changes`` rows are written
directly, as the worker would.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import bemi
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import TestCase
from django.urls import reverse

from bemi.models import BemiChange
from todos.history import todo_history
from todos.models import Todo
from todo_project.utils import get_bemi_context

CHANGES_SQL = Path(bemi.__file__).parent / "sql" / "changes.sql"


class TodoViewsTest(TestCase):
    def test_create_edit_complete_reopen_delete(self) -> None:
        self.assertEqual(self.client.post("/todos/", {"task": "Sleep"}).status_code, 302)
        todo = Todo.objects.get()
        self.assertEqual((todo.task, todo.is_completed), ("Sleep", False))
        self.assertContains(self.client.get("/"), f'data-todo-id="{todo.pk}" data-task="Sleep"')

        self.client.post(f"/todos/{todo.pk}/edit/", {"task": "Sleep more"})
        self.client.post(f"/todos/{todo.pk}/complete/")
        todo.refresh_from_db()
        self.assertEqual((todo.task, todo.is_completed), ("Sleep more", True))
        self.client.post(f"/todos/{todo.pk}/complete/", {"is_completed": "0"})
        todo.refresh_from_db()
        self.assertFalse(todo.is_completed)

        self.assertContains(self.client.get(f"/todos/{todo.pk}/delete/"), "Delete")
        self.client.post(f"/todos/{todo.pk}/delete/")
        self.assertFalse(Todo.objects.exists())

    def test_api_style_put_and_delete(self) -> None:
        todo = Todo.objects.create(task="Eat")
        self.assertEqual(self.client.put(f"/todos/{todo.pk}/complete/").status_code, 204)
        todo.refresh_from_db()
        self.assertTrue(todo.is_completed)
        self.assertEqual(self.client.delete(f"/todos/{todo.pk}/").status_code, 204)
        self.assertFalse(Todo.objects.exists())

    def test_an_empty_task_is_refused(self) -> None:
        self.assertEqual(self.client.post("/todos/", {"task": ""}).status_code, 400)
        self.assertFalse(Todo.objects.exists())

    def test_context_names_the_user_method_and_path(self) -> None:
        user = get_user_model().objects.create_user("ann", password="pw")
        self.client.force_login(user)
        response = self.client.get("/")
        context = get_bemi_context(response.wsgi_request)
        self.assertEqual(context, {"user_id": user.pk, "method": "GET", "path": "/"})


class HistoryPageTest(TestCase):
    def setUp(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute(CHANGES_SQL.read_text())
        self.user = get_user_model().objects.create_user("ann")

    def change(self, pk: int, operation: str, before: dict, after: dict, context: dict, second: int) -> None:
        at = datetime(2023, 12, 11, 17, 9, second, tzinfo=timezone.utc)
        BemiChange.objects.create(
            database="db", schema="public", table="todo", primary_key=str(pk), operation=operation,
            before=before, after=after, context=context, committed_at=at, queued_at=at, created_at=at,
            transaction_id=second, position=second, commit_position=second, change_index=0,
        )

    def test_lists_when_what_who_where_and_the_changed_columns(self) -> None:
        todo = Todo.objects.create(task="Sleep", is_completed=True)
        row = {"id": todo.pk, "task": "Sleep", "is_completed": False}
        self.change(todo.pk, "CREATE", {}, row, {"user_id": self.user.pk, "method": "POST", "path": "/todos/"}, 9)
        self.change(todo.pk, "UPDATE", row, {**row, "is_completed": True},
                    {"user_id": None, "method": "PUT", "path": f"/todos/{todo.pk}/complete/", "SQL": "UPDATE x"}, 15)
        self.change(todo.pk + 1, "CREATE", {}, {"id": todo.pk + 1}, {}, 11)  # another todo's

        page = self.client.get(f"/todos/{todo.pk}/").content.decode()
        self.assertEqual(page.count('<tr class="change"'), 2)
        self.assertIn(f'data-operation="CREATE" data-who="ann (id {self.user.pk})"', page)
        self.assertIn('data-operation="UPDATE" data-who="anonymous"', page)
        self.assertLess(page.index("2023-12-11 17:09:09"), page.index("2023-12-11 17:09:15"))
        self.assertIn(f"PUT <code>/todos/{todo.pk}/complete/</code>", page)
        self.assertIn("<code>is_completed</code>: <code>false</code> → <code>true</code>", page)
        self.assertIn("UPDATE x", page)

    def test_a_deleted_todo_keeps_its_history_and_an_unknown_one_is_404(self) -> None:
        self.change(41, "DELETE", {"id": 41, "task": "Eat"}, {}, {"method": "DELETE"}, 18)
        page = self.client.get("/todos/41/")
        self.assertContains(page, "(deleted)")
        self.assertContains(page, 'data-operation="DELETE" data-who="(no context)"')
        self.assertEqual(self.client.get("/todos/42/").status_code, 404)


class NoWorkerYetTest(TestCase):
    def test_without_a_changes_table_the_page_says_to_start_the_worker(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS changes")
        todo = Todo.objects.create(task="Repeat")
        self.assertIsNone(todo_history(todo.pk))
        self.assertContains(self.client.get(f"/todos/{todo.pk}/"), "start the worker")
