"""``--metrics-port``: Prometheus text at ``/metrics`` and a health probe at ``/healthz``.

Everything is read from the worker's ``WorkerStats`` (bemi/worker/stats.py) at
scrape time, in the server's own thread: serving never touches the database
nor slows the loop. Needs the optional ``prometheus_client`` package
(``pip install prometheus_client``, the ``metrics`` extra); without it the worker refuses the
flag and says so.

``/healthz`` answers 200 while the worker streams (set up, reading the slot)
and 503 otherwise (starting, stopping, stopped): use it for a Kubernetes
liveness or readiness probe. See docs/operations.md for the metric list and
alert rules.
"""

from __future__ import annotations

import logging
import socket
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bemi.worker.stats import WorkerStats

__all__ = ["MetricsServer", "MetricsUnavailable", "lag", "lag_seconds", "require_prometheus_client", "INSTALL_HINT"]

log = logging.getLogger("bemi.worker")

INSTALL_HINT = "pip install prometheus_client (from a checkout of bemi: pip install '.[metrics]')"


class MetricsUnavailable(RuntimeError):
    pass


def require_prometheus_client() -> None:
    """Raise MetricsUnavailable, saying what to install, when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MetricsUnavailable(f"--metrics-port needs the prometheus_client package: {INSTALL_HINT}") from exc


def lag(stats: WorkerStats, now: datetime | None = None) -> tuple[int, float]:
    """(bytes, seconds) the worker is behind; (0, 0.0) when caught up.

    Handled so far: up to the last stored source transaction (``last_commit_lsn``), or the last
    keepalive that found the worker with nothing pending (``caught_up_lsn``), whichever is later.
    The bytes are the server's WAL after that; the seconds, while there are any, the time since
    that commit (its commit time) or that keepalive (when it came).
    """
    handled = max(stats.last_commit_lsn, stats.caught_up_lsn)
    if not stats.server_wal_end or not handled:
        return 0, 0.0
    behind = max(stats.server_wal_end - handled, 0)
    since = stats.caught_up_at if stats.caught_up_lsn > stats.last_commit_lsn else stats.last_commit_time
    if not behind or since is None:
        return behind, 0.0
    now = now or datetime.now(timezone.utc)
    return behind, max((now - since).total_seconds(), 0.0)


def lag_seconds(stats: WorkerStats, now: datetime | None = None) -> float:
    return lag(stats, now)[1]


class _StatsCollector:
    """A prometheus_client collector over one WorkerStats."""

    def __init__(self, stats: WorkerStats) -> None:
        self.stats = stats

    def describe(self) -> list:
        return []  # collected on demand: no description pass at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.stats
        for _ in range(3):  # the loop may add a key while we copy: try again
            try:
                written = dict(s.written)
                break
            except RuntimeError:  # pragma: no cover - needs an unlucky thread switch
                continue
        else:  # pragma: no cover
            written = {}
        changes = CounterMetricFamily("bemi_changes_written", "Changes stored in the changes table",
                                      labels=["table", "operation"])
        for (table, operation), count in sorted(written.items()):
            changes.add_metric([table, operation], count)
        yield changes
        yield CounterMetricFamily("bemi_dead_letters", "Changes the destination rejected, stored in "
                                  "_bemi_worker_failures instead", value=s.dead_letters)
        yield CounterMetricFamily("bemi_dropped_contexts", "_bemi context messages ignored as invalid or too "
                                  "large (their changes are stored with {})", value=s.dropped_contexts)
        yield CounterMetricFamily("bemi_skipped_messages", "Logical messages too malformed to read, skipped",
                                  value=s.skipped_messages)
        yield CounterMetricFamily("bemi_values_as_text", "Values their type's format could not read, stored as "
                                  "their text instead", value=s.values_as_text)
        yield CounterMetricFamily("bemi_reconnects", "Reconnections after a lost source or destination connection",
                                  value=s.reconnects)
        behind, seconds = lag(s)
        yield GaugeMetricFamily("bemi_replication_lag_bytes", "WAL the server has after the last handled "
                                "source transaction or keepalive (0 when caught up)", value=behind)
        yield GaugeMetricFamily("bemi_replication_lag_seconds", "Seconds since the worker was last caught up "
                                "(the commit time of the last stored transaction, or the last keepalive with "
                                "nothing pending), while WAL waits; 0 when caught up", value=seconds)
        yield GaugeMetricFamily("bemi_slot_retained_wal_bytes", "WAL the replication slot retains "
                                "(pg_current_wal_lsn() - restart_lsn)", value=s.slot_retained_wal_bytes)
        yield GaugeMetricFamily("bemi_worker_streaming", "1 while the worker reads the slot, else 0",
                                value=1 if s.streaming else 0)
        yield GaugeMetricFamily("bemi_worker_blocked", "1 while the worker waits for an operator to fix what "
                                "another role made under bemi's names (its log says what to run), else 0",
                                value=1 if s.blocked else 0)
        if s.mode == "reader":
            yield CounterMetricFamily("bemi_nats_published", "Changes NATS JetStream acknowledged as stored",
                                      value=s.nats_published)
            yield CounterMetricFamily("bemi_nats_publish_duplicates", "Changes published again that JetStream "
                                      "dropped as duplicates of a message id (after a restart)",
                                      value=s.nats_publish_duplicates)
        elif s.mode == "ingest":
            yield CounterMetricFamily("bemi_nats_ingest_duplicates", "Changes delivered again that were already "
                                      "stored (skipped)", value=s.nats_ingest_duplicates)
            yield GaugeMetricFamily("bemi_nats_consumer_pending", "Messages of the stream the ingesters' consumer "
                                    "has not delivered yet", value=s.nats_consumer_pending)
            yield GaugeMetricFamily("bemi_nats_consumer_ack_pending", "Messages delivered to an ingester and not "
                                    "acknowledged yet", value=s.nats_consumer_ack_pending)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """An HTTP server in a daemon thread: /metrics (Prometheus text) and /healthz."""

    def __init__(self, stats: WorkerStats, host: str = "127.0.0.1", port: int = 0) -> None:
        require_prometheus_client()
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.stats = stats
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatsCollector(stats))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds... (Linux)
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        self._server = server_class((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    if server.stats.streaming:
                        self._send(200, b"ok: streaming\n")
                    elif server.stats.blocked:
                        self._send(503, f"blocked: {server.stats.blocked}\n".encode())
                    else:
                        self._send(503, b"not streaming\n")
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n")

            def do_HEAD(self) -> None:  # noqa: N802
                self.do_GET()

            def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
                log.debug("metrics: %s - %s", self.address_string(), format % args)

        return Handler

    def start(self) -> "MetricsServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="bemi-metrics", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("serving metrics on http://%s:%d/metrics (health: /healthz)", host, port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
