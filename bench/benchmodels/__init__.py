"""The models bench/query.py and bench/write_path.py run on (no migrations: syncdb creates them).

The benchmarks' own, so that they import nothing from ``tests/``; the scripts
put ``bench/`` on ``sys.path`` (it is their folder) and install the app as
``benchmodels``.
"""
