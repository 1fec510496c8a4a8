"""The gap test: a follower of the global order sees every event exactly once, in stream order.

Writers append concurrently; some hold their transaction open for a while after taking a
position, so commits land out of position order, which is what makes naive readers skip.
Set GAP_TEST_RUNS to run it more often (it was run 50+ times before the scheme was trusted).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from collections import Counter, defaultdict

import psycopg
import pytest

from events.store import ORIGIN, Checkpoint, EventStore, NewEvent

WRITERS = 6
APPENDS_PER_WRITER = 300
STREAMS_PER_WRITER = 5
RUNS = int(os.environ.get("GAP_TEST_RUNS", "3"))


def _event(i: int) -> NewEvent:
    # Any decodable move: the store does not check legality, only the order of what it stores.
    return NewEvent("WorkflowStateChanged",
                    {"trigger": "start", "source": "created", "dest": "running", "reason": f"t{i}"})


async def _fast_writer(store: EventStore, rng: random.Random) -> int:
    streams = {f"workflow-{uuid.uuid4()}": 0 for _ in range(STREAMS_PER_WRITER)}
    written = 0
    for i in range(APPENDS_PER_WRITER):
        stream = rng.choice(list(streams))
        batch = [_event(i) for _ in range(rng.randint(1, 4))]
        await store.append(stream, batch, streams[stream])
        streams[stream] += len(batch)
        written += len(batch)
    return written


async def _slow_writer(url: str, rng: random.Random) -> int:
    # Takes its transaction id and positions, then sleeps before committing.
    streams = {f"workflow-{uuid.uuid4()}": 0 for _ in range(STREAMS_PER_WRITER)}
    written = 0
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for i in range(APPENDS_PER_WRITER // 3):
            stream = rng.choice(list(streams))
            n = rng.randint(1, 4)
            one = {"type": "WorkflowStateChanged", "schema_version": 1, "metadata": {},
                   "data": {"trigger": "start", "source": "created", "dest": "running",
                            "reason": f"s{i}"}}
            await conn.execute(
                "select * from append_events(%s, %s, %s::jsonb)",
                (stream, streams[stream], json.dumps([one] * n)),
            )
            await asyncio.sleep(rng.uniform(0, 0.02))
            await conn.commit()
            streams[stream] += n
            written += n
    return written


async def _follow(store: EventStore, done: asyncio.Event, rng: random.Random) -> list[tuple]:
    seen: list[tuple] = []
    checkpoint: Checkpoint = ORIGIN
    while True:
        finished = done.is_set()
        batch = await store.read_all(checkpoint, limit=rng.randint(1, 200))
        seen.extend((e.position, e.stream_id, e.version) for e in batch)
        if batch:
            checkpoint = batch[-1].checkpoint
        elif finished:
            return seen
        else:
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("run", range(RUNS))
async def test_follower_sees_every_event_exactly_once_in_stream_order(
    store: EventStore, database_url: str, run: int
) -> None:
    rng = random.Random(run)
    done = asyncio.Event()
    follower = asyncio.create_task(_follow(store, done, random.Random(run + 1000)))
    writers = [
        _fast_writer(store, random.Random(rng.random())) if i % 2 == 0
        else _slow_writer(database_url, random.Random(rng.random()))
        for i in range(WRITERS)
    ]
    written = sum(await asyncio.gather(*writers))
    done.set()
    seen = await follower

    async with store.connection() as conn:
        cur = await conn.execute("select position from events")
        stored = {row[0] for row in await cur.fetchall()}
    repeats = [p for p, n in Counter(p for p, _, _ in seen).items() if n > 1]
    assert repeats == [], f"re-delivered positions: {repeats[:10]}"
    assert len(stored) == written
    assert {p for p, _, _ in seen} == stored, "the follower skipped events"
    by_stream: dict[str, list[int]] = defaultdict(list)
    for _, stream, version in seen:
        by_stream[stream].append(version)
    for stream, versions in by_stream.items():
        assert versions == list(range(1, len(versions) + 1)), f"{stream} out of order"
