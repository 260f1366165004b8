"""Size limits shared by the application side and the worker (no Django import here).

``MAX_CONTEXT_BYTES``: the worker drops (and counts) a ``_bemi`` message that
is larger, whoever wrote it; ``BEMI_MAX_CONTEXT_BYTES`` may not exceed it, so
that what the wrapper sends the worker accepts.

``DEFAULT_MAX_CONTEXT_BYTES``: the wrapper sends no context whose JSON is
larger unless ``BEMI_MAX_CONTEXT_BYTES`` says otherwise (the SQL is cut
first; a dict that alone is larger is not sent). The context is stored again
on every row its statement changed: a 1 MB context on a 20,000-row
``bulk_create`` would store 20 GB.

``DEFAULT_MAX_SQL_BYTES``: how much of the statement the wrapper keeps in the
context's ``"SQL"`` value unless ``BEMI_MAX_SQL_BYTES`` says otherwise. The
context is stored again on every row the statement changed: a 20,000-row
``bulk_update`` with its whole SQL (940 KB) in the context stored 940 KB per
change. A few KB identify the statement.
"""

MAX_CONTEXT_BYTES = 1_000_000
DEFAULT_MAX_CONTEXT_BYTES = 16_384
DEFAULT_MAX_SQL_BYTES = 4096
