"""The steps of ``./scripts/demo``, in order, each saying what it does.

    ./scripts/demo [--no-serve] [--port 8000]

Everything it starts (PostgreSQL, the app, the worker) stops when it ends:
after printing with ``--no-serve`` or without a terminal, else on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from example_project.demo import DemoError, note, postgres, scenario, step, table
from example_project.demo.processes import Background, last_lines, port_is_free, python_env, wait_for_http

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "example_project"
STATE = Path(os.environ.get("BEMI_DEMO_DIR") or REPO / ".demo")
USER, PASSWORD = "demo", "demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./scripts/demo", description=(
        "Start a private PostgreSQL, the example Todo app and the bemi worker; drive the Bemi "
        "documentation's scenario through HTTP; print the changes table; keep serving until Ctrl-C."))
    parser.add_argument("--no-serve", action="store_true",
                        help="exit after printing the table (the default when stdin is not a terminal)")
    parser.add_argument("--port", type=int, default=8000, help="port of the app on 127.0.0.1 (default: 8000)")
    return parser.parse_args(argv)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class Demo:
    def __init__(self, port: int) -> None:
        self.port = port
        self.cluster = None
        self.processes: list[Background] = []
        self.env: dict[str, str] = {}

    def run(self, serve: bool) -> None:
        started = time.monotonic()
        if not port_is_free(self.port):
            raise DemoError(f"port {self.port} on 127.0.0.1 is taken, the app cannot listen there",
                            f"Stop the program using it (ss -ltnp 'sport = :{self.port}' shows it), "
                            f"or choose another port: ./scripts/demo --port {self.port + 1}")
        STATE.mkdir(parents=True, exist_ok=True)
        bindir = postgres.server_bindir()
        self.cluster = postgres.start_cluster(STATE / "pg", bindir)
        postgres.reset_database(self.cluster)
        self.env = python_env(postgres.env(self.cluster))

        step("Running the migrations: manage.py migrate, then manage.py migrate bemi")
        self.manage("migrate", "--noinput")
        self.manage("migrate", "bemi", "--noinput")
        step(f"Creating the user {USER!r} (password {PASSWORD!r}) that the requests log in as")
        self.manage("demo_user", USER, PASSWORD)

        app = self.start("app", ["runserver", "--noreload", f"127.0.0.1:{self.port}"],
                         f"manage.py runserver on http://127.0.0.1:{self.port}")
        wait_for_http(app, self.port)
        client = scenario.Client(self.port)
        # Before the worker's slot exists: the login's UPDATE of auth_user.last_login
        # is not part of the scenario, so it stays out of the printed table.
        step(f"Logging in as {USER!r}")
        client.log_in(USER, PASSWORD)

        worker = self.start("worker", ["bemi_worker"], "manage.py bemi_worker")
        self.wait("the worker to create its replication slot", lambda: postgres.slot_ready(self.cluster), worker)

        step("Driving the scenario through HTTP requests to the app:")
        ids = scenario.run(client)
        expected = scenario.EXPECTED_CHANGES
        step(f"Waiting for the worker to write the {expected} changes")
        self.wait(f"{expected} rows in the changes table",
                  lambda: postgres.count_changes(self.cluster, "todo") >= expected, worker)

        uri = f"postgres://{self.cluster.user}@{self.cluster.host}:{self.cluster.port}/{postgres.DB_NAME}"
        step("The changes table:")
        print(f"$ {table.command_line(uri)}\n", flush=True)
        print(table.changes_table(uri, bindir), end="", flush=True)
        note(f"(printed {time.monotonic() - started:.0f} s after the start)")
        step("Each todo's history page lists its changes with who made them:")
        scenario.show_history(client, ids)
        if not serve:
            return
        step(f"The app and the worker keep running: open http://127.0.0.1:{self.port}/ "
             f"(log in as {USER}/{PASSWORD}); the history of Sleep is at "
             f"http://127.0.0.1:{self.port}/todos/{ids['Sleep']}/ . Press Ctrl-C to stop.")
        while True:
            for process in self.processes:
                process.check_alive()
            time.sleep(0.5)

    def manage(self, *args: str) -> None:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=EXAMPLE, env=self.env,
                              capture_output=True, text=True)
        if done.returncode:
            raise DemoError(f"manage.py {' '.join(args)} failed:\n{last_lines(done.stdout + done.stderr)}",
                            "Fix the error above and run ./scripts/demo again.")

    def start(self, name: str, args: list[str], label: str) -> Background:
        log = STATE / f"{name}.log"
        step(f"Starting the {name}: {label} (log: {_rel(log)})")
        process = Background(name, [sys.executable, "manage.py", *args], EXAMPLE, self.env, log)
        self.processes.append(process)
        return process

    def wait(self, what: str, done, process: Background, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            process.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"gave up waiting {timeout:.0f} s for {what}; the end of {_rel(process.log)}:\n"
                                f"{process.tail()}", f"Read {_rel(process.log)}.")
            time.sleep(0.2)

    def stop(self) -> None:
        if not self.processes and self.cluster is None:
            return
        step("Stopping the app, the worker and PostgreSQL")
        for process in self.processes:  # the app first: no new changes while the worker finishes
            process.stop()
        if self.cluster is not None:
            self.cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    serve = not args.no_serve and sys.stdin.isatty()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)
    demo = Demo(args.port)
    try:
        demo.run(serve)
        return 0
    except KeyboardInterrupt:
        print(flush=True)
        return 0 if serve else 130
    except DemoError as exc:
        print(f"\nerror: {exc.what}", file=sys.stderr)
        if exc.hint:
            print(f"what to do: {exc.hint}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        demo.stop()
