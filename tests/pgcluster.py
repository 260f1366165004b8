"""A private, throwaway PostgreSQL cluster with ``wal_level = logical``.

Used by the test suite, the benchmarks and the demo so that none of them
depends on (or disturbs) a PostgreSQL service already running on the machine.
Standard library only: it must work before the project is installed.

PostgreSQL refuses to run as root, so when we are root the server runs as the
``postgres`` user (or ``BEMI_PG_OS_USER``) through ``runuser``.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

__all__ = ["Cluster", "find_bindir", "free_port"]

SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "128MB",
    "log_min_messages": "warning",
    "listen_addresses": "'127.0.0.1'",
    "timezone": "'UTC'",
}


def find_bindir() -> str:
    """Directory holding ``initdb``/``pg_ctl`` of the newest PostgreSQL >= 14."""
    explicit = os.environ.get("BEMI_PG_BINDIR")
    if explicit:
        return explicit
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
    )
    for path in reversed(candidates):
        version = path.split("/")[-2]
        if version.isdigit() and int(version) >= 14 and os.path.exists(os.path.join(path, "initdb")):
            return path
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise RuntimeError(
        "No PostgreSQL >= 14 server binaries found. Install them "
        "(Debian: apt-get install postgresql) or set BEMI_PG_BINDIR."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """One PostgreSQL cluster in its own folder, on its own port."""

    datadir: str = ""
    port: int = 0
    user: str = "postgres"
    bindir: str = field(default_factory=find_bindir)
    settings: dict[str, str] = field(default_factory=dict)
    _owns_dir: bool = False

    def __post_init__(self) -> None:
        if not self.datadir:
            self.datadir = tempfile.mkdtemp(prefix="bemi-pg-")
            self._owns_dir = True
        if not self.port:
            self.port = free_port()

    # -- running commands as the right OS user ---------------------------------
    @property
    def os_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        return os.environ.get("BEMI_PG_OS_USER", "postgres")

    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        if self.os_user:
            args = ["runuser", "-u", self.os_user, "--", *args]
        return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)

    def _chown(self, path: str) -> None:
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # -- lifecycle ---------------------------------------------------------------
    @property
    def pgdata(self) -> str:
        return os.path.join(self.datadir, "data")

    @property
    def initialized(self) -> bool:
        return os.path.exists(os.path.join(self.pgdata, "PG_VERSION"))

    def init(self) -> None:
        os.makedirs(self.datadir, exist_ok=True)
        self._chown(self.datadir)
        self._run([
            os.path.join(self.bindir, "initdb"), "-D", self.pgdata, "-U", self.user,
            "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
        ])
        conf = {**SERVER_SETTINGS, **self.settings, "port": str(self.port),
                "unix_socket_directories": f"'{self.datadir}'"}
        with open(os.path.join(self.pgdata, "postgresql.auto.conf"), "a") as fh:
            for key, value in conf.items():
                fh.write(f"{key} = {value}\n")

    def set_port(self, port: int) -> None:
        """Change the port of an existing (stopped) cluster."""
        self.port = port
        with open(os.path.join(self.pgdata, "postgresql.auto.conf"), "a") as fh:
            fh.write(f"port = {port}\n")

    def start(self) -> "Cluster":
        if not self.initialized:
            self.init()
        log = os.path.join(self.datadir, "server.log")
        if not os.path.exists(log):
            open(log, "w").close()
            self._chown(log)
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.pgdata, "-l", log,
                   "-w", "-t", "60", "start"])
        return self

    def stop(self, mode: str = "fast") -> None:
        if os.path.exists(os.path.join(self.pgdata, "postmaster.pid")):
            try:
                self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.pgdata, "-m", mode,
                           "-w", "-t", "60", "stop"])
            except subprocess.CalledProcessError:
                pass

    def destroy(self) -> None:
        self.stop("immediate")
        if self._owns_dir:
            shutil.rmtree(self.datadir, ignore_errors=True)

    def start_throwaway(self) -> "Cluster":
        """Start and make sure the cluster is stopped and removed at exit."""
        atexit.register(self.destroy)
        return self.start()

    # -- connecting ----------------------------------------------------------------
    host = "127.0.0.1"

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        return f"host={self.host} port={self.port} dbname={dbname} user={user or self.user}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        out = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", dbname, "-c", sql],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.psql("SELECT 1")
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@dataclass
class Server:
    """Where an already running cluster listens (shared with subprocesses)."""

    host: str
    port: int
    user: str = "postgres"

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        return f"host={self.host} port={self.port} dbname={dbname} user={user or self.user}"


_test_cluster: "Server | None" = None


def ensure_test_cluster() -> Server:
    """The cluster of this test run: started once, stopped and removed at exit.

    The first process that asks starts it and exports ``BEMI_TEST_PGHOST``,
    ``BEMI_TEST_PGPORT`` and ``BEMI_TEST_PGUSER`` so that subprocesses
    (workers, ``manage.py``) talk to the same server instead of starting their own.
    """
    global _test_cluster
    if _test_cluster is None:
        port = os.environ.get("BEMI_TEST_PGPORT")
        if port:
            _test_cluster = Server(
                os.environ.get("BEMI_TEST_PGHOST", "127.0.0.1"), int(port),
                os.environ.get("BEMI_TEST_PGUSER", "postgres"),
            )
        else:
            cluster = Cluster().start_throwaway()
            os.environ["BEMI_TEST_PGHOST"] = cluster.host
            os.environ["BEMI_TEST_PGPORT"] = str(cluster.port)
            os.environ["BEMI_TEST_PGUSER"] = cluster.user
            os.environ["BEMI_TEST_PGBINDIR"] = cluster.bindir
            _test_cluster = Server(cluster.host, cluster.port, cluster.user)
    return _test_cluster
