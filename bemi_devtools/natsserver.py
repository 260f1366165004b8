"""A private ``nats-server`` with JetStream for tests and benchmarks (as pgcluster.py is for PostgreSQL).

Never the system's server (it may run on 4222 for someone else): a free port, a
temporary store directory, stopped and removed afterwards. ``restart()`` keeps
the port and the store, as a real server restart does (the kill tests use it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from bemi_devtools.pgcluster import free_port

__all__ = ["NatsServer", "find_nats_server"]

_CANDIDATES = ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server")


def find_nats_server() -> str | None:
    """The nats-server binary ($BEMI_NATS_SERVER, PATH, Debian's place), or None."""
    given = os.environ.get("BEMI_NATS_SERVER")
    if given:
        return given if os.access(given, os.X_OK) else None
    found = shutil.which("nats-server")
    if found:
        return found
    return next((p for p in _CANDIDATES if os.access(p, os.X_OK)), None)


class NatsServer:
    def __init__(self, binary: str | None = None) -> None:
        binary = binary or find_nats_server()
        if binary is None:
            raise FileNotFoundError("nats-server is not installed (Debian: apt-get install nats-server)")
        self.binary = binary
        self.port = free_port()
        self.store = tempfile.mkdtemp(prefix="bemi-nats-")
        self.log_path = os.path.join(self.store, "server.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "NatsServer":
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", os.path.join(self.store, "js"),
                 "--http_port", "0"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the server answers a PING with PONG (JetStream is up by then: it starts before the listener)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited ({self.proc.returncode}): {self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.recv(4096)  # INFO
                    s.sendall(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
                    if b"PONG" in s.recv(4096):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not answer on port {self.port}: {self.tail()}")
            time.sleep(0.05)

    def tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, kill: bool = False, down: float = 0.0) -> None:
        """Stop (SIGKILL with ``kill``), stay down ``down`` seconds, start again on the same port and store."""
        self.stop(kill=kill)
        time.sleep(down)
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)
