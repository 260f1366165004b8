"""`changes` partitioned by committed_at, through the worker, on a real PostgreSQL."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from psycopg import sql

from bemi.worker.partitions import (
    Partitions, parse_retention, partition_name, period_end, period_start,
)
from bemi.worker.runner import Worker

UTC = timezone.utc
PUBLISHED_INDEXES = 9  # 7 published + primary key + identity


def layout(env) -> dict[str, str]:
    return dict(env.execute(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'bemi.changes'::regclass"))


def where(env) -> dict[str, str]:
    """primary_key -> the partition holding its change."""
    return dict(env.execute('SELECT primary_key, tableoid::regclass::text FROM bemi.changes'))


def test_periods():
    at = datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    assert period_start(at, "month") == datetime(2025, 12, 1, tzinfo=UTC)
    assert period_end(period_start(at, "month"), "month") == datetime(2026, 1, 1, tzinfo=UTC)
    assert period_start(at, "week") == datetime(2025, 12, 29, tzinfo=UTC)  # a Monday
    assert period_start(at.astimezone(timezone(timedelta(hours=2))), "day") == datetime(2025, 12, 31, tzinfo=UTC)
    assert partition_name(datetime(2025, 12, 1, tzinfo=UTC)) == "changes_p20251201"
    assert parse_retention("90") == parse_retention(90) == parse_retention("90d") == timedelta(days=90)
    assert parse_retention(timedelta(hours=5)) == timedelta(hours=5) and parse_retention(None) is None
    with pytest.raises(ValueError):
        parse_retention("soon")


def test_fresh_install_is_partitioned_with_current_and_next_partitions(worker_env):
    env = worker_env
    env.execute("DROP TABLE IF EXISTS bemi.changes")
    env.run_once(partition_interval="week")
    (kind,), = env.execute("SELECT relkind FROM pg_class WHERE oid = 'bemi.changes'::regclass")
    assert kind == "p"
    this_week = period_start(datetime.now(UTC), "week")
    names = {partition_name(this_week), partition_name(this_week + timedelta(days=7)), "changes_default"}
    assert set(layout(env)) == names
    for name in names:  # the published indexes, the primary key and the identity on every partition
        (count,), = env.execute("SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass", [name])
        assert count == PUBLISHED_INDEXES, name
    unique = [r[0] for r in env.execute(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = 'bemi.changes'::regclass "
        "AND indisunique")]
    assert any('(database, commit_position, change_index, committed_at)' in d for d in unique), unique
    published = {r[0] for r in env.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = %s",
                                           [env.publication])}
    assert not any(t.startswith("changes") for t in published)


def test_the_sink_makes_the_partition_a_change_needs(worker_env):
    """The partition manager's clock says January 2024; changes committed now still find a partition."""
    env = worker_env
    env.execute("CREATE TABLE part_w (id int PRIMARY KEY)")
    env.run_once(clock=lambda: datetime(2024, 1, 15, tzinfo=UTC))
    assert {"changes_p20240101", "changes_p20240201"} <= set(layout(env))
    env.execute("INSERT INTO part_w VALUES (1)")
    env.run_once(clock=lambda: datetime(2024, 1, 15, tzinfo=UTC))
    now_partition = partition_name(period_start(datetime.now(UTC), "month"))
    assert where(env) == {"1": f"{now_partition}"}


def test_changes_across_a_partition_boundary_in_one_batch(worker_env):
    """Two transactions on either side of a partition boundary, stored by one worker pass: each
    change lands in its own partition, also when the second partition is made mid-transaction
    (its rows wait in changes_default and are moved right after the commit)."""
    env = worker_env
    env.execute("CREATE TABLE edge_w (id int PRIMARY KEY)")
    env.run_once(partition_interval="day")
    for copy_rows in (2000, 1):  # one COPY chunk for both / the second arrives with the COPY open
        env.execute("TRUNCATE bemi.changes")
        for name in layout(env):
            if name != "changes_default":
                env.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
        base = 10 * copy_rows
        env.execute("INSERT INTO edge_w VALUES (%s)", [base + 1])
        time.sleep(0.05)
        (boundary,), = env.execute("SELECT now()")
        time.sleep(0.05)
        env.execute("INSERT INTO edge_w VALUES (%s)", [base + 2])
        # A partition ends between the two commits (as a period boundary does).
        day = period_start(boundary, "day")
        # Made as a partition at once: a table is bemi's own by oid (its root), not by a `_bemi` name.
        env.execute(sql.SQL("CREATE TABLE changes_edge PARTITION OF bemi.changes FOR VALUES FROM ({}) TO ({})").format(
            sql.Literal(day), sql.Literal(boundary)))
        env.run_once(partition_interval="day", copy_rows=copy_rows,
                     clock=lambda: datetime(2024, 1, 15, tzinfo=UTC))
        assert where(env) == {str(base + 1): "changes_edge", str(base + 2): partition_name(boundary)}, copy_rows
        assert env.execute("SELECT count(*) FROM bemi.changes_default") == [(0,)]
        env.execute("DROP TABLE changes_edge")


def test_a_change_for_a_dropped_partition_goes_to_default_then_is_moved(worker_env):
    env = worker_env
    env.execute("CREATE TABLE gone_w (id int PRIMARY KEY)")
    worker = Worker(env.config())
    worker.setup()
    try:
        current = partition_name(period_start(datetime.now(UTC), "month"))
        env.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(current)))  # e.g. by bemi_prune
        env.execute("INSERT INTO gone_w VALUES (1)")
        assert worker.drain() == 1  # the sink still believes the partition exists: nothing fails
        assert where(env) == {"1": "changes_default"}
        worker._maintain_partitions(force=True)  # what the running loop does every minute
        assert where(env) == {"1": current}
    finally:
        worker.close()


def test_partitions_manager_fills_only_gaps(worker_env):
    env = worker_env
    env.run_once()
    import psycopg

    with psycopg.connect(env.dsn) as conn:
        manager = Partitions(conn, "month", clock=lambda: datetime(2030, 5, 20, tzinfo=UTC))
        assert manager.ensure_ahead() == ["changes_p20300501", "changes_p20300601"]
        assert manager.ensure_ahead() == []
        day = Partitions(conn, "day")
        assert day.ensure_periods([datetime(2030, 5, 3, tzinfo=UTC), datetime(2030, 7, 1, tzinfo=UTC)]) == [
            "changes_p20300701"]  # 3 May lies in May's partition already


def test_settings_and_partitions_never_tracked():
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from bemi import conf

    with override_settings(BEMI_RETENTION=timedelta(days=3), BEMI_PARTITION_INTERVAL="week"):
        assert conf.retention() == timedelta(days=3) and conf.partition_interval() == "week"
    with override_settings(BEMI_RETENTION=30):
        assert conf.retention() == timedelta(days=30) and conf.partition_interval() == "month"
    with override_settings(BEMI_RETENTION="a while"), pytest.raises(ImproperlyConfigured):
        conf.retention()
    with override_settings(BEMI_PARTITION_INTERVAL="year"), pytest.raises(ImproperlyConfigured):
        conf.partition_interval()
    # Partitions of changes are never tracked: decided by oid (their root is registered as bemi's own
    # table, bemi/worker/tracked.py), not by name (tests/test_tracking_db.py: the rename attack).
