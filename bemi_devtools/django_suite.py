"""Django's own test suite, without and with bemi: which tests differ?

    ./scripts/django-suite [LABEL ...] [--parallel 2] [--only plain|bemi] [--keep]

Downloads the sdist of the installed Django version (``pip download``, kept in
``~/.cache/bemi-django-suite``), starts a private PostgreSQL
(``bemi_devtools.pgcluster``), and runs Django's ``tests/runtests.py`` with
the chosen labels twice:

  plain  Django alone;
  bemi   bemi activated as a project activates it: ``bemi`` in INSTALLED_APPS
         (so its hook is on every connection and ``migrate`` installs its SQL
         in each test database), its SQL (tracking.sql, install.sql: row
         triggers, event triggers) already in template1, which the test
         databases are created from, and a context set for every test.

Each run records every test's outcome (this module is the runs' TEST_RUNNER);
the report lists every test whose outcome differs, the counts and the wall
time of each run. Exit status 1 when a test fails only with bemi.

Why ``__main__.ALWAYS_INSTALLED_APPS``: ``runtests.py`` replaces the settings'
INSTALLED_APPS by that list of its own (then appends the labels' apps), so the
bemi run's settings module appends ``bemi`` to it; that is what
``INSTALLED_APPS = [..., "bemi"]`` does in a project.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest

from django.test.runner import DiscoverRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("BEMI_DJANGO_SUITE_CACHE", os.path.expanduser("~/.cache/bemi-django-suite"))

# What the wrapper and the event triggers can change: the backend, transactions,
# the query log, writes of every kind, DDL and migrations, test-case machinery.
DEFAULT_LABELS = [
    "backends", "transactions", "transaction_hooks", "queries", "basic", "model_fields", "bulk_create",
    "migrations", "schema", "expressions", "aggregation", "update", "delete", "select_for_update",
    "test_utils", "get_or_create", "save_delete_hooks", "force_insert_update", "custom_pk",
    "db_functions", "raw_query", "many_to_many", "one_to_one", "update_only_fields",
]
VARIANTS = ("plain", "bemi")
RESULTS_ENV = "BEMI_DJANGO_SUITE_RESULTS"
CONTEXT = {"suite": "django", "user_id": 1}


# -- inside each run: the test runner that records outcomes ----------------------


class _RecordingResult(unittest.TextTestResult):
    """Django's text result, also keeping each test's outcome (the parallel runner replays workers' events here)."""

    outcomes: dict[str, str] = {}

    def _keep(self, test: unittest.TestCase, outcome: str) -> None:
        key = test.id()
        if self.outcomes.get(key) in ("failure", "error"):
            return  # a failed subtest stays failed
        self.outcomes[key] = outcome

    def addSuccess(self, test):  # noqa: N802 (unittest's names)
        super().addSuccess(test)
        self._keep(test, "ok")

    def addFailure(self, test, err):  # noqa: N802
        super().addFailure(test, err)
        self._keep(test, "failure")

    def addError(self, test, err):  # noqa: N802
        super().addError(test, err)
        self._keep(test, "error")

    def addSkip(self, test, reason):  # noqa: N802
        super().addSkip(test, reason)
        self._keep(test, "skipped")

    def addExpectedFailure(self, test, err):  # noqa: N802
        super().addExpectedFailure(test, err)
        self._keep(test, "expected failure")

    def addUnexpectedSuccess(self, test):  # noqa: N802
        super().addUnexpectedSuccess(test)
        self._keep(test, "unexpected success")

    def addSubTest(self, test, subtest, err):  # noqa: N802
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self.outcomes[test.id()] = "failure" if failed else "error"


def bemi_context() -> dict:
    import bemi

    return bemi.get_context()


class RecordingRunner(DiscoverRunner):
    """Django's runner; writes ``{test id: outcome}`` to $BEMI_DJANGO_SUITE_RESULTS, sets bemi's context."""

    def get_resultclass(self):
        return _RecordingResult

    def setup_test_environment(self, **kwargs):
        super().setup_test_environment(**kwargs)
        if os.environ.get("BEMI_DJANGO_SUITE_VARIANT") == "bemi":
            import bemi  # only in the bemi run: the plain one must not import it

            bemi.set_context(dict(CONTEXT))  # inherited by the parallel workers (fork)

    def setup_databases(self, **kwargs):
        config = super().setup_databases(**kwargs)
        if os.environ.get("BEMI_DJANGO_SUITE_VARIANT") == "bemi":  # say that bemi is really active
            from django.db import connection

            from bemi import wrapper

            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE '\\_bemi%%'")
                (triggers,) = cursor.fetchone()
                hooked = isinstance(cursor.cursor, getattr(wrapper, "BemiCursor", ()))
            print(f"bemi: hook on the connection: {hooked}; execute_wrappers: {connection.execute_wrappers}; "
                  f"event triggers in the test database: {triggers}; context: {bemi_context()}", file=sys.stderr)
        return config

    def run_suite(self, suite, **kwargs):
        result = super().run_suite(suite, **kwargs)
        with open(os.environ[RESULTS_ENV], "w") as fh:
            json.dump(_RecordingResult.outcomes, fh, indent=0, sort_keys=True)
        return result


# -- the driver ------------------------------------------------------------------


def django_tests(version: str) -> str:
    """The ``tests`` folder of Django ``version``'s sdist, downloaded and unpacked once."""
    folder = os.path.join(CACHE, f"django-{version}")
    tests = os.path.join(folder, "tests")
    if os.path.exists(os.path.join(tests, "runtests.py")):
        return tests
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--no-binary", ":all:", "--no-deps", f"django=={version}", "-d", download], check=True)
        (archive,) = glob.glob(os.path.join(download, "*.tar.gz"))
        with tarfile.open(archive) as tar:
            top = tar.getnames()[0].split("/")[0]
            tar.extractall(download, filter="data")
        os.replace(os.path.join(download, top), folder)
    return tests


SETTINGS = '''\
# Written by bemi_devtools/django_suite.py for the {variant} run.
DATABASES = {databases!r}
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
TEST_RUNNER = "bemi_devtools.django_suite.RecordingRunner"
'''

BEMI_SETTINGS = '''
# INSTALLED_APPS = [..., "bemi"], through the list runtests.py installs (see bemi_devtools/django_suite.py).
import __main__

if "bemi" not in getattr(__main__, "ALWAYS_INSTALLED_APPS", ["bemi"]):
    __main__.ALWAYS_INSTALLED_APPS.append("bemi")
'''


def write_settings(folder: str, variant: str, cluster) -> str:
    databases = {}
    for alias in ("default", "other"):
        databases[alias] = {
            "ENGINE": "django.db.backends.postgresql", "HOST": cluster.host, "PORT": str(cluster.port),
            "USER": cluster.user, "NAME": f"{variant}_{alias}",
            "TEST": {"NAME": f"test_{variant}_{alias}"},
        }
    module = f"bemi_suite_{variant}"
    text = SETTINGS.format(variant=variant, databases=databases)
    if variant == "bemi":
        text += BEMI_SETTINGS
    with open(os.path.join(folder, module + ".py"), "w") as fh:
        fh.write(text)
    return module


def install_in_template1(cluster) -> None:
    """bemi's SQL, as `migrate bemi` leaves it, in template1: every database created from now on has it.

    (Not ``TEST['TEMPLATE']``: Django's own tests of the test-database SQL read
    that setting.) Run after the plain run: the server is the same.
    """
    import psycopg

    from bemi.sql import read

    with psycopg.connect(cluster.dsn("template1"), autocommit=True) as conn:
        conn.execute(read("tracking.sql"))
        conn.execute(read("install.sql"))


def run(variant: str, tests: str, labels: list[str], parallel: int, cluster, folder: str) -> tuple[dict, float, str]:
    if variant == "bemi":
        install_in_template1(cluster)
    module = write_settings(folder, variant, cluster)
    results = os.path.join(folder, f"{variant}.json")
    log = os.path.join(folder, f"{variant}.log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, ROOT, os.environ.get("PYTHONPATH", "")]),
           RESULTS_ENV: results, "BEMI_DJANGO_SUITE_VARIANT": variant}
    command = [sys.executable, "runtests.py", "--settings", module, "--noinput", f"--parallel={parallel}", *labels]
    print(f"==> {variant}: {' '.join(command[1:4])} ... ({len(labels)} labels), log in {log}", flush=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        subprocess.run(command, cwd=tests, env=env, stdout=fh, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - start
    if not os.path.exists(results):
        sys.exit(f"the {variant} run recorded no results; see {log}")
    with open(results) as fh:
        return json.load(fh), elapsed, log


def report(outcomes: dict[str, dict[str, str]], times: dict[str, float]) -> int:
    plain, with_bemi = outcomes["plain"], outcomes["bemi"]
    for variant in VARIANTS:
        counts: dict[str, int] = {}
        for outcome in outcomes[variant].values():
            counts[outcome] = counts.get(outcome, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        print(f"{variant:6} {len(outcomes[variant]):6d} tests in {times[variant]:7.1f} s: {summary}")
    print(f"wall time bemi / plain: {times['bemi'] / times['plain']:.2f}x")
    bad = ("failure", "error", "unexpected success")
    differ = sorted(t for t in set(plain) | set(with_bemi) if plain.get(t) != with_bemi.get(t))
    only_bemi = [t for t in differ if with_bemi.get(t) in bad and plain.get(t) not in bad]
    print(f"tests whose outcome differs: {len(differ)}; failing only with bemi: {len(only_bemi)}")
    for test in differ:
        print(f"  {test}: plain {plain.get(test, 'not run')}, bemi {with_bemi.get(test, 'not run')}")
    return 1 if only_bemi else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="*", help=f"Django test labels (default: {' '.join(DEFAULT_LABELS)})")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--keep", action="store_true",
                        help="keep the settings, logs and results folder (kept anyway when a test fails only with bemi)")
    args = parser.parse_args()

    import django

    from bemi_devtools.pgcluster import Cluster

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # atexit then stops the cluster
    labels = args.labels or DEFAULT_LABELS
    tests = django_tests(django.get_version())
    cluster = Cluster(settings={"max_connections": "200", "synchronous_commit": "off"}).start_throwaway()
    folder = tempfile.mkdtemp(prefix="bemi-django-suite-")
    print(f"Django {django.get_version()} tests from {tests}; PostgreSQL {cluster.bindir}, port {cluster.port}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    outcomes, times = {}, {}
    for variant in VARIANTS:
        outcomes[variant], times[variant], _ = run(variant, tests, labels, args.parallel, cluster, folder)
    status = report(outcomes, times)
    if args.keep or status:
        print(f"settings, logs and results: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
