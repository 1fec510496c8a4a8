"""The subscriber helper: relayed events in order, each at most once, durable or not."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RawStreamMsg

from events.relay.wire import STREAM, SUBJECTS, PublishedEvent

log = logging.getLogger(__name__)

# What a read meets while a NATS cluster fails over (a stream electing a new leader, the
# client moving to another node): nothing is lost, the same read is tried again. The
# publisher's "no response from stream" is JetStream's 503 to a request.
FAILOVER_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)
FAILOVER_PAUSE = 0.2  # seconds between tries of a read that met a failover


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
    recorded in `gaps`. Without `durable` it reads the stream from its start one message at a
    time ($JS.API.STREAM.MSG.GET), creating no consumer: the NATS subscriber user may create
    none (docs/contracts.md §3). With `durable` it is a durable pull consumer (created when
    missing and the user may, else one the operator created) whose messages are acknowledged
    once the caller asks for the next one. `seen` resumes the version bookkeeping of an earlier
    run. `from_now` (without `durable`) skips what the stream holds already: only events
    relayed after entering are read; `from_sequence` (without `durable`) starts the reads at
    that stream sequence instead (an earlier run's `next_sequence`). A read that meets a
    cluster's failover (FAILOVER_ERRORS) is tried again from where it was, so nothing is
    skipped. Use as an async context manager, then iterate or call `next()`.
    """

    def __init__(
        self,
        nc: NATS,
        subject: str = SUBJECTS,
        *,
        durable: str | None = None,
        seen: Mapping[str, int] | None = None,
        idle_heartbeat: float = 2.0,
        from_now: bool = False,
        from_sequence: int | None = None,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.durable = durable
        # How long one wait lasts: a fetch of a durable, or between reads when nothing is new.
        self.idle_heartbeat = idle_heartbeat
        self.duplicates_dropped = 0
        self.gaps: list[Gap] = []
        self._last: dict[str, int] = dict(seen or {})
        self._js: JetStreamContext | None = None
        self._pull: JetStreamContext.PullSubscription | None = None
        self._wake: Subscription | None = None
        self._woken = asyncio.Event()
        # The stream sequence the next read starts at (ephemeral).
        self._next_seq = from_sequence if from_sequence is not None else 1
        self._resumed = from_sequence is not None
        self.from_now = from_now
        self._unacked: Msg | None = None

    async def __aenter__(self) -> Subscriber:
        js = self._js = self.nc.jetstream()
        if self.durable is None:
            # NotFoundError before the relay made the stream.
            info = await js.stream_info(STREAM)
            if self.from_now and not self._resumed:
                # By sequence, as every read here: the subscriber user may create no consumer
                # (so no deliver policy "new"), and the stream's last sequence is as good.
                self._next_seq = (info.state.last_seq or 0) + 1

            async def wake(msg: Msg) -> None:
                self._woken.set()

            # A live event on the subject ends a wait early; the read itself is by sequence.
            self._wake = await self.nc.subscribe(self.subject, cb=wake)
        else:
            self._pull = await js.pull_subscribe(
                self.subject, durable=self.durable, stream=STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0),
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        pull, self._pull = self._pull, None
        wake, self._wake = self._wake, None
        if not self.nc.is_closed:
            await self._ack_pending()
            for sub in (pull, wake):
                if sub is not None:
                    await sub.unsubscribe()
            await self.nc.flush()  # the server has the unsubscribe before we return

    @property
    def next_sequence(self) -> int:
        """The stream sequence the next read starts at: `from_sequence` to resume there."""
        return self._next_seq

    @property
    def last_versions(self) -> dict[str, int]:
        """The last version seen per stream (pass it as `seen` to resume)."""
        return dict(self._last)

    async def next(self, timeout: float | None = None) -> PublishedEvent:
        """The next new event; raises nats.errors.TimeoutError when none came within `timeout`."""
        assert self._js is not None, "use Subscriber as an async context manager"
        await self._ack_pending()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(0.001, deadline - loop.time())
            msg = await self._receive(left)
            if msg is None:
                continue
            event = PublishedEvent.from_message(msg)
            last = self._last.get(event.stream_id)
            if last is not None and event.version <= last:
                self.duplicates_dropped += 1
                if isinstance(msg, Msg):
                    await msg.ack()
                continue
            if last is not None and event.version > last + 1:
                gap = Gap(event.stream_id, last, event.version)
                log.warning("subscriber: %s jumped from version %d to %d",
                            gap.stream_id, gap.after_version, gap.received_version)
                self.gaps.append(gap)
            self._last[event.stream_id] = event.version
            if isinstance(msg, Msg):
                self._unacked = msg
            return event

    async def _receive(self, left: float | None) -> Msg | RawStreamMsg | None:
        """One message, or None when a wait of at most `left` seconds (or one beat) ended."""
        assert self._js is not None
        wait = self.idle_heartbeat if left is None else min(left, self.idle_heartbeat)
        if self._pull is not None:
            try:
                [msg] = await self._pull.fetch(1, timeout=wait)
                return msg
            except nats.errors.TimeoutError:
                if left is not None and left <= wait:
                    raise
                return None
            except FAILOVER_ERRORS as e:
                # The durable's position is the server's: the next fetch resumes it.
                await self._after_failover(e, left)
                return None
        self._woken.clear()  # before the read: an event relayed after it wakes the wait below
        try:
            raw = await self._js.get_msg(STREAM, seq=self._next_seq, subject=self.subject,
                                         next=True)
        except nats.js.errors.NotFoundError:
            try:
                await asyncio.wait_for(self._woken.wait(), wait)
            except TimeoutError:
                if left is not None and left <= wait:
                    raise nats.errors.TimeoutError from None
            return None
        except FAILOVER_ERRORS as e:
            await self._after_failover(e, left)
            return None  # the same sequence is read again
        assert raw.seq is not None
        self._next_seq = raw.seq + 1
        return raw

    async def _after_failover(self, error: Exception, left: float | None) -> None:
        """A pause before the read is tried again; the caller's timeout still holds."""
        log.debug("subscriber: read met a failover (%s); trying again",
                  type(error).__name__)
        if left is not None and left <= FAILOVER_PAUSE:
            raise nats.errors.TimeoutError from error
        await asyncio.sleep(FAILOVER_PAUSE)

    async def __aiter__(self) -> AsyncIterator[PublishedEvent]:
        while True:
            yield await self.next()

    async def _ack_pending(self) -> None:
        msg, self._unacked = self._unacked, None
        if msg is not None:
            await msg.ack()

