"""What stops the worker (no connection of its own).

The source, the sink and the loop all raise ``WorkerError``; it lives here so
that the sink does not import the source.
"""

from __future__ import annotations

__all__ = ["WorkerError"]


class WorkerError(RuntimeError):
    """A condition the operator must fix; the worker exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
