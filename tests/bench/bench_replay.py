"""Replay benchmark: folding the event log into the `workflows` read model, against a raw scan.

`make bench` runs it after bench_store. Uses REBALANCER_DATABASE_URL when set, else the
embedded servers under .rebalancer-bench; works in a scratch database. BENCH_WORKFLOWS sets
the number of synthetic workflows (default 10,000, about 300,000 events).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from events.store import EventStore
from projections import workflows
from projections.runner import ProjectionRunner, default_projections, fewer_collections
from rebalancer.machines import TaskKind, task_machine, workflow_machine
from tests.bench.common import raw_scan, scratch_database, server_version
from tests.support.synthetic import make_history

WORKFLOWS = int(os.environ.get("BENCH_WORKFLOWS", "10000"))
GOAL = 0.6


async def seed(store: EventStore) -> int:
    rng = random.Random(42)
    events = 0
    semaphore = asyncio.Semaphore(4)

    async def one() -> None:
        nonlocal events
        history = make_history(rng)
        async with semaphore:
            await store.append(history.stream_id, history.events, 0)
        events += len(history.events)

    for start in range(0, WORKFLOWS, 200):
        await asyncio.gather(*(one() for _ in range(min(200, WORKFLOWS - start))))
    return events


async def fold_all(store: EventStore) -> int:
    """The fold alone, with the same GC setting the projection runner uses."""
    views: dict[str, workflows.WorkflowView | None] = defaultdict(lambda: None)
    n = 0
    with fewer_collections():
        async for event in store.iter_all(batch=2000):
            views[event.stream_id] = workflows.apply(views[event.stream_id], event)
            n += 1
    assert len(views) == WORKFLOWS
    return n


async def legality_all(store: EventStore) -> int:
    """The machines' fold of every stream (what audit does), through the flat move tables."""
    flow = workflow_machine().moves
    tasks = {kind: task_machine(kind).moves for kind in TaskKind}
    states: dict[tuple[str, int], str] = {}
    n = 0
    async for event in store.iter_all(batch=2000):
        data = event.data
        if event.type == "TaskStateChanged":
            key = (event.stream_id, data["task_index"])
            current = states.get(key, "created")
            assert current == data["source"]
            assert tasks[TaskKind(data["kind"])][(current, data["trigger"])] == data["dest"]
            states[key] = data["dest"]
        elif event.type == "WorkflowStateChanged":
            key = (event.stream_id, -1)
            current = states.get(key, "created")
            assert flow[(current, data["trigger"])] == data["dest"] and current == data["source"]
            states[key] = data["dest"]
        n += 1
    return n


async def timed(fn: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    start = time.perf_counter()
    count = await fn()
    rate = count / (time.perf_counter() - start)
    return rate, count


async def main() -> int:
    async with scratch_database() as url, await EventStore.open(url, max_size=6) as store:
        t = time.perf_counter()
        events = await seed(store)
        print(f"seeded {WORKFLOWS:,} workflows, {events:,} events in "
              f"{time.perf_counter() - t:.1f} s (PostgreSQL {server_version(url)})")
        await raw_scan(url)  # warm the cache for both sides
        raw, n = await timed(lambda: raw_scan(url))
        fold, _ = await timed(lambda: fold_all(store))
        legal, _ = await timed(lambda: legality_all(store))
        runner = ProjectionRunner(store, default_projections(), batch_size=2000)
        full, _ = await timed(runner.catch_up)
        ratio = fold / raw
        print(f"raw      server-side cursor scan            {raw:>10,.0f} events/s ({n:,})")
        print(f"fold     read + fold into workflow views    {fold:>10,.0f} events/s"
              f"  ratio {ratio:.2f} (goal >= {GOAL}) {'ok' if ratio >= GOAL else 'BELOW'}")
        print(f"legality read + machine fold (audit path)   {legal:>10,.0f} events/s"
              f"  ratio {legal / raw:.2f}")
        per = full / len(default_projections())
        print(f"rebuild  full rebuild of every read model   {per:>10,.0f} events/s"
              f"  ratio {per / raw:.2f} (each event applied to {len(default_projections())}"
              " projections)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
