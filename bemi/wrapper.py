"""The execute wrapper that puts the application context into the WAL."""


def install_execute_wrapper() -> None:
    """Attach the wrapper to every PostgreSQL connection (not written yet)."""
