"""Running the worker in tests: in-process for speed, as a subprocess where it matters.

``worker_env`` gives each test its own slot and publication on the test
database, and removes them (and the rows of ``changes``) afterwards, since a
leftover slot would keep the test database from being dropped.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from bemi.worker.runner import Config, Worker
from tests.db import db_dsn

_counter = itertools.count()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerEnv:
    def __init__(self, dsn: str) -> None:
        n = next(_counter)
        self.dsn = dsn
        self.slot = f"bemi_t{os.getpid()}_{n}"
        self.publication = self.slot
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("SET TimeZone = 'UTC'")
        # The tests' own convenience: partitions of bemi.changes by their bare names (bemi's code qualifies
        # every name and pins its own search_path; tables the tests create still go to public).
        self.conn.execute("SET search_path = public, bemi")
        self.processes: list[subprocess.Popen] = []
        # leave the database as we found it: drop the tables the worker created
        self.preexisting = {name for name in ("changes", "_bemi_worker_checkpoints", "_bemi_pruned",
                                                 "_bemi_chain_cuts")
                            if self.execute("SELECT to_regclass(%s)", [f"bemi.{name}"])[0][0]}

    # -- the source database --------------------------------------------------------------
    def execute(self, query: str, params: Any = None) -> list[tuple]:
        cur = self.conn.execute(query, params)
        return cur.fetchall() if cur.description else []

    def context(self, **ctx: Any) -> str:
        """SQL that emits a _bemi context message, to prepend to a statement."""
        text = json.dumps(ctx).replace("'", "''")
        return f"SELECT pg_logical_emit_message(true, '_bemi', '{text}');"

    # -- running the worker ---------------------------------------------------------------
    def config(self, **overrides: Any) -> Config:
        return Config(source_dsn=self.dsn, slot=self.slot, publication=self.publication, once=True, **overrides)

    def run_once(self, **overrides: Any) -> Worker:
        worker = Worker(self.config(**overrides))
        assert worker.run() == 0
        return worker

    def cli_args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "bemi.cli", "--dsn", self.dsn, "--slot", self.slot,
                "--publication", self.publication, *args]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.cli_args(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def spawn(self, *args: str, **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(self.cli_args(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, **kwargs)
        self.processes.append(proc)
        return proc

    # -- reading the result ---------------------------------------------------------------
    def changes(self, where: str = "TRUE", params: Any = None) -> list[dict]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(f"SELECT * FROM bemi.changes WHERE {where} ORDER BY commit_position, change_index", params)
            return cur.fetchall()

    def slot_state(self) -> dict | None:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT * FROM pg_replication_slots WHERE slot_name = %s", [self.slot])
            return cur.fetchone()

    def cleanup(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        deadline = time.monotonic() + 30
        while self.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", [self.slot]):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                     [self.slot])
        self.execute(f'DROP PUBLICATION IF EXISTS "{self.publication}"')
        for name in ("changes", "_bemi_worker_checkpoints", "_bemi_pruned", "_bemi_chain_cuts"):
            if name not in self.preexisting:
                self.execute(f"DROP TABLE IF EXISTS bemi.{name}")
        if self.execute("SELECT to_regclass('bemi.changes')")[0][0]:
            self.execute("TRUNCATE bemi.changes")
        if self.execute("SELECT to_regclass('bemi._bemi_chain_cuts')")[0][0]:
            self.execute("TRUNCATE bemi._bemi_chain_cuts")
        if self.execute("SELECT to_regclass('bemi._bemi_worker_checkpoints')")[0][0]:
            self.execute("DELETE FROM bemi._bemi_worker_checkpoints WHERE slot = %s", [self.slot])
        self.conn.close()


@pytest.fixture
def worker_env(transactional_db):
    env = WorkerEnv(db_dsn())
    try:
        yield env
    finally:
        env.cleanup()
