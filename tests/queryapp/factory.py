"""Write `changes` rows the way the worker does, without the worker.

``Recorder.track()`` snapshots a row with ``to_jsonb`` before and after a
block of ORM writes and stores one change, so query, time-travel and revert
tests run on real rows and real JSON. The end-to-end tests go through the
worker instead (tests/test_query_worker.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Any, Iterator

from django.db import connections

from bemi import sql as bemi_sql
from bemi.models import BemiChange

BASE = dt.datetime(2023, 12, 11, 17, 9, 9, tzinfo=dt.timezone.utc)


def create_changes_table(using: str = "default") -> None:
    """`changes` as the worker makes it: partitioned, with the monthly partitions around BASE (other
    moments go to changes_default, as they would)."""
    from bemi.worker.partitions import Partitions

    sql = bemi_sql.read("changes.sql")
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute(sql)
    connection.ensure_connection()
    months = [dt.datetime(2023, 11, 1, tzinfo=dt.timezone.utc), dt.datetime(2023, 12, 1, tzinfo=dt.timezone.utc),
              dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)]
    Partitions(connection.connection, "month").ensure_periods(months)


class Recorder:
    def __init__(self, using: str | None = None, start: dt.datetime = BASE, step: dt.timedelta = dt.timedelta(seconds=2)) -> None:
        self.using = using
        self.clock = start
        self.step = step
        self.position = 1000

    def tick(self) -> dt.datetime:
        now = self.clock
        self.clock += self.step
        return now

    def row(self, table: str, primary_key: Any, using: str = "default") -> dict:
        """The row as ``to_jsonb`` shows it (what the worker stores), or {}."""
        conn = connections[using]
        with conn.cursor() as cursor:
            cursor.execute(
                f"SELECT to_jsonb(t) FROM {conn.ops.quote_name(table)} t WHERE id = %s", [primary_key]
            )
            found = cursor.fetchone()
        if not found:
            return {}
        value = found[0]
        return json.loads(value) if isinstance(value, str) else value

    def add(
        self,
        table: str,
        primary_key: Any,
        operation: str,
        before: dict | None = None,
        after: dict | None = None,
        context: dict | None = None,
        committed_at: dt.datetime | None = None,
        change_index: int = 0,
    ) -> BemiChange:
        self.position += 10
        when = committed_at or self.tick()
        manager = BemiChange.objects.db_manager(self.using) if self.using else BemiChange.objects
        return manager.create(
            database="test_bemi",
            schema="public",
            table=table,
            primary_key=None if primary_key is None else str(primary_key),
            operation=operation,
            before=before or {},
            after=after or {},
            context=context or {},
            committed_at=when,
            queued_at=when,
            created_at=when,
            transaction_id=self.position,
            position=self.position,
            commit_position=self.position + 5,
            change_index=change_index,
        )

    @contextlib.contextmanager
    def track(self, model: Any, primary_key: Any, context: dict | None = None, at: dt.datetime | None = None) -> Iterator[None]:
        """Record the change that the block makes to one row."""
        table = model._meta.db_table
        before = self.row(table, primary_key)
        yield
        after = self.row(table, primary_key)
        if before == after:
            return
        operation = "CREATE" if not before else "DELETE" if not after else "UPDATE"
        self.add(table, primary_key, operation, before, after, context, at)
