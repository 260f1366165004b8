"""The NATS JetStream part of the status (``--nats``, docs/scale-out.md): the stream, the ingesters'
consumer and its lag, the reader's checkpoint. Read with nats-py, each request bounded in time."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg

__all__ = ["NatsStatus", "read_nats", "judge_nats"]


@dataclass
class NatsStatus:
    url: str
    stream: str
    consumer: str
    reachable: bool = False
    error: str | None = None
    stream_exists: bool = False
    messages: int = 0  # in the stream
    bytes: int = 0
    first_seq: int = 0
    last_seq: int = 0
    max_age_seconds: float | None = None
    max_bytes: int | None = None
    consumer_exists: bool = False
    consumer_pending: int = 0  # not delivered to any ingester yet
    consumer_ack_pending: int = 0  # delivered, not acknowledged yet
    consumer_redelivered: int = 0
    #: Seconds since the oldest change not stored yet was published (0: the ingesters are caught up).
    consumer_lag_seconds: float = 0.0
    #: The reader's checkpoint in the bucket (commit position, time), when found.
    reader_checkpoint: dict[str, Any] | None = field(default=None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _source_identity(source: psycopg.Connection) -> str | None:
    try:
        row = source.execute("SELECT (SELECT system_identifier FROM pg_catalog.pg_control_system())::text, "
                             "(SELECT oid FROM pg_catalog.pg_database WHERE datname "
                             "OPERATOR(pg_catalog.=) pg_catalog.current_database())::text").fetchone()
    except psycopg.Error:
        source.rollback()
        return None
    return f"{row[0]}/{row[1]}" if row else None


def read_nats(url: str, stream: str, consumer: str, source: psycopg.Connection | None = None,
              slot: str = "bemi", timeout: float = 5.0) -> NatsStatus:
    """What JetStream says; ``reachable`` False (with ``error``) when it cannot be asked."""
    status = NatsStatus(url=url, stream=stream, consumer=consumer)
    identity = _source_identity(source) if source is not None else None
    try:
        import nats  # noqa: F401
    except ImportError:
        status.error = "nats-py is not installed (pip install 'bemi-django-selfhosted[nats]')"
        return status
    try:
        asyncio.run(asyncio.wait_for(_read(status, identity, slot, timeout), timeout * 3))
    except Exception as exc:  # any failure to ask is what the status reports
        status.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    return status


async def _read(status: NatsStatus, identity: str | None, slot: str, timeout: float) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(servers=[status.url], connect_timeout=timeout, max_reconnect_attempts=0,
                            allow_reconnect=False)
    try:
        status.reachable = True
        js = nc.jetstream(timeout=timeout)
        try:
            info = await js.stream_info(status.stream)
        except NotFoundError:
            return
        status.stream_exists = True
        state = info.state
        status.messages, status.bytes = int(state.messages or 0), int(state.bytes or 0)
        status.first_seq, status.last_seq = int(state.first_seq or 0), int(state.last_seq or 0)
        status.max_age_seconds = info.config.max_age or None
        status.max_bytes = info.config.max_bytes if info.config.max_bytes and info.config.max_bytes > 0 else None
        try:
            ci = await js.consumer_info(status.stream, status.consumer)
        except NotFoundError:
            ci = None
        if ci is not None:
            status.consumer_exists = True
            status.consumer_pending = int(ci.num_pending or 0)
            status.consumer_ack_pending = int(ci.num_ack_pending or 0)
            status.consumer_redelivered = int(ci.num_redelivered or 0)
            floor = int(ci.ack_floor.stream_seq or 0) if ci.ack_floor else 0
            if status.consumer_pending or status.consumer_ack_pending:
                oldest = max(floor + 1, status.first_seq)
                try:
                    msg = await js.get_msg(status.stream, oldest)
                    published = getattr(msg, "time", None)  # when JetStream stored it
                    if isinstance(published, datetime):
                        status.consumer_lag_seconds = max(
                            (datetime.now(timezone.utc) - published).total_seconds(), 0.0)
                except Exception:
                    pass
        if identity is not None:
            from bemi.worker.publisher import checkpoint_key

            try:
                kv = await js.key_value("bemi_readers")
                entry = await kv.get(checkpoint_key(status.stream, identity, slot))
                value = json.loads(entry.value) if entry.value else None
                if isinstance(value, dict):
                    status.reader_checkpoint = {k: value.get(k) for k in ("commit_lsn", "end_lsn", "at", "committed_at")}
            except Exception:
                pass
    finally:
        await nc.close()


def judge_nats(status: NatsStatus) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the NATS part."""
    problems: list[str] = []
    warnings: list[str] = []
    if not status.reachable:
        problems.append(f"cannot reach NATS at {status.url}: {status.error}")
    elif not status.stream_exists:
        problems.append(f"NATS stream {status.stream} does not exist (no reader has published to it yet)")
    elif not status.consumer_exists:
        warnings.append(f"no consumer {status.consumer} on stream {status.stream}: no ingester has started yet")
    elif status.max_age_seconds and status.consumer_lag_seconds > status.max_age_seconds / 2:
        warnings.append(f"the ingesters are {status.consumer_lag_seconds:.0f} s behind, more than half the "
                        f"stream's max age ({status.max_age_seconds:.0f} s): what expires is lost to them")
    return problems, warnings
