"""The SQL bemi runs, as plain files that also work with ``psql -f``.

``install.sql``/``uninstall.sql``: ``migrate bemi`` (the trigger functions);
``changes.sql``/``worker.sql``: the worker's tables in the destination.
"""

from importlib import resources


def read(name: str) -> str:
    """The text of one of the SQL files of this folder."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
