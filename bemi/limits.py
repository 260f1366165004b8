"""Size limits shared by the application side and the worker (no Django import here).

``MAX_CONTEXT_BYTES``: the wrapper sends no context whose JSON is larger, and
the worker drops (and counts) a ``_bemi`` message that is larger; one number,
so that what one side sends the other accepts.

``DEFAULT_MAX_SQL_BYTES``: how much of the statement the wrapper keeps in the
context's ``"SQL"`` value unless ``BEMI_MAX_SQL_BYTES`` says otherwise. The
context is stored again on every row the statement changed: a 20,000-row
``bulk_update`` with its whole SQL (940 KB) in the context stored 940 KB per
change. A few KB identify the statement.
"""

MAX_CONTEXT_BYTES = 1_000_000
DEFAULT_MAX_SQL_BYTES = 4096
