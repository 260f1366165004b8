"""Forward bemi's change stream (NATS JetStream) to a webhook: an example consumer (docs/scale-out.md).

    pip install nats-py
    python examples/nats_webhook.py --nats nats://localhost:4222 --url https://example.com/hooks/changes \
        --subject 'bemi.app.public.>'

Each change (a v1 JSON document) is POSTed as it came, with the headers
``Idempotency-Key`` (the message id: ``<source>:<commit_position>:<change_index>``)
and ``Content-Type: application/json``. A change is acknowledged only after the
webhook answered 2xx; otherwise it is redelivered later (at least once: the
receiver deduplicates by the idempotency key). Its own durable consumer
(``--durable``) keeps its place across restarts, apart from bemi's ingesters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


def post(url: str, data: bytes, key: str, timeout: float = 10.0) -> bool:
    """POST one change; True on a 2xx answer."""
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "Idempotency-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


async def forward(nats_url: str, url: str, stream: str = "BEMI", subject: str = "bemi.>",
                  durable: str = "webhook", once: bool = False, batch: int = 100) -> int:
    """Forward until stopped (``once``: until nothing is left); returns the number of changes delivered."""
    nc = await nats.connect(nats_url)
    delivered = 0
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=60))
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=1)
            except (NatsTimeout, asyncio.TimeoutError):  # (nats-py raises either when nothing came)
                if once:
                    return delivered
                continue
            for msg in msgs:
                document = json.loads(msg.data)
                if document.get("v") != 1:  # a version this forwarder does not know: leave it to others
                    await msg.term()
                    continue
                key = (msg.headers or {}).get("Nats-Msg-Id", "")
                if await asyncio.to_thread(post, url, msg.data, key):
                    await msg.ack()
                    delivered += 1
                else:
                    await msg.nak(delay=5)  # try again in 5 s
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--url", required=True, help="the webhook")
    parser.add_argument("--stream", default="BEMI")
    parser.add_argument("--subject", default="bemi.>", help="e.g. bemi.app.public.orders (default: every change)")
    parser.add_argument("--durable", default="webhook", help="this forwarder's durable consumer")
    parser.add_argument("--once", action="store_true", help="forward what the stream holds, then exit")
    options = parser.parse_args(argv)
    count = asyncio.run(forward(options.nats, options.url, options.stream, options.subject, options.durable,
                                options.once))
    print(f"forwarded {count} changes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
