"""Followers across PostgreSQL crashes and a stop of several seconds: nothing lost, nothing twice.

The projection runner and the relay follow a steady stream of appends while the server is
killed (`pg_ctl stop -m immediate`, crash recovery on the next start) twice; they must wait the
outages out on their own and, at the end, every event is projected once and on JetStream once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import nats
import psycopg
import pytest
from psycopg import AsyncConnection

from events.errors import ConcurrencyError, StoreUnavailableError
from events.migrations import migrate
from events.relay import STREAM, Relay, Subscriber
from events.store import EventStore, RecordedEvent
from projections.runner import ProjectionRunner, default_projections
from tests.integration.events.test_relay import assert_each_once_in_version_order, receive
from tests.support import NatsServer, eventually
from tests.support.cluster import Cluster
from tests.support.synthetic import History, interleaved, make_history

DOWN_SECONDS = 12.0  # the second outage: long enough for every backoff to reach its cap


class CountingProjection:
    """Counts every event it is given, with no guard of its own: double application shows."""

    name = "counting"
    schema = "public"
    tables: ClassVar[tuple[str, ...]] = ("test_counts",)

    async def apply_batch(self, conn: AsyncConnection[Any], events: list[RecordedEvent]) -> None:
        await conn.execute(
            "insert into test_counts (stream_id, n) select s, count(*) from unnest(%s::text[]) s"
            " group by s on conflict (stream_id) do update set n = test_counts.n + excluded.n",
            ([e.stream_id for e in events],),
        )


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer.jetstream(tmp_path / "js") as server:
        yield server


async def append_through_outages(store: EventStore, histories: list[History],
                                 stop_at: asyncio.Event) -> int:
    """Append every history, one append at a time, retrying across outages; an append whose
    outcome the outage hid is checked against the stream's version, never appended twice."""
    appended = 0
    for stream, version, batch in interleaved(histories, random.Random(1)):
        while True:
            try:
                await store.append(stream, batch, version)
                break
            except StoreUnavailableError:
                await asyncio.sleep(0.2)
            except ConcurrencyError:
                # The first try landed after all (its reply was lost with the connection).
                assert await store.stream_version(stream) == version + len(batch)
                break
        appended += len(batch)
        await asyncio.sleep(0.01)  # a steady stream rather than one burst
    stop_at.set()
    return appended


async def test_runner_and_relay_deliver_every_event_once_across_two_crashes(
    cluster: Cluster, nats_server: NatsServer
) -> None:
    await migrate(cluster.url)
    async with await psycopg.AsyncConnection.connect(cluster.url, autocommit=True) as conn:
        await conn.execute("drop table if exists test_counts")
        await conn.execute("create table test_counts (stream_id text primary key, n int)")
    histories = [make_history(random.Random(400 + n)) for n in range(40)]
    store = await EventStore.open(cluster.url, max_size=6, connect_timeout=2.0)
    # Long polls: after an outage only the reconnected NOTIFY path wakes them promptly.
    runner = ProjectionRunner(store, [*default_projections(), CountingProjection()],
                              poll_interval=30.0, max_backoff=1.0)
    relay = Relay(store, nats_server.url, name="outage", poll_interval=30.0, max_backoff=1.0)
    stop = asyncio.Event()
    followers = [asyncio.create_task(runner.run(stop)), asyncio.create_task(relay.run(stop))]
    done_appending = asyncio.Event()
    try:
        appender = asyncio.create_task(append_through_outages(store, histories, done_appending))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(cluster.restart)  # a crash and an immediate start
        await asyncio.sleep(2.0)
        await asyncio.to_thread(cluster.crash)
        await asyncio.sleep(DOWN_SECONDS)  # unreachable meanwhile: connections refused
        await asyncio.to_thread(cluster.start)
        total = await asyncio.wait_for(appender, 120)
        assert not any(task.done() for task in followers), "a follower ended"

        async def counts() -> dict[str, int]:
            async with store.connection() as conn:
                cur = await conn.execute("select stream_id, n from test_counts")
                return dict(await cur.fetchall())

        expected = {h.stream_id: len(h.events) for h in histories}
        await eventually(counts, lambda seen: seen == expected, timeout=30,
                         what="every event projected once", describe=lambda seen: {
                             k: (v, expected.get(k)) for k, v in seen.items()
                             if v != expected.get(k)})
        await eventually(relay.lag, lambda lag: lag.events_behind == 0, timeout=30,
                         what="the relay caught up")
        async with store.connection() as conn:
            cur = await conn.execute("select stream_id, version from workflows")
            assert dict(await cur.fetchall()) == expected
        statuses = await runner.status()
        assert all(s.error is None for s in statuses) and runner.stopped == {}
        assert not any(task.done() for task in followers), "a follower ended"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*followers), 30)
        await store.close()
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        assert info.state.messages == total  # no copy stored twice
        async with Subscriber(nc) as sub:
            got = await receive(sub, total, timeout=30)
            assert sub.duplicates_dropped == 0
            with contextlib.suppress(nats.errors.TimeoutError):
                extra = await sub.next(timeout=0.5)
                raise AssertionError(f"more than {total} events relayed: {extra}")
    finally:
        await nc.close()
    assert_each_once_in_version_order(got, histories)


