"""The relay against a real nats-server (JetStream) that the tests stop and start themselves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType

from events.catalogue import TaskStateChanged, WorkflowCreated, WorkflowStateChanged
from events.relay import (
    STREAM,
    PublishedEvent,
    Relay,
    RelayUnavailableError,
    Subscriber,
    body_of,
    subject_for,
)
from events.relay.anchors import CHAIN_STREAM, Anchor
from events.store import EventStore, RecordedEvent
from tests.support import NatsServer, event_count, eventually
from tests.support.synthetic import History, interleaved, make_history

OUTAGE_SECONDS = 10.5
log = logging.getLogger(__name__)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A private nats-server, so a test can take it down without disturbing the others."""
    with NatsServer.jetstream(tmp_path / "js") as server:
        yield server


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                            error_cb=_quiet)
    try:
        yield nc
    finally:
        await nc.close()


async def _quiet(error: Exception) -> None:
    log.debug("test client: %s", error)


async def append_all(store: EventStore, histories: list[History], seed: int = 0) -> int:
    appended = 0
    for stream, version, batch in interleaved(histories, random.Random(seed)):
        await store.append(stream, batch, version)
        appended += len(batch)
    return appended


async def receive(sub: Subscriber, expected: int, timeout: float) -> list[PublishedEvent]:
    got: list[PublishedEvent] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected:
        left = deadline - time.monotonic()
        assert left > 0, f"received {len(got)} of {expected} events"
        with contextlib.suppress(nats.errors.TimeoutError):
            got.append(await sub.next(timeout=min(left, 1.0)))
    return got


def assert_each_once_in_version_order(
    got: list[PublishedEvent], histories: list[History]
) -> None:
    versions: dict[str, list[int]] = defaultdict(list)
    for event in got:
        versions[event.stream_id].append(event.version)
    for history in histories:
        assert versions[history.stream_id] == list(range(1, len(history.events) + 1))
    assert set(versions) == {h.stream_id for h in histories}


async def test_task_event_lands_on_its_subject_with_dedupe_id_and_body(
    store: EventStore, nats_server: NatsServer
) -> None:
    stream_id = f"workflow-{uuid.uuid4()}"
    workflow_id = stream_id.removeprefix("workflow-")
    await store.append(stream_id, [
        WorkflowCreated(spec_name="s", spec={"tasks": []}, params={"from_amount": "10.50"},
                        command_id="c-1"),
        WorkflowStateChanged(trigger="start", source="created", dest="running"),
    ], 0, metadata={"actor": "test"})
    await store.append(stream_id, [TaskStateChanged(
        task_index=0, task_name="buy_in_source_spot", kind="trade", trigger="submit",
        source="created", dest="submitting",
        request_params={"amount": str(Decimal("0.00012345")), "client_id": "rb-1"},
    )], 2, metadata={"actor": "test"})
    async with Relay(store, nats_server.url) as relay, client(nats_server.url) as nc:
        # The stream is created on first use, with file storage and a dedupe window.
        assert await relay.relay_once() == 3
        info = await nc.jetstream().stream_info(STREAM)
        assert info.config.storage == StorageType.FILE
        assert info.config.subjects == ["rebalancer.events.>"]
        assert info.config.duplicate_window == 120
        assert info.state.messages == 3
        # The audit's outside copy: no message can be deleted or purged through the API.
        assert info.config.deny_delete and info.config.deny_purge
        # Read back raw messages, in stream order, to see subjects, headers and bodies.
        sub = await nc.jetstream().subscribe(f"rebalancer.events.{workflow_id}.>",
                                             ordered_consumer=True)
        msgs = [await sub.next_msg(timeout=5) for _ in range(3)]
    assert [m.subject for m in msgs] == [
        f"rebalancer.events.{workflow_id}._workflow.created",
        f"rebalancer.events.{workflow_id}._workflow.running",
        f"rebalancer.events.{workflow_id}.buy_in_source_spot.submitting",
    ]
    assert [m.headers and m.headers.get("Nats-Msg-Id") for m in msgs] == [
        f"{stream_id}:1", f"{stream_id}:2", f"{stream_id}:3"]
    body = json.loads(msgs[2].data)
    assert set(body) == {"position", "stream_id", "version", "type", "schema_version", "data",
                         "metadata", "recorded_at", "hash"}
    stored: RecordedEvent = (await store.read_stream(stream_id, 2))[0]
    assert body["position"] == stored.position
    assert (body["stream_id"], body["version"], body["type"], body["schema_version"]) == (
        stream_id, 3, "TaskStateChanged", 1)
    assert body["data"]["request_params"]["amount"] == "0.00012345"  # a string, never a float
    assert body["data"]["dest"] == "submitting"
    assert body["metadata"] == {"actor": "test"}
    assert body["recorded_at"] == stored.recorded_at.isoformat()
    assert body["hash"] == stored.hash.hex()


async def test_subscriber_gets_every_event_once_across_a_nats_outage(
    store: EventStore, nats_server: NatsServer
) -> None:
    histories = [make_history(random.Random(n)) for n in range(20)]
    appends = interleaved(histories, random.Random(1))
    thirds = [appends[: len(appends) // 3], appends[len(appends) // 3: 2 * len(appends) // 3],
              appends[2 * len(appends) // 3:]]
    stop = asyncio.Event()
    relay = Relay(store, nats_server.url, poll_interval=0.2, publish_timeout=1.0,
                  max_backoff=1.0, batch=50)
    # The stream must exist before a subscriber binds to it.
    await relay.ensure_stream()
    relay_task = asyncio.create_task(relay.run(stop))
    try:
        async with client(nats_server.url) as nc, Subscriber(nc, idle_heartbeat=0.5) as sub:
            # Before: a third of the appends, relayed while NATS is up.
            for stream, version, batch in thirds[0]:
                await store.append(stream, batch, version)
            before = sum(len(b) for _, _, b in thirds[0])
            got = await receive(sub, before, timeout=15)
            # Outage: NATS stops; appends go on, spread over the outage.
            nats_server.stop()
            outage_started = time.monotonic()
            pause = (OUTAGE_SECONDS - 1) / len(thirds[1])
            for stream, version, batch in thirds[1]:
                await store.append(stream, batch, version)
                await asyncio.sleep(pause)
            lag = await relay.lag()
            assert lag.events_behind == sum(len(b) for _, _, b in thirds[1])
            assert lag.oldest_unpublished_at is not None
            await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage_started)))
            outage = time.monotonic() - outage_started
            # After: the same server and store directory come back; the relay resumes alone.
            nats_server.start()
            for stream, version, batch in thirds[2]:
                await store.append(stream, batch, version)
            total = await event_count(store)
            got += await receive(sub, total - len(got), timeout=30)
            # Nothing more arrives: no late copy slips past the subscriber either.
            with pytest.raises(nats.errors.TimeoutError):
                await sub.next(timeout=1.0)
            dropped, gaps = sub.duplicates_dropped, list(sub.gaps)
    finally:
        stop.set()
        await relay_task
    assert outage >= 10
    assert len(got) == total == sum(len(h.events) for h in histories)
    assert_each_once_in_version_order(got, histories)
    assert gaps == []
    assert (await relay.lag()).events_behind == 0
    print(f"\noutage test: {total} events stored, NATS down {outage:.1f}s, {len(got)} received,"
          f" {dropped} duplicates dropped by the subscriber")


async def test_restarted_relay_loses_nothing_and_jetstream_holds_no_duplicates(
    store: EventStore, nats_server: NatsServer
) -> None:
    histories = [make_history(random.Random(100 + n)) for n in range(20)]
    total = await append_all(store, histories)
    first = Relay(store, nats_server.url, batch=25, poll_interval=0.1)
    acked_batches = 0
    crashed = asyncio.Event()

    async def crash_on_third_batch(events: list[RecordedEvent]) -> None:
        nonlocal acked_batches
        acked_batches += 1
        if acked_batches == 3:
            # Acknowledged by JetStream but not checkpointed: the new relay publishes it again.
            crashed.set()
            await asyncio.Event().wait()

    first.before_checkpoint = crash_on_third_batch
    task = asyncio.create_task(first.run(asyncio.Event()))
    await asyncio.wait_for(crashed.wait(), 10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert (await first.lag()).events_behind == total - 50
    # A new relay on the same database resumes from the checkpoint, re-publishing batch 3.
    stop = asyncio.Event()
    second = Relay(store, nats_server.url, batch=25, poll_interval=0.1)
    task = asyncio.create_task(second.run(stop))
    try:
        await eventually(second.lag, lambda lag: lag.events_behind == 0, timeout=15,
                         interval=0.1, what="the new relay catching up")
    finally:
        stop.set()
        await task
    async with client(nats_server.url) as nc:
        info = await nc.jetstream().stream_info(STREAM)
        # Nats-Msg-Id removed the re-published batch: one message per stored event.
        assert info.state.messages == total
        async with Subscriber(nc) as sub:
            got = await receive(sub, total, timeout=15)
            assert sub.duplicates_dropped == 0
    assert_each_once_in_version_order(got, histories)


async def test_stray_copy_breaks_the_publish_chain_and_subscribers_drop_it(
    store: EventStore, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    histories = [make_history(random.Random(400 + n)) for n in range(10)]
    total = await append_all(store, histories)
    first = Relay(store, nats_server.url, batch=25)
    crashed = asyncio.Event()

    async def crash_on_second_batch(events: list[RecordedEvent]) -> None:
        if events[0].position > 1:  # the second batch: acknowledged, never checkpointed
            crashed.set()
            await asyncio.Event().wait()

    first.before_checkpoint = crash_on_second_batch
    task = asyncio.create_task(first.relay_once())
    await asyncio.wait_for(crashed.wait(), 10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await first.close()
    # A copy of the very first event arrives with its dedupe entry long gone (e.g. an old
    # re-publish): JetStream stores it, and its last message is no longer the relay's.
    oldest = (await store.read_all(limit=1))[0]
    async with client(nats_server.url) as nc:
        await nc.jetstream().publish(
            subject_for(oldest), body_of(oldest), headers={"Nats-Msg-Id": "stray-copy"})
    # The new relay re-publishes the tail (duplicates), then its chained publish after it
    # meets the stray copy; it restarts the chain from the acknowledged prefix by itself.
    caplog.set_level(logging.INFO, logger="events.relay")
    async with Relay(store, nats_server.url, batch=40) as second:
        assert await second.relay_once() == total - 25
        assert (await second.lag()).events_behind == 0
    assert any("chain restarted" in r.getMessage() for r in caplog.records)
    async with client(nats_server.url) as nc:
        info = await nc.jetstream().stream_info(STREAM)
        assert info.state.messages == total + 1
        async with Subscriber(nc) as sub:
            got = await receive(sub, total, timeout=15)
            with pytest.raises(nats.errors.TimeoutError):
                await sub.next(timeout=0.5)
            assert sub.duplicates_dropped == 1
            assert sub.gaps == []
    assert_each_once_in_version_order(got, histories)


async def test_two_relays_on_one_checkpoint_publish_each_event_once(
    store: EventStore, nats_server: NatsServer
) -> None:
    histories = [make_history(random.Random(200 + n)) for n in range(20)]
    stop = asyncio.Event()
    relays = [Relay(store, nats_server.url, batch=20, poll_interval=0.05) for _ in range(2)]
    tasks = [asyncio.create_task(r.run(stop)) for r in relays]
    try:
        # Both follow the same appends; the advisory lock lets one publish a batch at a time.
        total = await append_all(store, histories, seed=3)
        await eventually(relays[0].lag, lambda lag: lag.events_behind == 0, timeout=15,
                         interval=0.1, what="the relays catching up")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    async with client(nats_server.url) as nc:
        info = await nc.jetstream().stream_info(STREAM)
        assert info.state.messages == total
        # A durable consumer this time: what it has been given is acknowledged, so reopening
        # it (with the versions it kept) delivers nothing again.
        async with Subscriber(nc, durable="audit") as sub:
            got = await receive(sub, total, timeout=15)
            assert sub.duplicates_dropped == 0
            seen = sub.last_versions
        async with Subscriber(nc, durable="audit", seen=seen) as again:
            with pytest.raises(nats.errors.TimeoutError):
                await again.next(timeout=1.0)
        assert (await nc.jetstream().consumer_info(STREAM, "audit")).num_ack_pending == 0
    assert_each_once_in_version_order(got, histories)


async def test_checkpoint_never_passes_an_unacknowledged_event(
    store: EventStore, nats_server: NatsServer
) -> None:
    histories = [make_history(random.Random(300 + n)) for n in range(3)]
    async with Relay(store, nats_server.url, publish_timeout=0.5) as relay:
        await append_all(store, histories[:2])
        published = await relay.relay_once()
        assert published == sum(len(h.events) for h in histories[:2])
        checkpoint = await relay.checkpoint()
        # NATS goes away; events appended now cannot be acknowledged.
        nats_server.stop()
        await append_all(store, histories[2:])
        with pytest.raises(RelayUnavailableError):
            await relay.relay_once()
        assert await relay.checkpoint() == checkpoint
        assert (await relay.lag()).events_behind == len(histories[2].events)
        # A relay starting while NATS is down says so promptly, and moves nothing either.
        async with Relay(store, nats_server.url, connect_timeout=1.0) as fresh:
            with pytest.raises(RelayUnavailableError):
                await fresh.relay_once()
        assert await relay.checkpoint() == checkpoint
        # Back again: the same relay publishes exactly the rest.
        nats_server.start()
        # The first call that reaches NATS again must publish exactly the rest.
        published = await eventually(relay.relay_once, lambda _: True, timeout=15,
                                     interval=0.25, ignoring=(RelayUnavailableError,),
                                     what="NATS coming back")
        assert published == len(histories[2].events)
        assert (await relay.lag()).events_behind == 0
        assert await relay.checkpoint() > checkpoint
    async with client(nats_server.url) as nc:
        info = await nc.jetstream().stream_info(STREAM)
        assert info.state.messages == sum(len(h.events) for h in histories)


async def test_with_a_key_each_batch_anchors_every_stream_head_once(
    store: EventStore, nats_server: NatsServer
) -> None:
    rng = random.Random(31)
    histories = [make_history(rng) for _ in range(3)]
    for stream, version, batch in interleaved(histories, rng):
        await store.append(stream, batch, version)
    key = bytes(range(32))
    async with Relay(store, nats_server.url, batch=10_000, chain_key=key) as relay, \
            client(nats_server.url) as nc:
        await relay.relay_once()
        heads = {h.stream_id: (await store.read_stream(h.stream_id))[-1] for h in histories}
        # One more event in one stream: the next batch anchors that stream alone.
        first = histories[0]
        version = await store.stream_version(first.stream_id)
        await store.append(first.stream_id, [WorkflowStateChanged(
            trigger="pause", source="running", dest="paused", reason=None)], version)
        await relay.relay_once()
        js = nc.jetstream()
        info = await js.stream_info(CHAIN_STREAM)
        assert info.config.deny_delete and info.config.deny_purge
        assert info.state.messages == 4
        sub = await js.subscribe("rebalancer.chain.>", ordered_consumer=True)
        anchors = [Anchor.from_body((await sub.next_msg(timeout=5)).data) for _ in range(4)]
    assert sorted(a.stream_id for a in anchors[:3]) == sorted(heads)
    assert anchors[3].stream_id == first.stream_id and anchors[3].version == version + 1
    for anchor in anchors:
        assert anchor.verifies(key) and not anchor.verifies(bytes(32))
    for anchor in anchors[:3]:
        head = heads[anchor.stream_id]
        assert (anchor.version, anchor.position, anchor.hash, anchor.recorded_at) == (
            head.version, head.position, head.hash.hex(), head.recorded_at.isoformat())
