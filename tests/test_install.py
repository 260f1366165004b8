"""The install commands of the README work as written, in a fresh virtual environment.

The distribution is not on the package index: the README installs it from a
checkout or from a wheel built from one, and the `metrics` extra (or plain
`pip install prometheus_client`) for the worker's /metrics.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_upgrade import UNREACHABLE

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(text in output for text in UNREACHABLE):
        pytest.skip(f"the package registry is unreachable: {output.strip()[-300:]}")
    assert result.returncode == 0, output
    return result


def test_the_readme_wheel_with_its_extras_installs_in_a_fresh_environment(tmp_path):
    # The README's commands: build the wheel, install the file with an extra.
    assert "pip wheel --no-deps -w\ndist ." in README or "pip wheel --no-deps -w dist ." in README
    (wheel_in_readme,) = set(re.findall(r"dist/(bemi_django_selfhosted-[^\s'`\[]+\.whl)", README))
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", "-w", dist, ".")
    (built,) = dist.glob("*.whl")
    assert built.name == wheel_in_readme  # the file name the README gives is the one pip builds

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{built}[metrics,binary]",
        cwd=tmp_path)
    found = run(python, "-c", "import bemi, prometheus_client, psycopg; print(bemi.__file__, psycopg.pq.__impl__)",
                cwd=tmp_path).stdout
    assert str(venv) in found and found.split()[-1] == "binary"  # the installed copy, and psycopg's binary wheel
    assert run(venv / "bin" / "bemi-worker", "--help", cwd=tmp_path).stdout.startswith("usage: bemi-worker")
