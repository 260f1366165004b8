"""System checks of the ``bemi`` app (``manage.py check``)."""
