"""BemiChange with BemiDatabaseRouter and a second alias `bemi`.

The alias and the router are process-wide settings, so the checks run in a
child pytest with tests.queryapp.settings_router (same PostgreSQL server).
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_router_sends_changes_to_the_bemi_alias(pg_server):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/queryapp/router_checks.py", "--ds", "tests.queryapp.settings_router",
         "-p", "no:cacheprovider", "-q", "--create-db"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
