"""The relay: every stored event to NATS JetStream in global order, resuming from a checkpoint."""

# Over ~400 lines for a reason: the publish chain, the checkpoint lock and the retry loop are one
# invariant (the checkpoint moves only over what the chain got acknowledged) and read best together.

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck
from psycopg import AsyncConnection
from psycopg.rows import tuple_row

from events.concurrency import first_of
from events.errors import EventStoreError, StoreQueryError, StoreUnavailableError
from events.relay.acks import Acks, settle
from events.relay.anchors import CHAIN_STREAM, Anchor, chain_stream_config, heads
from events.relay.servers import connect_options as server_options
from events.relay.wire import MSG_ID, STREAM, body_of, msg_id, stream_config, subject_for
from events.store import ORIGIN, Checkpoint, EventStore, RecordedEvent

log = logging.getLogger(__name__)

# JetStream stores a message carrying this header only when the stream's last stored message
# id equals it; see Relay._publish for why the relay chains its publishes with it.
EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
WRONG_LAST_MSG_ID = 10070  # JetStream API error code of a broken chain
MAX_BACKOFF = 5.0
# Seconds after a reconnect in which JetStream not answering yet is still the same outage.
JETSTREAM_SETTLE = 15.0
# After a NOTIFY, wait this long (seconds) for more: a burst of appends is one round.
COALESCE = 0.03
# Two-key advisory lock space: this class id plus hashtext(name). The migration lock uses the
# one-bigint form, which PostgreSQL keeps apart from the two-int form.
_LOCK_CLASS = 0x7265_6C79  # "rely"
# Errors meaning "NATS did not take it", as opposed to a bug in the relay.
_NATS_FAILURES = (nats.errors.Error, asyncio.TimeoutError, OSError)


class RelayUnavailableError(EventStoreError):
    """NATS or JetStream did not acknowledge a publish; nothing unacknowledged was checkpointed.

    Retry later: the relay resumes from its checkpoint and the dedupe id removes the copies.
    """


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
    PostgreSQL cannot be reached; `run` retries both until stopped. A StoreQueryError (a
    statement PostgreSQL refused) is not an outage: `run` logs it as an ERROR and backs off.
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
        coalesce: float = COALESCE,
        chain_key: bytes | None = None,
        replicas: int = 1,
        **connect_options: Any,
    ) -> None:
        if batch < 1 or window < 1 or replicas < 1:
            raise ValueError("batch, window and replicas must be >= 1")
        self._store = store
        self._nats_url = nats_url
        self._name = name
        self._batch = batch
        self._poll_interval = poll_interval
        self._window = window
        self._publish_timeout = publish_timeout
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._coalesce = coalesce
        # With a key, each acknowledged batch's stream heads are anchored in REBALANCER_CHAIN.
        self._chain_key = chain_key
        # Copies JetStream keeps of each stream: 1 on a single server, 3 on a 3-node cluster.
        self._replicas = replicas
        self._connect_options = connect_options
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._acks: Acks | None = None
        self._stream_ready = False
        self._nats_back = asyncio.Event()
        self._back_at = float("-inf")  # monotonic time NATS last came back after an outage
        # The checkpoint's own connection (see "checkpoint" below), whether it holds the lock,
        # and the checkpoint as this relay last stored it (valid while it holds the lock).
        self._session = store.session()
        self._locked = False
        self._checkpoint: Checkpoint | None = None
        # Test hook: called with each acknowledged batch before its checkpoint is written.
        self.before_checkpoint: Callable[[list[RecordedEvent]], Awaitable[None]] | None = None

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
            self._back_at = time.monotonic()
            self._nats_back.set()
            if theirs is not None:
                await theirs()

        nc = NATS()
        try:
            # With unlimited reconnects the client also retries its first connect forever;
            # bound it, so `run` stays responsive to `stop` and logs while NATS is down.
            await asyncio.wait_for(
                nc.connect(**server_options(self._nats_url), reconnected_cb=reconnected,
                           **options),
                self._connect_timeout,
            )
        except (*_NATS_FAILURES, ValueError) as e:
            await nc.close()
            raise RelayUnavailableError(f"cannot connect to NATS: {_describe(e)}") from e
        try:
            acks = await Acks.open(nc)
        except _NATS_FAILURES as e:
            await nc.close()
            raise RelayUnavailableError(f"cannot subscribe on NATS: {_describe(e)}") from e
        self._nc, self._acks = nc, acks
        self._js = nc.jetstream(timeout=self._publish_timeout)
        self._stream_ready = False
        return self._js

    async def ensure_stream(self) -> None:
        """Create the REBALANCER_EVENTS and REBALANCER_CHAIN streams, or bring existing ones
        to this configuration."""
        js = await self.connect()
        for name, config in ((STREAM, stream_config(self._replicas)),
                             (CHAIN_STREAM, chain_stream_config(self._replicas))):
            try:
                try:
                    await js.stream_info(name)
                except nats.js.errors.NotFoundError:
                    await js.add_stream(config)
                else:
                    await js.update_stream(config)
            except _NATS_FAILURES as e:
                raise RelayUnavailableError(
                    f"cannot set up stream {name}: {_describe(e)}"
                ) from e
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
        self._locked, self._checkpoint = False, None
        await self._session.close()

    @property
    def connected(self) -> bool:
        """Whether the relay holds a NATS connection that is up now (for `/readyz`)."""
        nc = self._nc
        return nc is not None and not nc.is_closed and nc.is_connected

    def _reconnecting(self) -> bool:
        """NATS is away, or came back moments ago: a restarted server's JetStream answers a
        few seconds after its clients reconnect, and that is the outage already announced."""
        nc = self._nc
        if nc is not None and not nc.is_closed and not nc.is_connected:
            return True
        return time.monotonic() - self._back_at < JETSTREAM_SETTLE

    async def _on_error(self, error: Exception) -> None:
        log.debug("relay %s: NATS: %s", self._name, _describe(error))

    async def _on_disconnected(self) -> None:
        if self._nc is None or self._nc.is_draining or self._nc.is_closed:
            return  # our own close()
        # INFO: the process's own connection says it once as a WARNING (rebalancer/api.py).
        log.info("relay %s: NATS disconnected; publishing waits for it", self._name)

    # -- publishing ------------------------------------------------------------------------

    async def relay_once(self) -> int:
        """Publish everything readable after the checkpoint; returns the events acknowledged.

        Returns 0 at once when another relay with the same name holds the checkpoint lock.
        Raises RelayUnavailableError (NATS), StoreUnavailableError (PostgreSQL away) or
        StoreQueryError (a statement refused); either way the checkpoint covers exactly the
        acknowledged prefix.
        """
        await self.connect()
        assert self._nc is not None and self._acks is not None
        if not self._nc.is_connected:
            # Reconnecting: a publish now would only wait in the client's buffer and time out.
            raise RelayUnavailableError("NATS is not connected (the client is reconnecting)")
        if not self._stream_ready:
            await self.ensure_stream()
        acks = self._acks
        if not self._session.opened:
            self._locked, self._checkpoint = False, None  # the lock died with its connection
        # A database error in here closes the session, which releases the lock for certain.
        async with self._session.connection() as conn:
            if not self._locked:
                if not await self._lock(conn):
                    log.debug("relay %s: another relay holds the checkpoint", self._name)
                    return 0
                self._locked, self._checkpoint = True, None
            try:
                return await self._relay_locked(acks, conn)
            except RelayUnavailableError:
                # NATS failed this relay: let a relay that may reach it take over meanwhile.
                await self._unlock(conn)
                raise

    async def _relay_locked(self, acks: Acks, conn: AsyncConnection[Any]) -> int:
        if self._checkpoint is None:
            self._checkpoint = await self._load_checkpoint(conn)
        total = 0
        while True:
            checkpoint = self._checkpoint
            # On the lock's own connection: a round that finds it dead stops before publishing.
            read = await self._store.read_all(checkpoint, self._batch, on=conn)
            # Re-delivery guard: never publish what the checkpoint already covers.
            events = [e for e in read if e.checkpoint > checkpoint]
            if not events:
                return total
            acked, failure = await self._publish(acks, events)
            if acked:
                done = events[:acked]
                # Anchored before the checkpoint moves: a failure here re-publishes the batch
                # (dropped as duplicates) and its anchors next round.
                await self._anchor(acks, done)
                if self.before_checkpoint is not None:
                    await self.before_checkpoint(done)
                await self._save_checkpoint(conn, checkpoint, done)
                self._checkpoint = done[-1].checkpoint
                total += acked
            if failure is None:
                if len(read) < self._batch:
                    return total  # caught up: no second read to find nothing
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
        self, acks: Acks, events: list[RecordedEvent]
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
                    await settle(*in_flight.popleft(), loop)
                    acked += 1
                headers = {MSG_ID: msg_id(event)}
                if previous is not None:
                    headers[EXPECTED_LAST_MSG_ID] = previous
                future = await acks.publish(subject_for(event), body_of(event), headers)
                in_flight.append((future, loop.time() + self._publish_timeout))
                previous = headers[MSG_ID]
            while in_flight:
                await settle(*in_flight.popleft(), loop)
                acked += 1
            return acked, None
        except _NATS_FAILURES as e:
            return acked, e
        finally:
            # Acks still owed no longer count: those events are published again next time.
            for future, _ in in_flight:
                future.cancel()

    async def _anchor(self, acks: Acks, done: list[RecordedEvent]) -> None:
        """One keyed anchor per stream of an acknowledged batch: its last event's head.

        Raises RelayUnavailableError when JetStream does not acknowledge them all.
        """
        if self._chain_key is None:
            return
        loop = asyncio.get_running_loop()
        futures: list[tuple[asyncio.Future[PubAck], float]] = []
        try:
            for event in heads(done):
                anchor = Anchor.of(event, self._chain_key)
                future = await acks.publish(anchor.subject, anchor.body(),
                                            {MSG_ID: anchor.msg_id})
                futures.append((future, loop.time() + self._publish_timeout))
            for future, deadline in futures:
                await settle(future, deadline, loop)
        except _NATS_FAILURES as e:
            raise RelayUnavailableError(
                f"JetStream did not acknowledge the chain anchors: {_describe(e)}"
            ) from e
        finally:
            for future, _ in futures:
                future.cancel()

    # -- checkpoint ------------------------------------------------------------------------

    # The checkpoint row lives on a connection of its own (the store's Session, outside the pool)
    # that holds a session advisory lock while this relay publishes, so a second relay process
    # with the same name stands by instead of publishing the same events in parallel (which
    # would break the publish chain and double the traffic). The lock is kept from one round to
    # the next, so a round costs a read and a checkpoint write, not a lock, a load and an unlock
    # too; it is given up when NATS fails this relay, so a standby that can reach NATS takes over.
    # A row lock (select ... for update)
    # would do the same but needs an open transaction, whose xid would hold the snapshot barrier
    # (docs/contracts.md §1) - and so every follower - back for as long as NATS takes to answer. The
    # session lock holds no snapshot and dies with the connection, so a crashed relay releases it.
    # The checkpoint update is also a compare-and-set on the old value, in case the lock was lost
    # with a dropped connection.

    async def _lock(self, conn: AsyncConnection[Any]) -> bool:
        cur = await conn.execute(
            "select pg_try_advisory_lock(%s, hashtext(%s))", (_LOCK_CLASS, self._name)
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _unlock(self, conn: AsyncConnection[Any]) -> None:
        self._locked, self._checkpoint = False, None
        try:
            await conn.execute(
                "select pg_advisory_unlock(%s, hashtext(%s))", (_LOCK_CLASS, self._name)
            )
        except BaseException:
            # Whatever stopped the unlock (a dead connection, a cancellation), closing the
            # session releases the lock for certain.
            await self._session.close()
            raise

    async def _load_checkpoint(self, conn: AsyncConnection[Any]) -> Checkpoint:
        cur = conn.cursor(row_factory=tuple_row)
        await cur.execute(
            "select transaction_id::text, position from relay_checkpoints where name = %s",
            (self._name,),
        )
        row = await cur.fetchone()
        if row is None:
            # The first run of this name: the compare-and-set in _save_checkpoint needs a row.
            await conn.execute(
                "insert into relay_checkpoints (name) values (%s) on conflict do nothing",
                (self._name,),
            )
            return ORIGIN
        return Checkpoint(int(row[0]), int(row[1]))

    async def _save_checkpoint(
        self, conn: AsyncConnection[Any], old: Checkpoint, done: list[RecordedEvent]
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
            self._checkpoint = None
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
        async with self._store.connection() as conn:
            cur = conn.cursor(row_factory=tuple_row)
            await cur.execute(query, params)
            return await cur.fetchall()

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Relay, then wait for NOTIFY, the poll interval or `stop`, until `stop` is set.

        NATS or PostgreSQL being down is a WARNING, retried with backoff; nothing is skipped.
        Never ends before `stop`, since a follower that stopped would end `serve` (and the
        worker): a statement PostgreSQL refuses (StoreQueryError) or any other failure is an
        ERROR with its traceback, retried with a longer backoff, so it shows in the log and
        heals once fixed. Closes the NATS connection when it returns.
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
                                # One WARNING per outage, and none while the client is
                                # reconnecting (that was announced): not one per attempt.
                                quiet = failures > 1 or self._reconnecting()
                                log.log(logging.DEBUG if quiet else logging.WARNING,
                                        "relay %s: %s; retrying in %.1fs", self._name, e, delay)
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
                            await first_of(
                                notifications.wait(self._poll_interval, coalesce=self._coalesce),
                                stop.wait(),
                            )
                except StoreUnavailableError as e:
                    failures += 1
                    delay = self._backoff(failures)
                    log.warning("relay %s: database unavailable (%s); retrying in %.1fs",
                                self._name, e, delay)
                    await first_of(asyncio.sleep(delay), stop.wait())
                except Exception as e:
                    failures += 1
                    delay = self._backoff(failures, self._max_backoff * 6)
                    sqlstate = e.sqlstate if isinstance(e, StoreQueryError) else None
                    log.error("relay %s failed (%s%s); retrying in %.1fs", self._name,
                              f"SQLSTATE {sqlstate}: " if sqlstate else "", e, delay,
                              exc_info=True)
                    await first_of(asyncio.sleep(delay), stop.wait())
        finally:
            await self.close()

    def _backoff(self, failures: int, cap: float | None = None) -> float:
        cap = self._max_backoff if cap is None else cap
        return float(min(cap, max(self._poll_interval, 0.05) * 2 ** min(failures - 1, 10)))


def _broken_chain(error: BaseException) -> bool:
    return isinstance(error, nats.js.errors.APIError) and error.err_code == WRONG_LAST_MSG_ID


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__

