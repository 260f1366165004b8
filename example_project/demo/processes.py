"""The app and the worker as background processes that end when the demo ends.

Each runs in its own session (Ctrl-C reaches only the demo, which then stops
them in order) and, on Linux, gets SIGTERM if the demo itself dies.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from example_project.demo import DemoError


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Background:
    """One long-running command whose output goes to a log file."""

    def __init__(self, name: str, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self, hint: str = "") -> None:
        if not self.alive:
            raise DemoError(f"the {self.name} exited (status {self.proc.returncode}); the end of {self.log}:\n"
                            f"{self.tail()}", hint or f"Read {self.log}.")

    def tail(self) -> str:
        try:
            return last_lines(self.log.read_text(errors="replace"))
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the worker finishes its batch and exits), SIGKILL if it takes too long."""
        if not self.alive:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_ERROR = re.compile(r"^[\w.]+(Error|Exception|Improperly\w+|Misconfigured)\b.*")


def last_lines(output: str, count: int = 20) -> str:
    """The end of a command's output, after the exception lines above it (a traceback's cause
    comes first when another exception was raised while handling it)."""
    lines = output.rstrip().splitlines()
    causes = [line for line in lines[:-count] if _ERROR.match(line)]
    return "\n".join([*causes[-3:], *(["..."] if causes else []), *lines[-count:]])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_http(app: Background, port: int, timeout: float = 30.0) -> None:
    """Until ``GET /`` answers (or the app died, or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while True:
        app.check_alive()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise DemoError(f"the app did not answer on 127.0.0.1:{port} within {timeout:.0f} s",
                                f"Read {app.log}.") from None
            time.sleep(0.2)


def python_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment plus ``extra``, with unbuffered output for the log files."""
    return {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
