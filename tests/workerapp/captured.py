"""The pgoutput bytes captured from a real server (see tests/workerapp/capture.py)."""

from __future__ import annotations

import json
import os
from functools import cache


@cache
def transactions() -> dict[str, list[tuple[int, bytes]]]:
    path = os.path.join(os.path.dirname(__file__), "pgoutput_capture.json")
    with open(path) as fh:
        raw = json.load(fh)["transactions"]
    return {name: [(lsn, bytes.fromhex(data)) for lsn, data in rows] for name, rows in raw.items()}


def messages(name: str) -> list[tuple[int, bytes]]:
    return transactions()[name]


def all_messages() -> list[tuple[int, bytes]]:
    return [m for rows in transactions().values() for m in rows]
