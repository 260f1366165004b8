"""The change-tracking worker: WAL (pgoutput) -> changes. See docs/worker.md."""
