"""With django-stubs, bemi's query API is typed: mypy over bemi/ is clean and tests/typing/usage.py's types hold."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None or importlib.util.find_spec("mypy_django_plugin") is None,
                    reason="mypy and django-stubs are not installed (the test extra has them on Python 3.11+)")
def test_mypy_with_django_stubs_is_clean_and_the_query_api_typed():
    # the configuration of pyproject.toml ([tool.mypy], [tool.django-stubs]): what `tox -e typecheck` runs
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout
