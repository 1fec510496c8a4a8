"""Reading back what the relay put in JetStream: the events' copy and the chain anchors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

FETCH = 1000  # messages per fetch


async def read_stream_messages(
    js: JetStreamContext, stream: str, subject: str, *, timeout: float = 5.0
) -> AsyncIterator[Msg]:
    """Every message of `stream` on `subject` stored when this starts, oldest first, through an
    ephemeral pull consumer without acks (it goes away when this ends or is abandoned).

    Yields nothing when the stream does not exist (nothing was ever relayed). Raises nats
    errors (nats.errors.Error, TimeoutError) when JetStream does not answer.
    """
    try:
        sub = await js.pull_subscribe(
            subject, stream=stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
                                  inactive_threshold=60.0),
        )
    except nats.js.errors.NotFoundError:
        return
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        while pending > 0:
            msgs = await sub.fetch(min(pending, FETCH), timeout=timeout)
            for msg in msgs:
                yield msg
            # Counted down to what was stored when the consumer was made; later messages are
            # read too (num_pending includes them), which only makes the copy more complete.
            pending = msgs[-1].metadata.num_pending if msgs else 0
    finally:
        # Should this fail, the consumer expires by itself (inactive_threshold).
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
