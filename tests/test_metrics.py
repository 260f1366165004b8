"""`--metrics-port`: Prometheus text at /metrics and /healthz, from a running worker process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from bemi.worker.metrics import MetricsServer
from bemi.worker.stats import WorkerStats
from bemi_devtools.pgcluster import free_port
from tests.test_worker_process import wait_for
from tests.workerapp.harness import ROOT

SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            out[match[1] + (match[2] or "")] = float(match[3])
    return out


def written(port: int, table: str, operation: str) -> float:
    page = samples(get(f"http://127.0.0.1:{port}/metrics")[2])
    return page.get(f'bemi_changes_written_total{{operation="{operation}",table="{table}"}}', 0.0)


def test_metrics_and_healthz_from_a_running_worker(worker_env):
    env = worker_env
    env.execute("CREATE TABLE mt_a (id int PRIMARY KEY, v text)")
    env.run_once()
    port = free_port()
    proc = env.spawn("--poll-interval", "0.05", "--metrics-port", str(port))
    assert wait_for(lambda: _status_code(port) == 200), proc.stderr and proc.poll()

    code, content_type, text = get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200 and content_type.startswith("text/plain")
    page = samples(text)
    for name in ("bemi_replication_lag_bytes", "bemi_replication_lag_seconds", "bemi_slot_retained_wal_bytes",
                 "bemi_dead_letters_total", "bemi_reconnects_total", "bemi_worker_streaming"):
        assert name in page, name
    assert "# TYPE bemi_changes_written_total counter" in text
    assert page["bemi_worker_streaming"] == 1.0
    assert written(port, "mt_a", "CREATE") == 0

    # The counter moves as changes are stored.
    env.execute("INSERT INTO mt_a SELECT g, 'x' FROM generate_series(1, 30) g")
    assert wait_for(lambda: written(port, "mt_a", "CREATE") == 30)
    env.execute("UPDATE mt_a SET v = 'y' WHERE id <= 4; DELETE FROM mt_a WHERE id = 30")
    assert wait_for(lambda: written(port, "mt_a", "UPDATE") == 4 and written(port, "mt_a", "DELETE") == 1)
    stored = env.execute("SELECT operation, count(*) FROM bemi.changes WHERE \"table\" = 'mt_a' GROUP BY 1")
    assert dict(stored) == {"CREATE": 30, "UPDATE": 4, "DELETE": 1}

    page = samples(get(f"http://127.0.0.1:{port}/metrics")[2])
    retained = env.execute("SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots "
                           "WHERE slot_name = %s", [env.slot])[0][0]
    assert 0 < page["bemi_slot_retained_wal_bytes"] <= retained
    assert page["bemi_replication_lag_bytes"] >= 0
    # Idle now: caught up, so the lag stays near 0 (not the age of the last stored commit).
    time.sleep(2.5)
    page = samples(get(f"http://127.0.0.1:{port}/metrics")[2])
    assert page["bemi_replication_lag_seconds"] < 2, page
    assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404

    # bemi-worker status sees the same worker.
    status = subprocess.run([sys.executable, "-m", "bemi.cli", "status", "--dsn", env.dsn, "--slot", env.slot,
                             "--publication", env.publication, "--json"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert json.loads(status.stdout)["worker_running"] is True

    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"serving metrics on http://127.0.0.1:{port}/metrics" in stderr
    assert _status_code(port) is None  # the server stopped with the worker


def _status_code(port: int) -> int | None:
    try:
        return get(f"http://127.0.0.1:{port}/healthz")[0]
    except OSError:
        return None


def test_healthz_is_503_unless_streaming():
    stats = WorkerStats()
    server = MetricsServer(stats, "127.0.0.1", 0).start()
    try:
        port = server.address[1]
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 503
        stats.streaming = True
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        stats.written[("t", "CREATE")] += 3
        assert samples(get(f"http://127.0.0.1:{port}/metrics")[2])[
            'bemi_changes_written_total{operation="CREATE",table="t"}'] == 3
        stats.streaming = False
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 503
    finally:
        server.stop()


def test_manage_py_bemi_worker_serves_metrics(worker_env):
    env = worker_env
    port = free_port()
    environ = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
               "BEMI_TEST_DB_NAME": env.execute("SELECT current_database()")[0][0]}
    proc = subprocess.Popen([sys.executable, "-m", "django", "bemi_worker", "--slot", env.slot, "--publication",
                             env.publication, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
                            env=environ, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    env.processes.append(proc)
    assert wait_for(lambda: _status_code(port) == 200, timeout=60)
    assert "bemi_changes_written_total" in get(f"http://127.0.0.1:{port}/metrics")[2]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr


@pytest.mark.parametrize("entry", ["cli", "manage.py"])
def test_metrics_flag_without_prometheus_client_says_what_to_install(entry):
    # The worker runs with prometheus_client made unimportable; it refuses before connecting anywhere.
    if entry == "cli":
        call = "from bemi.cli import main; sys.exit(main(['--dsn', 'host=127.0.0.1 port=1', '--metrics-port', '0']))"
    else:
        call = ("import django; os.environ['DJANGO_SETTINGS_MODULE'] = 'tests.settings'; django.setup(); "
                "from django.core.management import execute_from_command_line; "
                "execute_from_command_line(['manage.py', 'bemi_worker', '--metrics-port', '0'])")
    code = f"import os, sys; sys.modules['prometheus_client'] = None; {call}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "--metrics-port needs the prometheus_client package" in result.stderr
    # a command that works as written anywhere (the distribution is not on the package index)
    assert "pip install prometheus_client" in result.stderr and "bemi-django-selfhosted[" not in result.stderr
