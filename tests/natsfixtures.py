"""A private nats-server with JetStream for the tests of scale-out (bemi_devtools/natsserver.py).

Skips with the reason when nats-server or nats-py cannot be had (scripts/test installs
both when it may). Each test takes its own stream and subject prefix (``nats_names``).
"""

from __future__ import annotations

import itertools
import os

import pytest

from bemi_devtools.natsserver import NatsServer, find_nats_server

_names = itertools.count()


def _require() -> str:
    binary = find_nats_server()
    if binary is None:
        pytest.skip("nats-server is not installed (scripts/test installs Debian's nats-server when run as root)")
    pytest.importorskip("nats", reason="nats-py is not installed (pip install 'bemi-django-selfhosted[nats]')")
    return binary


@pytest.fixture(scope="session")
def nats_server():
    server = NatsServer(_require()).start()
    yield server
    server.destroy()


@pytest.fixture
def own_nats_server():
    """A server of the test's own (for tests that restart it)."""
    server = NatsServer(_require()).start()
    yield server
    server.destroy()


@pytest.fixture
def nats_names():
    n = next(_names)
    return {"stream": f"T{os.getpid()}_{n}", "prefix": f"t{os.getpid()}_{n}"}
