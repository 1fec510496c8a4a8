"""Relay: every stored event to NATS JetStream in global order, resuming from a checkpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from psycopg.rows import tuple_row

from events.concurrency import first_of
from events.errors import EventStoreError, StoreUnavailableError
from events.store import ORIGIN, SESSION_OPTIONS, Checkpoint, EventStore, RecordedEvent

log = logging.getLogger(__name__)

STREAM = "REBALANCER_EVENTS"  # contract (DESIGN.md §5)
SUBJECT_PREFIX = "rebalancer.events"
SUBJECTS = f"{SUBJECT_PREFIX}.>"
MSG_ID = "Nats-Msg-Id"
# JetStream stores a message carrying this header only when the stream's last stored message
# id equals it; see Relay._publish for why the relay chains its publishes with it.
EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
WRONG_LAST_MSG_ID = 10070  # JetStream API error code of a broken chain
DUPLICATE_WINDOW = 120.0  # seconds; a re-publish after a crash normally lands well within it
MAX_AGE = 365 * 24 * 3600.0  # seconds; JetStream is a copy, the store keeps everything anyway
MAX_BACKOFF = 5.0
# Two-key advisory lock space: this class id plus hashtext(name). The migration lock uses the
# one-bigint form, which PostgreSQL keeps apart from the two-int form.
_LOCK_CLASS = 0x7265_6C79  # "rely"
_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
# Errors meaning "NATS did not take it", as opposed to a bug in the relay.
_NATS_FAILURES = (nats.errors.Error, asyncio.TimeoutError, OSError)


class RelayUnavailableError(EventStoreError):
    """NATS or JetStream did not acknowledge a publish; nothing unacknowledged was checkpointed.

    Retry later: the relay resumes from its checkpoint and the dedupe id removes the copies.
    """


# -- subjects and bodies ---------------------------------------------------------------------


def subject_for(event: RecordedEvent) -> str:
    """`rebalancer.events.<workflow_id>.<task_name|_workflow>.<dest_state>` (DESIGN.md §5).

    Characters that are not valid in a subject token (`.`, `*`, `>`, white space) become `_`:
    the subject only routes, the body carries the facts, and a relay that refused an event
    would hold every later one back. A type outside the catalogue's three lands on
    `_workflow.<type in lower case>`.
    """
    workflow_id = event.stream_id.removeprefix("workflow-")
    data = event.data
    if event.type == "TaskStateChanged":
        what, state = str(data.get("task_name")), str(data.get("dest"))
    elif event.type == "WorkflowStateChanged":
        what, state = "_workflow", str(data.get("dest"))
    elif event.type == "WorkflowCreated":
        what, state = "_workflow", "created"
    else:
        what, state = "_workflow", event.type.lower()
    return ".".join((SUBJECT_PREFIX, _token(workflow_id), _token(what), _token(state)))


def _token(text: str) -> str:
    return _TOKEN.sub("_", text) or "_"


def body_of(event: RecordedEvent) -> bytes:
    """The stored event as JSON (DESIGN.md §5); amounts are already strings in stored data."""
    body = {
        "position": event.position,
        "stream_id": event.stream_id,
        "version": event.version,
        "type": event.type,
        "schema_version": event.schema_version,
        "data": event.data,
        "metadata": event.metadata,
        "recorded_at": event.recorded_at.isoformat(),
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def msg_id(event: RecordedEvent) -> str:
    """The JetStream dedupe id: `<stream_id>:<version>`, unique per stored event."""
    return f"{event.stream_id}:{event.version}"


def stream_config() -> StreamConfig:
    """The REBALANCER_EVENTS stream: file storage, a dedupe window, long retention."""
    return StreamConfig(
        name=STREAM,
        description="Every stored rebalancer event, in global order (published by the relay)",
        subjects=[SUBJECTS],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=MAX_AGE,
        duplicate_window=DUPLICATE_WINDOW,
    )


# -- the relay -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayLag:
    """How far the relay is behind the store (for the `relay_lag` alert)."""

    events_behind: int
    oldest_unpublished_at: datetime | None


class Relay:
    """Publishes every stored event to JetStream in global order, at least once.

    The checkpoint (table relay_checkpoints, one row per `name`) moves only over events that
    JetStream acknowledged, so a crash or an outage re-publishes at most the unacknowledged tail,
    and `Nats-Msg-Id` makes JetStream drop those copies. `relay_once` raises
    RelayUnavailableError when NATS does not acknowledge and StoreUnavailableError when
    PostgreSQL cannot be reached; `run` retries both until stopped.
    """

    def __init__(
        self,
        store: EventStore,
        nats_url: str | list[str],
        *,
        name: str = "jetstream",
        batch: int = 500,
        poll_interval: float = 1.0,
        window: int = 256,
        publish_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        max_backoff: float = MAX_BACKOFF,
        **connect_options: Any,
    ) -> None:
        if batch < 1 or window < 1:
            raise ValueError("batch and window must be >= 1")
        self._store = store
        self._nats_url = nats_url
        self._name = name
        self._batch = batch
        self._poll_interval = poll_interval
        self._window = window
        self._publish_timeout = publish_timeout
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._connect_options = connect_options
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._acks: _Acks | None = None
        self._stream_ready = False
        self._nats_back = asyncio.Event()
        self._lock_conn: psycopg.AsyncConnection[Any] | None = None
        # Test hook: called with each acknowledged batch before its checkpoint is written.
        self.before_checkpoint: Callable[[list[RecordedEvent]], Awaitable[None]] | None = None

    @property
    def name(self) -> str:
        return self._name

    async def __aenter__(self) -> Relay:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- NATS ------------------------------------------------------------------------------

    async def connect(self) -> JetStreamContext:
        """The JetStream context, connecting first if needed; raises RelayUnavailableError."""
        if self._nc is not None and self._js is not None and not self._nc.is_closed:
            return self._js
        options: dict[str, Any] = {
            "name": f"rebalancer-relay-{self._name}",
            "max_reconnect_attempts": -1,  # an outage of any length: wait, never give up
            "reconnect_time_wait": 0.5,
            "connect_timeout": max(1, int(self._connect_timeout / 2)),
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            **self._connect_options,
        }
        theirs = options.pop("reconnected_cb", None)

        async def reconnected() -> None:
            log.info("relay %s: NATS is back", self._name)
            self._nats_back.set()
            if theirs is not None:
                await theirs()

        nc = NATS()
        try:
            # With unlimited reconnects the client also retries its first connect forever;
            # bound it, so `run` stays responsive to `stop` and logs while NATS is down.
            await asyncio.wait_for(
                nc.connect(self._nats_url, reconnected_cb=reconnected, **options),
                self._connect_timeout,
            )
        except (*_NATS_FAILURES, ValueError) as e:
            await nc.close()
            raise RelayUnavailableError(f"cannot connect to NATS: {_describe(e)}") from e
        try:
            acks = await _Acks.open(nc)
        except _NATS_FAILURES as e:
            await nc.close()
            raise RelayUnavailableError(f"cannot subscribe on NATS: {_describe(e)}") from e
        self._nc, self._acks = nc, acks
        self._js = nc.jetstream(timeout=self._publish_timeout)
        self._stream_ready = False
        return self._js

    async def ensure_stream(self) -> None:
        """Create the REBALANCER_EVENTS stream, or bring an existing one to this configuration."""
        js = await self.connect()
        config = stream_config()
        try:
            try:
                await js.stream_info(STREAM)
            except nats.js.errors.NotFoundError:
                await js.add_stream(config)
            else:
                await js.update_stream(config)
        except _NATS_FAILURES as e:
            raise RelayUnavailableError(f"cannot set up stream {STREAM}: {_describe(e)}") from e
        self._stream_ready = True

    async def close(self) -> None:
        """Drain the NATS connection and release the checkpoint connection."""
        nc, self._js, self._acks = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except _NATS_FAILURES:
                await nc.close()
        self._nc = None
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            await conn.close()

    async def _on_error(self, error: Exception) -> None:
        log.debug("relay %s: NATS: %s", self._name, _describe(error))

    async def _on_disconnected(self) -> None:
        if self._nc is None or self._nc.is_draining or self._nc.is_closed:
            return  # our own close()
        log.warning("relay %s: NATS disconnected; publishing waits for it", self._name)

    # -- publishing ------------------------------------------------------------------------

    async def relay_once(self) -> int:
        """Publish everything readable after the checkpoint; returns the events acknowledged.

        Returns 0 at once when another relay with the same name holds the checkpoint lock.
        Raises RelayUnavailableError (NATS) or StoreUnavailableError (PostgreSQL); either way
        the checkpoint covers exactly the acknowledged prefix.
        """
        await self.connect()
        assert self._nc is not None and self._acks is not None
        if not self._nc.is_connected:
            # Reconnecting: a publish now would only wait in the client's buffer and time out.
            raise RelayUnavailableError("NATS is not connected (the client is reconnecting)")
        if not self._stream_ready:
            await self.ensure_stream()
        acks = self._acks
        conn = await self._checkpoint_connection()
        try:
            if not await self._lock(conn):
                log.debug("relay %s: another relay holds the checkpoint", self._name)
                return 0
            try:
                return await self._relay_locked(acks, conn)
            finally:
                await self._unlock(conn)
        except psycopg.Error as e:
            await self._drop_checkpoint_connection()
            raise StoreUnavailableError(f"relay checkpoint: {_describe(e)}") from e

    async def _relay_locked(self, acks: _Acks, conn: psycopg.AsyncConnection[Any]) -> int:
        checkpoint = await self._load_checkpoint(conn)
        total = 0
        while True:
            events = await self._store.read_all(checkpoint, self._batch)
            # Re-delivery guard: never publish what the checkpoint already covers.
            events = [e for e in events if e.checkpoint > checkpoint]
            if not events:
                return total
            acked, failure = await self._publish(acks, events)
            if acked:
                done = events[:acked]
                if self.before_checkpoint is not None:
                    await self.before_checkpoint(done)
                await self._save_checkpoint(conn, checkpoint, done)
                checkpoint = done[-1].checkpoint
                total += acked
            if failure is None:
                continue
            if _broken_chain(failure) and acked:
                # JetStream held a different last message than the one this publish followed
                # (see _publish); the next round starts unchained from the acknowledged prefix.
                log.info("relay %s: publish chain restarted at position %d",
                         self._name, events[acked].position)
                continue
            raise RelayUnavailableError(
                f"JetStream did not acknowledge {events[acked].type} {msg_id(events[acked])}"
                f" (position {events[acked].position}): {_describe(failure)}"
            ) from failure

    async def _publish(
        self, acks: _Acks, events: list[RecordedEvent]
    ) -> tuple[int, BaseException | None]:
        """Publish `events` with up to `window` acks in flight; returns the acknowledged prefix
        length and the failure that ended it (None when all were acknowledged).

        Several publishes in flight could be stored out of order: one lost with a broken
        connection while a later one, still in the client's buffer, goes out after the
        reconnect. Subscribers drop an older version arriving after a newer one, so it would be
        lost to them. Hence each publish after the first names its predecessor in
        Nats-Expected-Last-Msg-Id, and JetStream stores it only right behind that one. As
        JetStream checks the dedupe id before that header, re-publishing a tail it already
        holds is acknowledged as duplicates. The first publish of a call is unchained: the
        chain keeps what JetStream holds a prefix of the global order, and the checkpoint is
        inside that prefix, so the first event after it is either a duplicate or the next one.
        A chain that breaks anyway (a stray message in the stream, a dedupe entry expired
        mid-tail) fails with WRONG_LAST_MSG_ID and the caller starts a new call from there.
        """
        loop = asyncio.get_running_loop()
        in_flight: deque[tuple[asyncio.Future[PubAck], float]] = deque()
        acked = 0
        previous: str | None = None
        try:
            for event in events:
                if len(in_flight) >= self._window:
                    await _settle(*in_flight.popleft(), loop)
                    acked += 1
                headers = {MSG_ID: msg_id(event)}
                if previous is not None:
                    headers[EXPECTED_LAST_MSG_ID] = previous
                future = await acks.publish(subject_for(event), body_of(event), headers)
                in_flight.append((future, loop.time() + self._publish_timeout))
                previous = headers[MSG_ID]
            while in_flight:
                await _settle(*in_flight.popleft(), loop)
                acked += 1
            return acked, None
        except _NATS_FAILURES as e:
            return acked, e
        finally:
            # Acks still owed no longer count: those events are published again next time.
            for future, _ in in_flight:
                future.cancel()

    # -- checkpoint ------------------------------------------------------------------------

    # The checkpoint row lives on a connection of its own that holds a session advisory lock
    # while a batch is published, so a second relay process with the same name waits its turn
    # instead of publishing the same events in parallel (which would break the publish chain
    # and double the traffic). A row lock (select ... for update) would do the same but needs
    # an open transaction, whose xid would hold the snapshot barrier (DESIGN.md §3) - and so
    # every follower - back for as long as NATS takes to answer. The session lock holds no
    # snapshot and dies with the connection, so a crashed relay releases it. The checkpoint
    # update is also a compare-and-set on the old value, in case the lock was lost with a
    # dropped connection.

    async def _checkpoint_connection(self) -> psycopg.AsyncConnection[Any]:
        if self._lock_conn is None or self._lock_conn.closed:
            conninfo = self._store.pool.conninfo
            try:
                self._lock_conn = await psycopg.AsyncConnection.connect(
                    conninfo if isinstance(conninfo, str) else "",
                    autocommit=True, options=SESSION_OPTIONS,
                )
                await self._lock_conn.execute(
                    "insert into relay_checkpoints (name) values (%s) on conflict do nothing",
                    (self._name,),
                )
            except psycopg.Error as e:
                await self._drop_checkpoint_connection()
                raise StoreUnavailableError(f"relay checkpoint: {_describe(e)}") from e
        return self._lock_conn

    async def _drop_checkpoint_connection(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            await conn.close()

    async def _lock(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        cur = await conn.execute(
            "select pg_try_advisory_lock(%s, hashtext(%s))", (_LOCK_CLASS, self._name)
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _unlock(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await conn.execute(
                "select pg_advisory_unlock(%s, hashtext(%s))", (_LOCK_CLASS, self._name)
            )
        except BaseException:
            # Whatever stopped the unlock (a dead connection, a cancellation), closing the
            # session releases the lock for certain.
            await self._drop_checkpoint_connection()
            raise

    async def _load_checkpoint(self, conn: psycopg.AsyncConnection[Any]) -> Checkpoint:
        cur = conn.cursor(row_factory=tuple_row)
        await cur.execute(
            "select transaction_id::text, position from relay_checkpoints where name = %s",
            (self._name,),
        )
        row = await cur.fetchone()
        return Checkpoint(int(row[0]), int(row[1])) if row else ORIGIN

    async def _save_checkpoint(
        self, conn: psycopg.AsyncConnection[Any], old: Checkpoint, done: list[RecordedEvent]
    ) -> None:
        new = done[-1].checkpoint
        cur = await conn.execute(
            "update relay_checkpoints set transaction_id = %s::text::xid8, position = %s,"
            " published = published + %s, updated_at = now()"
            " where name = %s and transaction_id = %s::text::xid8 and position = %s",
            (str(new.transaction_id), new.position, len(done), self._name,
             str(old.transaction_id), old.position),
        )
        if cur.rowcount != 1:
            raise RelayUnavailableError(
                f"relay {self._name}: the checkpoint moved under this relay (lock lost?)"
            )

    async def checkpoint(self) -> Checkpoint:
        """The stored checkpoint (ORIGIN before the first publish)."""
        rows = await self._query(
            "select transaction_id::text, position from relay_checkpoints where name = %s",
            (self._name,),
        )
        return Checkpoint(int(rows[0][0]), int(rows[0][1])) if rows else ORIGIN

    async def lag(self) -> RelayLag:
        """Events stored after the checkpoint (readable or not yet) and the oldest one's time."""
        rows = await self._query(
            "select count(*), min(e.recorded_at) from events e"
            " where (e.transaction_id, e.position) > ("
            "  coalesce((select transaction_id from relay_checkpoints where name = %s), '0'),"
            "  coalesce((select position from relay_checkpoints where name = %s), 0))",
            (self._name, self._name),
        )
        return RelayLag(int(rows[0][0]), rows[0][1])

    async def _query(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            async with self._store.pool.connection() as conn:
                cur = conn.cursor(row_factory=tuple_row)
                await cur.execute(query, params)
                return await cur.fetchall()
        except psycopg.Error as e:
            raise StoreUnavailableError(f"relay: {_describe(e)}") from e

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Relay, then wait for NOTIFY, the poll interval or `stop`, until `stop` is set.

        NATS or PostgreSQL being down is logged and retried with backoff; nothing is skipped.
        Closes the NATS connection when it returns.
        """
        failures = 0
        try:
            while not stop.is_set():
                try:
                    async with self._store.listen() as notifications:
                        while not stop.is_set():
                            try:
                                published = await self.relay_once()
                            except RelayUnavailableError as e:
                                failures += 1
                                delay = self._backoff(failures)
                                log.warning("relay %s: %s; retrying in %.1fs",
                                            self._name, e, delay)
                                self._stream_ready = False
                                self._nats_back.clear()
                                # Appends keep NOTIFYing during an outage: sleep through them,
                                # but wake when the client reports NATS is back.
                                await first_of(asyncio.sleep(delay), self._nats_back.wait(),
                                                stop.wait())
                                continue
                            if failures:
                                log.info("relay %s: publishing again", self._name)
                                failures = 0
                            if published:
                                log.debug("relay %s: published %d", self._name, published)
                            await first_of(notifications.wait(self._poll_interval),
                                            stop.wait())
                except (StoreUnavailableError, psycopg.OperationalError) as e:
                    failures += 1
                    delay = self._backoff(failures)
                    log.warning("relay %s: database unavailable (%s); retrying in %.1fs",
                                self._name, e, delay)
                    await first_of(asyncio.sleep(delay), stop.wait())
        finally:
            await self.close()

    def _backoff(self, failures: int) -> float:
        return float(min(self._max_backoff, self._poll_interval * 2 ** min(failures - 1, 10)))


class _Acks:
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
    async def open(cls, nc: NATS) -> _Acks:
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


async def _settle(future: asyncio.Future[PubAck], deadline: float,
                  loop: asyncio.AbstractEventLoop) -> PubAck:
    # wait_for cancels the future on timeout, which frees its slot in the client.
    return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))


def _broken_chain(error: BaseException) -> bool:
    return isinstance(error, nats.js.errors.APIError) and error.err_code == WRONG_LAST_MSG_ID


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# -- subscribing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishedEvent:
    """One relayed event as a subscriber sees it (the body of DESIGN.md §5 plus its subject)."""

    position: int
    stream_id: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime
    subject: str

    @classmethod
    def from_message(cls, msg: Msg) -> PublishedEvent:
        body = json.loads(msg.data)
        return cls(
            position=int(body["position"]),
            stream_id=str(body["stream_id"]),
            version=int(body["version"]),
            type=str(body["type"]),
            schema_version=int(body["schema_version"]),
            data=dict(body["data"]),
            metadata=dict(body["metadata"]),
            recorded_at=datetime.fromisoformat(body["recorded_at"]),
            subject=msg.subject,
        )


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


__all__ = [
    "STREAM",
    "SUBJECTS",
    "Gap",
    "PublishedEvent",
    "Relay",
    "RelayLag",
    "RelayUnavailableError",
    "Subscriber",
    "body_of",
    "msg_id",
    "stream_config",
    "subject_for",
]
