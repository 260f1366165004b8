"""What stops the worker (no connection of its own).

The source, the sink and the loop all raise ``WorkerError``; it lives here so
that the sink does not import the source.
"""

from __future__ import annotations

__all__ = ["WorkerError", "Blocked"]


class WorkerError(RuntimeError):
    """A condition the operator must fix; the worker exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Blocked(WorkerError):
    """What another role did keeps the worker from its tables (a schema ``bemi`` it made first).

    Never an exit for a running worker: nothing another role does may stop it. It says so at each
    attempt, shows it in ``bemi_worker_blocked`` and ``/healthz``, and goes on once an operator has
    fixed it (``--once`` exits with status 2: it was asked for one pass)."""
