"""Tools for developing this repository, shared by ``tests/``, ``example_project/demo`` and ``bench/``.

``pgcluster``: a private PostgreSQL with ``wal_level = logical`` in a folder of its own.
``wal``: what reached the write-ahead log, read through a ``test_decoding`` slot.

Not part of the distribution (``pyproject.toml`` packages ``bemi`` only) and
not a test module: the demo and the benchmarks import it from a checkout.
"""
