"""Is change tracking working? The state behind ``bemi-worker status`` and ``manage.py bemi_status``.

Django-free: ``collect()`` takes a psycopg connection to the source (the
tracked database) and one to the destination (where ``changes`` is written; the
same connection when they are one database) and returns a ``Status``;
``render_text()`` draws the screen a person reads, ``Status.as_dict()`` the
``--json`` document. Read-only, with one exception: when no worker runs, the
first waiting transaction is peeked at (``pg_logical_slot_peek_binary_changes``,
which consumes nothing) to know how long changes have been waiting.

One module a job:

* ``session``: the status's connections (search_path pinned, statements bounded);
* ``source``, ``destination``, ``lag``, ``chain_head``: the facts, each read where it lives;
* ``report``: ``Status`` and its parts (the ``--json`` document is their fields);
* ``health``: problems (unhealthy) and warnings, from the facts alone;
* ``text``: the screen; ``sizes``: bytes as people write them;
* ``collector``: ``collect()``, all of the above in order; ``command``: the shared command line.

A new section (say, a message stream the worker also feeds): a module that reads
it, a field of ``Status`` (``None`` when there is nothing to report), its call in
``collector.collect()``, its rules in ``health`` and its lines in ``text.SECTIONS``.
"""

from bemi.status.collector import collect
from bemi.status.command import STATUS_EPILOG, add_status_arguments, run
from bemi.status.health import DEFAULT_MAX_LAG_SECONDS, DEFAULT_MAX_RETAINED_BYTES
from bemi.status.report import (EXIT_ERROR, EXIT_HEALTHY, EXIT_UNHEALTHY, Checkpoint, Publication, Slot, Status,
                                Tables, Worker)
from bemi.status.session import connect
from bemi.status.sizes import format_bytes, parse_bytes
from bemi.status.text import render_text

__all__ = ["Status", "collect", "connect", "render_text", "parse_bytes", "DEFAULT_MAX_LAG_SECONDS",
           "DEFAULT_MAX_RETAINED_BYTES", "EXIT_HEALTHY", "EXIT_UNHEALTHY", "EXIT_ERROR",
           "STATUS_EPILOG", "add_status_arguments", "run", "format_bytes",
           "Checkpoint", "Publication", "Slot", "Tables", "Worker"]
