"""Pipelined JetStream publishes whose acknowledgements come back on the relay's own inbox."""

from __future__ import annotations

import asyncio
import json

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import PubAck


class Acks:
    """Pipelined JetStream publishes and their acknowledgements, matched by reply subject.

    nats-py's own publish_async turns an error reply (such as a broken chain) into a silent
    timeout - its reply handler raises instead of failing the future - so the relay keeps
    its own, small, reply inbox.
    """

    def __init__(self, nc: NATS, prefix: str) -> None:
        self._nc = nc
        self._prefix = prefix
        self._futures: dict[str, asyncio.Future[PubAck]] = {}
        self._next = 0

    @classmethod
    async def open(cls, nc: NATS) -> Acks:
        acks = cls(nc, nc.new_inbox())
        await nc.subscribe(f"{acks._prefix}.*", cb=acks._on_reply)
        return acks

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]:
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: self._futures.pop(token, None))
        self._futures[token] = future
        try:
            await self._nc.publish(
                subject, payload, reply=f"{self._prefix}.{token}", headers=headers
            )
        except BaseException:
            future.cancel()
            raise
        return future

    async def _on_reply(self, msg: Msg) -> None:
        future = self._futures.get(msg.subject[len(self._prefix) + 1:])
        if future is None or future.done():
            return  # given up on already (timed out); the event is published again later
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            reply = json.loads(msg.data)
            if "error" in reply:
                nats.js.errors.APIError.from_error(reply["error"])  # always raises
            future.set_result(PubAck.from_response(reply))
        except nats.js.errors.APIError as e:
            future.set_exception(e)
        except (ValueError, TypeError, KeyError) as e:
            future.set_exception(nats.js.errors.Error(f"unreadable JetStream reply: {e}"))


async def settle(future: asyncio.Future[PubAck], deadline: float,
                 loop: asyncio.AbstractEventLoop) -> PubAck:
    # wait_for cancels the future on timeout, which frees its slot in the client.
    return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))

