"""Retention: bemi_prune and the worker's BEMI_RETENTION, with a worker running; time travel after it."""

from __future__ import annotations

import io
import time
from datetime import datetime, timedelta, timezone

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from bemi.models import BemiChange
from bemi.timetravel import HistoryPrunedError
from bemi.worker.partitions import partition_name, period_end, period_start

UTC = timezone.utc


def past(env, month: str, days: int, per_day: int = 3, table: str = "old_t") -> None:
    """Changes committed long ago (as after an outage), in a partition made for them."""
    start = datetime.fromisoformat(month + "-01T00:00:00+00:00")
    from bemi.worker.partitions import Partitions
    import psycopg

    with psycopg.connect(env.dsn) as conn:
        Partitions(conn).ensure_periods([start])
    env.execute(
        """INSERT INTO bemi.changes (database, schema, "table", primary_key, operation, before, after, committed_at,
                                transaction_id, position, commit_position, change_index)
           SELECT 'src', 'public', %s, (d * 100 + i)::text, 'CREATE', '{}', jsonb_build_object('id', d * 100 + i),
                  %s::timestamptz + d * interval '1 day' + i * interval '1 minute', d, d, d * 1000 + i, i
           FROM generate_series(0, %s - 1) d, generate_series(0, %s - 1) i""",
        [table, start, days, per_day])


def wait_for(env, count: int, where: str = "TRUE", timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while env.execute(f"SELECT count(*) FROM bemi.changes WHERE {where}")[0][0] < count:
        assert time.monotonic() < deadline, env.execute(f"SELECT count(*) FROM bemi.changes WHERE {where}")
        time.sleep(0.05)


def prune(*args: str) -> str:
    out = io.StringIO()
    call_command("bemi_prune", *args, stdout=out)
    return out.getvalue()


def test_prune_whole_and_straddling_partitions_while_the_worker_runs(worker_env):
    env = worker_env
    env.execute("CREATE TABLE live_t (id int PRIMARY KEY)")
    env.run_once()
    past(env, "2024-01", 31)
    past(env, "2024-02", 29)
    past(env, "2024-03", 31)
    worker = env.spawn("--poll-interval", "0.02")
    env.execute("INSERT INTO live_t SELECT generate_series(1, 50)")
    wait_for(env, 50, "\"table\" = 'live_t'")

    dry = prune("--before", "2024-02-15", "--dry-run")
    assert "would drop partition bemi.changes_p20240101 (2024-01-01 .. 2024-02-01, 93 changes)" in dry
    assert "would delete 42 changes before 2024-02-15T00:00:00+00:00 from bemi.changes_p20240201" in dry
    assert env.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'old_t'") == [(273,)]

    for i in range(51, 101):  # the worker keeps writing meanwhile
        env.execute("INSERT INTO live_t VALUES (%s)", [i])
    out = prune("--before", "2024-02-15", "--batch-rows", "10")
    assert "dropped partition bemi.changes_p20240101" in out
    assert "deleted 42 changes before 2024-02-15T00:00:00+00:00 from bemi.changes_p20240201" in out
    assert "removed 135 changes committed before 2024-02-15T00:00:00+00:00" in out
    assert env.execute("SELECT to_regclass('changes_p20240101')") == [(None,)]
    assert env.execute("SELECT min(committed_at) FROM bemi.changes WHERE \"table\" = 'old_t'") == [
        (datetime(2024, 2, 15, tzinfo=UTC),)]
    assert env.execute("SELECT count(*) FROM bemi.changes WHERE \"table\" = 'old_t'") == [(273 - 135,)]
    log = env.execute("SELECT pruned_before, partitions, changes, pruned_by FROM bemi._bemi_pruned")
    assert log == [(datetime(2024, 2, 15, tzinfo=UTC), ["changes_p20240101"], 135, "manage.py bemi_prune")]
    wait_for(env, 100, "\"table\" = 'live_t'")
    assert env.execute("SELECT count(DISTINCT primary_key), count(*) FROM bemi.changes WHERE \"table\" = 'live_t'") == [
        (100, 100)]
    assert worker.poll() is None


def test_prune_the_current_partition_while_the_worker_runs(worker_env):
    env = worker_env
    env.execute("CREATE TABLE live2_t (id int PRIMARY KEY)")
    env.run_once()
    worker = env.spawn("--poll-interval", "0.02")
    env.execute("INSERT INTO live2_t SELECT generate_series(1, 20)")
    wait_for(env, 20)
    current = period_start(datetime.now(UTC), "month")
    out = prune("--before", period_end(current, "month").isoformat())
    assert f"dropped partition bemi.{partition_name(current)}" in out
    assert env.execute("SELECT count(*) FROM bemi.changes") == [(0,)]
    # the current and next partitions are there again; new changes are stored
    assert env.execute("SELECT to_regclass(%s) IS NOT NULL", [partition_name(current)]) == [(True,)]
    env.execute("INSERT INTO live2_t SELECT generate_series(21, 40)")
    wait_for(env, 20)
    assert env.execute("SELECT min(primary_key::int), count(*) FROM bemi.changes") == [(21, 20)]
    assert worker.poll() is None


def test_the_worker_drops_partitions_older_than_its_retention(worker_env, caplog):
    env = worker_env
    env.run_once()
    past(env, "2024-01", 31)
    past(env, "2024-02", 2)
    caplog.set_level("INFO", logger="bemi.worker")
    env.run_once(retention=timedelta(days=30), clock=lambda: datetime(2024, 3, 10, tzinfo=UTC))
    # 2024-03-10 minus 30 days is 9 February: January goes whole; February straddles and stays
    assert "dropped partition bemi.changes_p20240101 (2024-01-01 .. 2024-02-01, 93 changes)" in caplog.text
    assert "retention 30 days, 0:00:00: removed 93 changes committed before 2024-02-01T00:00:00+00:00" in caplog.text
    assert env.execute("SELECT count(*) FROM bemi.changes") == [(6,)]
    assert env.execute("SELECT pruned_before, pruned_by FROM bemi._bemi_pruned") == [
        (datetime(2024, 2, 1, tzinfo=UTC), "bemi-worker --retention")]


def test_time_travel_says_when_history_was_pruned(worker_env):
    env = worker_env
    env.run_once()
    past(env, "2024-01", 31, per_day=1)
    env.execute("""INSERT INTO bemi.changes (database, schema, "table", primary_key, operation, before, after, committed_at,
                                        transaction_id, position, commit_position, change_index)
                   VALUES ('src', 'public', 'old_t', '100', 'UPDATE', '{"id": 100}', '{"id": 100, "v": 1}',
                           '2024-01-20', 1, 1, 999999, 0)""")
    t = lambda day: datetime(2024, 1, day, 12, tzinfo=UTC)  # noqa: E731
    prune("--before", "2024-01-10")
    with pytest.raises(HistoryPrunedError) as caught:
        BemiChange.objects.as_of("old_t", 1500, t(5))
    assert caught.value.pruned_before == datetime(2024, 1, 10, tzinfo=UTC)
    assert "was pruned" in str(caught.value)
    assert BemiChange.objects.as_of("old_t", 1500, t(16)) == {"id": 1500}  # created on 16 January
    assert BemiChange.objects.as_of("old_t", 100, t(25)) == {"id": 100, "v": 1}
    assert BemiChange.objects.as_of("old_t", 100, t(15)) == {"id": 100}  # before its update: its `before`
    with pytest.raises(HistoryPrunedError):  # created on 1 January, its CREATE is gone
        BemiChange.objects.as_of("old_t", 0, t(25))


def test_prune_refuses_an_unpartitioned_table_and_bad_dates(worker_env):
    env = worker_env
    with pytest.raises(CommandError):
        prune("--before", "yesterday")
    env.execute("DROP TABLE IF EXISTS bemi.changes")
    env.execute("CREATE TABLE bemi.changes (id uuid PRIMARY KEY, committed_at timestamptz)")
    with pytest.raises(CommandError, match="bemi_partition"):
        prune("--older-than", "30")


def test_prune_without_a_cutoff_uses_bemi_retention_or_says_what_to_pass(worker_env, settings):
    env = worker_env
    env.run_once()
    past(env, "2024-01", 1, per_day=1)
    with pytest.raises(CommandError) as error:
        prune()
    assert "--before DATE" in str(error.value) and "--older-than DAYS" in str(error.value)
    assert "BEMI_RETENTION" in str(error.value)
    assert env.execute("SELECT count(*) FROM changes") == [(1,)]

    settings.BEMI_RETENTION = 30
    dry = prune("--dry-run")
    assert "would remove 1 change committed before" in dry and "(1 partition would be dropped, 0 rows would" in dry
    out = prune()
    cutoff = env.execute("SELECT pruned_before FROM _bemi_pruned")[0][0]
    assert abs((datetime.now(UTC) - timedelta(days=30) - cutoff).total_seconds()) < 600
    assert f"removed 1 change committed before {cutoff.isoformat()} (1 partition dropped, 0 rows deleted" in out
    assert env.execute("SELECT count(*) FROM changes") == [(0,)]
    settings.BEMI_RETENTION = "soon"
    with pytest.raises(CommandError, match="BEMI_RETENTION"):
        prune()
