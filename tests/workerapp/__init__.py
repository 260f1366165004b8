"""Support for the worker tests, not a Django app: the ``worker_env`` fixture
(``harness``, registered in ``tests/conftest.py``) and the pgoutput bytes
captured from a real server (``capture``, ``captured``)."""
