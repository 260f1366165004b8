"""A worker or an ingester as a process: its metrics served, SIGINT/SIGTERM handled, errors as exit codes (I/O).

One scaffolding for the direct worker (runner.py) and the NATS ingesters
(ingest.py): the first SIGINT/SIGTERM asks the process to stop after the batch
in hand, a second one aborts at once (what was not committed is read or
delivered again: nothing is lost); a ``WorkerError`` exits with its code, a
database or NATS error with 1.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Protocol

import psycopg

from bemi.worker.errors import WorkerError

__all__ = ["Stoppable", "run_process"]

log = logging.getLogger("bemi.worker")


class Stoppable(Protocol):
    stopping: threading.Event
    stats: Any  # a WorkerStats, for /metrics

    def run(self) -> int: ...

    def stop(self) -> None: ...


def run_process(target: Stoppable, metrics_host: str, metrics_port: int | None, stopped: Callable[[], str],
                aborted: str) -> int:
    """``target.run()`` with signal handling and ``/metrics``; ``stopped()``: the line logged at a clean
    end; ``aborted``: the warning at a second signal."""

    def on_signal(signum: int, frame: Any) -> None:
        if target.stopping.is_set():
            raise KeyboardInterrupt
        log.info("received %s: finishing the batch in hand, then exiting", signal.Signals(signum).name)
        target.stop()

    metrics = None
    if metrics_port is not None:
        from bemi.worker.metrics import MetricsServer, MetricsUnavailable

        try:
            metrics = MetricsServer(target.stats, metrics_host, metrics_port).start()
        except MetricsUnavailable as exc:
            log.error("%s", exc)
            return 2
        except OSError as exc:
            log.error("cannot serve metrics on %s:%s: %s", metrics_host, metrics_port, exc)
            return 2

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals can only be handled there
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = target.run()
        log.info("%s", stopped())
        return code
    except WorkerError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.warning("%s", aborted)
        return 130
    except psycopg.Error as exc:
        log.error("database error: %s", exc)
        return 1
    except OSError as exc:  # NATS (JetStreamFault) or the network, before the first start
        log.error("%s", exc)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics is not None:
            metrics.stop()
