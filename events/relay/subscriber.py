"""The subscriber helper: relayed events in order, each at most once, durable or ephemeral."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from events.relay.wire import STREAM, SUBJECTS, PublishedEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Gap:
    """A stream jumped from `after_version` to `received_version` (events missing between)."""

    stream_id: str
    after_version: int
    received_version: int


class Subscriber:
    """Yields relayed events, each (stream_id, version) at most once and never an older one.

    An event at or below the last version seen for its stream (a re-publish older than the
    dedupe window, a redelivery) is dropped and counted; a stream that skips versions is
    recorded in `gaps`. Without `durable` it is an ordered ephemeral consumer from the start of
    the stream; with `durable` a durable consumer whose messages are acknowledged once the
    caller asks for the next one. `seen` resumes the version bookkeeping of an earlier run.
    Use as an async context manager, then iterate or call `next()`.
    """

    def __init__(
        self,
        nc: NATS,
        subject: str = SUBJECTS,
        *,
        durable: str | None = None,
        seen: Mapping[str, int] | None = None,
        idle_heartbeat: float = 2.0,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.durable = durable
        self.idle_heartbeat = idle_heartbeat
        self.duplicates_dropped = 0
        self.gaps: list[Gap] = []
        self._last: dict[str, int] = dict(seen or {})
        self._sub: JetStreamContext.PushSubscription | None = None
        self._unacked: Msg | None = None

    async def __aenter__(self) -> Subscriber:
        js = self.nc.jetstream()
        if self.durable is None:
            self._sub = await js.subscribe(
                self.subject, stream=STREAM, ordered_consumer=True,
                idle_heartbeat=self.idle_heartbeat,
            )
        else:
            # A durable just released (by us or a previous run) can still count as bound for a
            # moment while the server processes the unsubscribe: try again briefly.
            for attempt in range(20):
                try:
                    self._sub = await js.subscribe(
                        self.subject, stream=STREAM, durable=self.durable, manual_ack=True,
                        idle_heartbeat=self.idle_heartbeat,
                        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0),
                    )
                    break
                except nats.js.errors.Error as e:
                    if "already bound" not in str(e) or attempt == 19:
                        raise
                    await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and not self.nc.is_closed:
            await self._ack_pending()
            await sub.unsubscribe()
            await self.nc.flush()  # the server has the unsubscribe before we return

    @property
    def last_versions(self) -> dict[str, int]:
        """The last version seen per stream (pass it as `seen` to resume)."""
        return dict(self._last)

    async def next(self, timeout: float | None = None) -> PublishedEvent:
        """The next new event; raises nats.errors.TimeoutError when none came within `timeout`."""
        assert self._sub is not None, "use Subscriber as an async context manager"
        await self._ack_pending()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(0.001, deadline - loop.time())
            msg = await self._sub.next_msg(timeout=left)
            event = PublishedEvent.from_message(msg)
            last = self._last.get(event.stream_id)
            if last is not None and event.version <= last:
                self.duplicates_dropped += 1
                if self.durable is not None:
                    await msg.ack()
                continue
            if last is not None and event.version > last + 1:
                gap = Gap(event.stream_id, last, event.version)
                log.warning("subscriber: %s jumped from version %d to %d",
                            gap.stream_id, gap.after_version, gap.received_version)
                self.gaps.append(gap)
            self._last[event.stream_id] = event.version
            if self.durable is not None:
                self._unacked = msg
            return event

    async def __aiter__(self) -> AsyncIterator[PublishedEvent]:
        while True:
            yield await self.next()

    async def _ack_pending(self) -> None:
        msg, self._unacked = self._unacked, None
        if msg is not None:
            await msg.ack()

