"""One connection to NATS JetStream for the synchronous worker: the stream, the reader's checkpoint, acks.

nats-py is asyncio; the worker is one thread. A ``JetStream`` runs its own
event loop in a daemon thread and the worker calls into it (``call``). What
both sides share:

* ``ensure_stream()``: the stream (limits retention: kept for ``max_age`` /
  ``max_bytes`` whoever has read it, so other consumers may read it too, and a
  kill never loses what an ingester has not stored yet), and the key-value
  bucket of the readers' checkpoints;
* ``publish()`` / ``wait_acked()``: publishing without a round trip per message
  (each message names a reply subject under one inbox; JetStream's acks come
  back there), with the bytes awaiting an ack bounded: ``publish`` blocks while
  the window is full;
* the checkpoint of a reader (commit position and chain head) in the bucket.

Any failure (a lost connection, an ack with an error, no ack in time) is raised
as ``JetStreamFault`` (an ``OSError``): the worker treats it as a fault, drops
the connection and resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Awaitable, Callable, TypeVar

from bemi.worker.errors import WorkerError

__all__ = ["JetStream", "JetStreamFault", "StreamSettings", "load_nats"]

log = logging.getLogger("bemi.worker")
T = TypeVar("T")


class JetStreamFault(OSError):
    """NATS or JetStream failed (connection, ack error, timeout): a fault to wait out, never data."""


def load_nats() -> Any:
    try:
        import nats  # noqa: F401
        import nats.js.api  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise WorkerError("publishing to or ingesting from NATS needs nats-py: pip install "
                          "'bemi-django-selfhosted[nats]'", exit_code=2) from exc
    return nats


@dataclass
class StreamSettings:
    """Names and limits of the stream (docs/scale-out.md)."""

    url: str
    stream: str = "BEMI"
    prefix: str = "bemi"  # subjects <prefix>.<database>.<schema>.<table>
    bucket: str = "bemi_readers"  # the readers' checkpoints
    max_age: float = 7 * 24 * 3600.0  # seconds a message is kept (0: no limit)
    max_bytes: int = -1  # bytes the stream may hold, oldest dropped first (-1: no limit)
    duplicate_window: float = 300.0  # seconds JetStream remembers a message id
    replicas: int = 1


class JetStream:
    def __init__(self, settings: StreamSettings, name: str = "bemi-worker", window_bytes: int = 16 * 1024 * 1024,
                 ack_timeout: float = 30.0, stats: Any = None) -> None:
        self.nats = load_nats()
        self.settings = settings
        self.window_bytes = window_bytes
        self.ack_timeout = ack_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bemi-nats", daemon=True)
        self._thread.start()
        self._cond = threading.Condition()
        self._pending: dict[int, int] = {}  # reply number -> bytes, published and not acked yet
        self._pending_bytes = 0
        self._next = 0
        self.acked_seq = 0  # the highest stream sequence JetStream acked (for a duplicate: the original's)
        self._failure: str | None = None
        self.stats = stats  # a WorkerStats: its nats_published and nats_publish_duplicates are counted
        self.nc: Any = None
        self.js: Any = None
        self._kv: Any = None
        self._inbox = ""
        try:
            self.call(self._connect(name))
        except BaseException:
            self.close()
            raise

    # -- the loop ------------------------------------------------------------------------------

    def call(self, coro: Awaitable[T], timeout: float | None = 30.0) -> T:
        """Run a coroutine on the loop and wait for its result; NATS errors become ``JetStreamFault``."""
        future: Any = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        try:
            return future.result(timeout)
        except JetStreamFault:
            raise
        except TimeoutError as exc:  # concurrent.futures.TimeoutError is TimeoutError (3.11+)
            future.cancel()
            raise JetStreamFault(f"NATS did not answer within {timeout} s") from exc
        except Exception as exc:
            if not (self._is_nats_error(exc) or isinstance(exc, OSError)):
                raise  # a bug or a WorkerError, not a fault to wait out
            raise JetStreamFault(f"NATS: {type(exc).__name__}: {exc}".rstrip(": ")) from exc

    def _is_nats_error(self, exc: BaseException) -> bool:
        return type(exc).__module__.startswith("nats")

    async def _connect(self, name: str) -> None:
        async def on_error(exc: Exception) -> None:
            log.debug("NATS: %s", exc)

        async def on_disconnect() -> None:
            self._fail("the connection to NATS was lost")

        self.nc = await self.nats.connect(servers=[self.settings.url], name=name, error_cb=on_error,
                                          disconnected_cb=on_disconnect, max_reconnect_attempts=-1,
                                          reconnect_time_wait=0.5, connect_timeout=5, allow_reconnect=True)
        self.js = self.nc.jetstream(timeout=10)
        self._inbox = self.nc.new_inbox() + "."
        await self.nc.subscribe(self._inbox + "*", cb=self._on_ack)

    def close(self) -> None:
        if self.nc is not None:
            try:
                self.call(self.nc.close(), timeout=5)
            except Exception:
                pass
            self.nc = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    # -- the stream ----------------------------------------------------------------------------

    def ensure_stream(self) -> None:
        """Create the stream and the checkpoints' bucket when missing (an existing one is left as it is)."""
        self.call(self._ensure_stream())

    async def _ensure_stream(self) -> None:
        s = self.settings
        api = self.nats.js.api
        from nats.js.errors import NotFoundError

        try:
            info = await self.js.stream_info(s.stream)
            subjects = list(info.config.subjects or [])
            if f"{s.prefix}.>" not in subjects:
                raise WorkerError(f"NATS stream {s.stream!r} exists with subjects {subjects}, not {s.prefix}.>: "
                                  "choose another --stream or --subject-prefix", exit_code=2)
        except NotFoundError:
            await self.js.add_stream(api.StreamConfig(
                name=s.stream, subjects=[f"{s.prefix}.>"], retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE, discard=api.DiscardPolicy.OLD, max_age=s.max_age or None,
                max_bytes=s.max_bytes, duplicate_window=s.duplicate_window, num_replicas=s.replicas))
            log.info("created NATS JetStream stream %s (subjects %s.>, max age %s s, max bytes %s)", s.stream,
                     s.prefix, s.max_age or "unlimited", s.max_bytes if s.max_bytes >= 0 else "unlimited")

    async def _bucket(self) -> Any:
        if self._kv is None:
            from nats.js.errors import BucketNotFoundError, NotFoundError

            try:
                self._kv = await self.js.key_value(self.settings.bucket)
            except (BucketNotFoundError, NotFoundError):
                self._kv = await self.js.create_key_value(bucket=self.settings.bucket, history=1,
                                                          storage=self.nats.js.api.StorageType.FILE,
                                                          replicas=self.settings.replicas)
        return self._kv

    def stream_info(self) -> Any:
        return self.call(self.js.stream_info(self.settings.stream), timeout=10)

    # -- the reader's checkpoint ---------------------------------------------------------------

    def read_checkpoint(self, key: str) -> dict[str, Any] | None:
        return self.call(self._read_checkpoint(key))

    async def _read_checkpoint(self, key: str) -> dict[str, Any] | None:
        from nats.js.errors import KeyNotFoundError

        kv = await self._bucket()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        value = json.loads(entry.value)
        return value if isinstance(value, dict) else None

    def write_checkpoint(self, key: str, value: dict[str, Any]) -> None:
        self.call(self._write_checkpoint(key, json.dumps(value, separators=(",", ":")).encode()))

    async def _write_checkpoint(self, key: str, data: bytes) -> None:
        kv = await self._bucket()
        await kv.put(key, data)

    # -- what a reader published after its checkpoint ----------------------------------------

    def queued_after(self, after_seq: int, subjects: str, source: str) -> dict[int, str]:
        """``queued_at`` of each transaction (by commit position) that ``source`` published after
        stream sequence ``after_seq`` in subjects ``subjects``: what a reader stopped before its next
        checkpoint had already published, to be published again with the same bytes."""
        return self.call(self._queued_after(after_seq, subjects, source), timeout=600)

    async def _queued_after(self, after_seq: int, subjects: str, source: str) -> dict[int, str]:
        from nats.js.errors import NotFoundError

        found: dict[int, str] = {}
        prefix = source + ":"
        seq = after_seq + 1
        while True:
            try:
                msg = await self.js.get_msg(self.settings.stream, seq=seq, subject=subjects, next=True)
            except NotFoundError:
                return found
            seq = int(msg.seq) + 1
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            if not msg_id.startswith(prefix) or not msg.data:
                continue
            try:
                position = int(msg_id[len(prefix):].split(":", 1)[0])
                if position in found:  # (every change of a transaction has the same queued_at)
                    continue
                queued = json.loads(msg.data).get("queued_at")
                datetime.fromisoformat(queued)
            except (ValueError, TypeError, AttributeError):
                continue  # not a message as a reader writes them (anyone who may publish could send it)
            found[position] = queued

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, messages: list[tuple[str, bytes, str]]) -> None:
        """Send (subject, data, message id) in order; blocks while the bytes awaiting acks exceed the window."""
        if not messages:
            return
        size = sum(len(m[1]) for m in messages)
        with self._cond:
            deadline = time.monotonic() + self.ack_timeout
            while self._pending_bytes and self._pending_bytes + size > self.window_bytes and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._failure = f"no ack from JetStream within {self.ack_timeout} s"
                    break
                self._cond.wait(left)
            if self._failure is not None:
                raise JetStreamFault(self._failure)
            first = self._next
            self._next += len(messages)
            for i, m in enumerate(messages):
                self._pending[first + i] = len(m[1])
            self._pending_bytes += size
        asyncio.run_coroutine_threadsafe(self._send(messages, first), self._loop)

    async def _send(self, messages: list[tuple[str, bytes, str]], first: int) -> None:
        publish, inbox = self.nc.publish, self._inbox
        try:
            for i, (subject, data, msg_id) in enumerate(messages):
                await publish(subject, data, reply=f"{inbox}{first + i}", headers={"Nats-Msg-Id": msg_id})
        except Exception as exc:
            self._fail(f"publishing to NATS failed: {exc}")

    async def _on_ack(self, msg: Any) -> None:
        try:
            number = int(msg.subject[len(self._inbox):])
        except ValueError:
            return
        error = None
        if not msg.data:
            status = (msg.headers or {}).get("Status", "") if msg.headers else ""
            error = f"JetStream did not take the message (status {status or 'none'}: no stream for its subject?)"
        else:
            try:
                ack = json.loads(msg.data)
            except ValueError:
                ack = {"error": {"description": "unreadable ack"}}
            if "error" in ack:
                error = f"JetStream refused a message: {ack['error']}"
            else:
                seq = ack.get("seq")
                if type(seq) is int and seq > self.acked_seq:
                    self.acked_seq = seq
            if error is None and self.stats is not None:
                if ack.get("duplicate"):
                    self.stats.nats_publish_duplicates += 1
                else:
                    self.stats.nats_published += 1
        with self._cond:
            size = self._pending.pop(number, None)
            if size is not None:
                self._pending_bytes -= size
            if error is not None and self._failure is None:
                self._failure = error
            self._cond.notify_all()

    def _fail(self, why: str) -> None:
        with self._cond:
            if self._failure is None and (self._pending or why.startswith("publishing")):
                self._failure = why
            self._cond.notify_all()

    def wait_acked(self) -> None:
        """Until JetStream acknowledged every message published so far (stored or a known duplicate)."""
        with self._cond:
            deadline = time.monotonic() + self.ack_timeout
            while self._pending and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._failure = f"no ack from JetStream within {self.ack_timeout} s ({len(self._pending)} waiting)"
                    break
                self._cond.wait(min(left, 1.0))
            if self._failure is not None:
                raise JetStreamFault(self._failure)

    def forget_pending(self) -> None:
        """After a rollback: what is in flight is not waited for (a restart publishes it again)."""
        with self._cond:
            self._pending.clear()
            self._pending_bytes = 0
            self._cond.notify_all()

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (its ``max_payload``)."""
        return int(self.nc.max_payload) if self.nc is not None else 1024 * 1024

    @property
    def failed(self) -> str | None:
        return self._failure

    def on_loop(self, fn: Callable[[], Any]) -> None:
        self._loop.call_soon_threadsafe(fn)


class Delivered:
    """One message a pull request delivered: its data and the subject its ack goes to."""

    __slots__ = ("data", "reply")

    def __init__(self, data: bytes, reply: bytes) -> None:
        self.data = data
        self.reply = reply


class PullConsumer:
    """Batches of a durable pull consumer, with a lighter path than nats-py's ``fetch`` (which waits for
    each message in turn): one subscription collects what pull requests deliver; a request ends when
    its batch is full or the server ends it with a status (a ``no_wait`` request once it delivered what
    there was; a waiting one at its expiry). A message delivered late (after a request's end went
    missing) is kept for the next batch, never dropped. Runs on the loop.

    nats-py turns each message into a ``Msg`` (its headers parsed into a dict) and hands it to the
    subscription's task through a queue, and an ack is one ``publish`` each: a large part of an
    ingester's time (docs/benchmarks.md). So, where the client has the shape this was written against
    (:func:`_raw_delivery`), the messages of this one subscription are taken from its protocol parser
    as they are (data, reply subject, the status line of the header block), and a batch's acks are
    written as one block of ``PUB`` commands; otherwise the public path (``Msg``, ``publish``) is used.
    """

    def __init__(self, js: JetStream, stream: str, consumer: str, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.js = js
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        # The bytes one request may deliver; never less than the largest message the server takes
        # (else such a message would end every request with 409 and never be delivered).
        self.max_bytes = max(max_bytes, 2 * js.max_payload)
        self.inbox = ""
        self.raw = False  # messages taken from the parser (and acks written in blocks)
        self._msgs: list[Any] = []
        self._wanted = 0
        self._done: asyncio.Future | None = None

    async def start(self, raw: bool = True) -> "PullConsumer":
        nc = self.js.nc
        self.inbox = nc.new_inbox()
        sub = await nc.subscribe(self.inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        self.raw = raw and _raw_delivery(nc, sub, self._on_raw)
        return self

    def _on_raw(self, reply: bytes, data: bytes, headers: bytes | None) -> None:
        """A message of this subscription, straight from the parser. A status (``NATS/1.0 404 ...``) has a
        code after the version; a change's header block (its ``Nats-Msg-Id``) has none."""
        if headers is not None and headers[8:9] == b" ":
            self._end(headers[9:12].decode("ascii", "replace"))
            return
        self._msgs.append(Delivered(data, reply))
        done = self._done
        if done is not None and not done.done() and len(self._msgs) >= self._wanted:
            done.set_result(None)

    async def _on_msg(self, msg: Any) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._msgs.append(Delivered(msg.data, msg.reply.encode()))
            done = self._done
            if done is not None and not done.done() and len(self._msgs) >= self._wanted:
                done.set_result(None)
        else:
            self._end(status)

    def _end(self, status: str) -> None:
        done = self._done
        # 404, 408, 409 (also: its max_bytes reached): the request ended
        if status != "100" and done is not None and not done.done():
            done.set_result(None)

    async def _pull(self, batch: int, expires: float | None) -> list[Any]:
        """One request: ``expires`` None asks for what is there now (no_wait)."""
        self._wanted = len(self._msgs) + batch
        self._done = done = asyncio.get_running_loop().create_future()
        request: dict[str, Any] = {"batch": batch, "max_bytes": self.max_bytes}
        if expires:
            request["expires"] = int(expires * 1e9)  # (the server ignores no_wait beside expires)
        else:
            request["no_wait"] = True
        await self.js.nc.publish(self.subject, json.dumps(request).encode(), reply=self.inbox)
        try:
            await asyncio.wait_for(asyncio.shield(done), (expires or 0) + 2)
        except asyncio.TimeoutError:
            pass  # the request's end was lost: take what came
        msgs, self._msgs, self._done = self._msgs, [], None
        return msgs

    async def fetch(self, batch: int, wait: float) -> list[Any]:
        """Up to ``batch`` messages: what is there at once; when nothing is, the first one to come within
        ``wait`` seconds and whatever followed it."""
        msgs = await self._pull(batch, None)
        if msgs or wait <= 0:
            return msgs
        msgs = await self._pull(1, wait)
        if msgs and batch > 1:
            msgs += await self._pull(batch - 1, None)
        return msgs

    async def ack(self, msgs: list[Delivered]) -> None:
        nc = self.js.nc
        if self.raw:
            # One block of PUB commands (what nc.publish writes for each), flushed as one write.
            await nc._send_command(b"".join(b"PUB %s 4\r\n+ACK\r\n" % m.reply for m in msgs))
            await nc._flush_pending()
            return
        for m in msgs:
            await nc.publish(m.reply.decode(), b"+ACK")


def _raw_delivery(nc: Any, sub: Any, on_raw: Callable[[bytes, bytes, bytes | None], None]) -> bool:
    """Route the messages of ``sub`` from nats-py's parser straight to ``on_raw`` (reply, data, header
    block), when the client is one whose internals this was written against (nats-py 2.x: the parser
    awaits ``nc._process_msg(sid, subject, reply, data, headers)``; commands are queued by
    ``_send_command`` and written by ``_flush_pending``). False, changing nothing, otherwise."""
    import inspect

    process = getattr(nc, "_process_msg", None)
    sid = getattr(sub, "_id", None)
    if (process is None or not isinstance(sid, int) or not inspect.iscoroutinefunction(process)
            or not inspect.iscoroutinefunction(getattr(nc, "_send_command", None))
            or not inspect.iscoroutinefunction(getattr(nc, "_flush_pending", None))):
        return False
    try:
        names = list(inspect.signature(process).parameters)
    except (TypeError, ValueError):
        return False
    if names != ["sid", "subject", "reply", "data", "headers"]:
        return False

    async def process_msg(sid_: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if sid_ == sid:
            on_raw(reply, data, headers)
        else:
            await process(sid_, subject, reply, data, headers)

    nc._process_msg = process_msg
    return True

