"""Projections on real PostgreSQL: exactly-once application, rebuilds, poison events, exposure."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any, ClassVar

import pytest
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from events.catalogue import TaskStateChanged
from events.store import EventStore, RecordedEvent
from projections import workflows
from projections.runner import ProjectionRunner, default_projections, reset
from tests.support import eventually
from tests.support.synthetic import History, interleaved, make_history


class SimulatedCrash(BaseException):
    """Stands for the process dying: not an Exception, so nothing may treat it as poison."""


class CountingProjection:
    """Counts every event it is given, with no guard of its own: double application shows."""

    name = "counting"
    schema = "public"
    tables: ClassVar[tuple[str, ...]] = ("test_counts",)

    async def apply_batch(self, conn: AsyncConnection[Any], events: list[RecordedEvent]) -> None:
        for event in events:
            await conn.execute(
                "insert into test_counts (stream_id, n) values (%s, 1)"
                " on conflict (stream_id) do update set n = test_counts.n + 1",
                (event.stream_id,),
            )


async def append_all(store: EventStore, histories: list[History], seed: int = 0) -> None:
    for stream, version, batch in interleaved(histories, random.Random(seed)):
        await store.append(stream, batch, version)


async def read_model(store: EventStore) -> dict[str, list[dict[str, Any]]]:
    async with store.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        out = {}
        for table, key in (("workflows", "workflow_id"), ("exposure_items",
                                                           "workflow_id, task_index")):
            await cur.execute(f"select * from {table} order by {key}")
            out[table] = await cur.fetchall()
        return out


async def test_rebuild_from_zero_equals_the_live_read_model(store: EventStore) -> None:
    rng = random.Random(7)
    histories = [make_history(rng) for _ in range(300)]
    runner = ProjectionRunner(store, default_projections(), batch_size=37)
    # Live: the runner follows while the appends arrive, in small batches.
    for i, (stream, version, batch) in enumerate(interleaved(histories, rng)):
        await store.append(stream, batch, version)
        if i % 50 == 0:
            await runner.catch_up()
    await runner.catch_up()
    live = await read_model(store)
    assert len(live["workflows"]) == 300

    await reset(store, default_projections())
    assert (await read_model(store))["workflows"] == []
    rebuilt = ProjectionRunner(store, default_projections(), batch_size=1000)
    applied = await rebuilt.catch_up()
    # Every event is applied once to each projection.
    assert applied == len(default_projections()) * sum(len(h.events) for h in histories)
    assert await read_model(store) == live


async def test_the_workflows_row_matches_folding_the_stream_by_hand(store: EventStore) -> None:
    rng = random.Random(11)
    histories = [make_history(rng) for _ in range(40)]
    await append_all(store, histories)
    await ProjectionRunner(store, default_projections()).catch_up()
    rows = {str(r["workflow_id"]): r for r in (await read_model(store))["workflows"]}
    for history in histories:
        view = workflows.fold(await store.read_stream(history.stream_id))
        assert view is not None
        row = rows[view.workflow_id]
        assert row["state"] == history.final_state == view.state
        assert [t["state"] for t in row["tasks"]] == history.task_states
        assert row["version"] == len(history.events)
        current = view.current_task
        assert row["current_task"] == (None if current is None else current.index)
        if history.final_state == "done":
            assert row["to_amount"] == Decimal(view.tasks[-1].refresh_result["result"]["amount"])


async def test_a_crash_between_read_model_write_and_checkpoint_applies_each_event_once(
    store: EventStore, owner_database_url: str,
) -> None:
    # Made by the owner, as a migration would: the service may not create tables.
    async with await AsyncConnection.connect(owner_database_url, autocommit=True) as conn:
        await conn.execute("create table test_counts (stream_id text primary key, n int)")
    rng = random.Random(3)
    histories = [make_history(rng) for _ in range(30)]
    await append_all(store, histories)

    crashing = ProjectionRunner(store, [CountingProjection()], batch_size=25)
    batches = 0

    def crash_on_the_third_batch(name: str, events: list[RecordedEvent]) -> None:
        nonlocal batches
        batches += 1
        if batches == 3:
            raise SimulatedCrash()  # the rows are written, the checkpoint is not

    crashing.before_checkpoint = crash_on_the_third_batch
    with pytest.raises(SimulatedCrash):
        await crashing.catch_up()

    # A fresh runner (the restarted process) picks up from the stored checkpoint.
    await ProjectionRunner(store, [CountingProjection()], batch_size=25).catch_up()
    async with store.connection() as conn:
        cur = await conn.execute("select stream_id, n from test_counts")
        counts = dict(await cur.fetchall())
    assert counts == {h.stream_id: len(h.events) for h in histories}


async def test_a_poison_event_stops_its_projection_naming_it_while_others_go_on(
    store: EventStore,
) -> None:
    rng = random.Random(5)
    good = make_history(rng)
    await append_all(store, [good])
    poisoned = make_history(rng)
    await store.append(poisoned.stream_id, poisoned.appends[0], 0)
    version = len(poisoned.appends[0])
    # A withdrawal entering submitting without an amount: the exposure model cannot apply it.
    bad = TaskStateChanged(task_index=1, task_name="withdraw_to_interim", kind="withdraw",
                           trigger="submit", source="created", dest="submitting",
                           request_params={"currency": "ETH"})
    await store.append(poisoned.stream_id, [bad], version)
    after = make_history(rng)
    await append_all(store, [after])

    runner = ProjectionRunner(store, default_projections())
    await runner.catch_up()
    assert set(runner.stopped) == {"exposure"}
    message = str(runner.stopped["exposure"])
    assert poisoned.stream_id in message and f"v{version + 1}" in message
    # The other projection went on past it, to the end.
    rows = (await read_model(store))["workflows"]
    assert {r["stream_id"] for r in rows} == {good.stream_id, poisoned.stream_id, after.stream_id}
    statuses = {s.name: s for s in await runner.status()}
    assert statuses["exposure"].error is not None
    assert statuses["workflows"].error is None
    # Restarting does not get past it either: the stop is recorded, not remembered in memory.
    again = ProjectionRunner(store, default_projections())
    await again.catch_up()
    assert set(again.stopped) == {"exposure"}


async def test_exposure_sums_match_the_money_the_histories_left_in_transit(
    store: EventStore,
) -> None:
    rng = random.Random(13)
    histories = [make_history(rng) for _ in range(120)]
    await append_all(store, histories)
    await ProjectionRunner(store, default_projections()).catch_up()
    expected: dict[tuple[str, str], Decimal] = {}
    for history in histories:
        for key, amount in history.in_transit.items():
            expected[key] = expected.get(key, Decimal(0)) + amount
    async with store.connection() as conn:
        cur = await conn.execute("select account, currency, amount from exposure")
        found = {(a, c): amount for a, c, amount in await cur.fetchall()}
    assert found == expected
    assert expected, "the histories should leave some money in transit"


async def test_the_runner_wakes_on_notify_without_waiting_for_its_poll(
    store: EventStore,
) -> None:
    runner = ProjectionRunner(store, default_projections(), poll_interval=60)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        # Not a wait for a result: an append before the runner listens would be caught up by
        # its first read, and the test would no longer tell a notify from a poll.
        await asyncio.sleep(0.2)
        history = make_history(random.Random(1))
        await append_all(store, [history])

        async def versions() -> list[int]:
            return [row["version"] for row in (await read_model(store))["workflows"]]

        await eventually(versions, lambda seen: seen == [len(history.events)], timeout=5,
                         what="the runner waking on notify (its poll is 60 s)")
    finally:
        stop.set()
        await asyncio.wait_for(task, 70)


def test_a_redelivered_event_is_not_applied_twice() -> None:
    history = make_history(random.Random(2))
    stream = history.stream_id
    from datetime import UTC, datetime

    recorded = [
        RecordedEvent(i + 1, 1, stream, i + 1, e.type_name, 1, e.model_dump(mode="json"), {},
                      datetime(2026, 1, 1, tzinfo=UTC), b"")
        for i, e in enumerate(history.events)
    ]
    once = workflows.fold(recorded)
    twice = workflows.fold(recorded[:5] + recorded[:5] + recorded[5:])
    assert once == twice


async def test_two_runners_on_one_projection_apply_each_event_once(
    store: EventStore, owner_database_url: str
) -> None:
    async with await AsyncConnection.connect(owner_database_url, autocommit=True) as conn:
        await conn.execute("create table test_counts (stream_id text primary key, n int)")
    rng = random.Random(17)
    histories = [make_history(rng) for _ in range(40)]
    await append_all(store, histories)
    # Two worker processes' runners racing over the same checkpoint.
    await asyncio.gather(
        ProjectionRunner(store, [CountingProjection()], batch_size=7).catch_up(),
        ProjectionRunner(store, [CountingProjection()], batch_size=11).catch_up(),
    )
    async with store.connection() as conn:
        cur = await conn.execute("select stream_id, n from test_counts")
        counts = dict(await cur.fetchall())
    assert counts == {h.stream_id: len(h.events) for h in histories}
