"""Metrics (issue 14, part 1): the counters move with a workflow on the simulated world, the
database's numbers are sampled from the read model, and `serve` exposes them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from events.migrations import migrate
from events.store import EventStore
from rebalancer.accounts import load_accounts
from rebalancer.commands import start_workflow
from rebalancer.metrics import Metrics, MetricsSampler
from rebalancer.service import serve
from rebalancer.settings import Settings
from tests.support import Worker, event_count, eventually, load, to_futures, write_world
from tests.support.scraping import scraped, total, value


async def test_counters_move_with_a_workflow_on_the_simulated_world(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={"binance-corp-sub": {"ETH": "10"}})
    # Every money move's answer is lost once: the exchange errors are counted by class.
    async with Worker(database_url, world=world, faults="lost_response=1") as worker:
        metrics = worker.engine.metrics
        sampler = MetricsSampler(store, metrics, relays=("jetstream",))
        before = scraped(metrics)
        assert total(before, "rebalancer_steps_total") == 0
        assert total(before, "rebalancer_exchange_calls_total") == 0
        workflow_id, _ = await start_workflow(
            store, to_futures(worker.accounts), {"account": "binance-corp-sub", "amount": "1.5"},
            worker.accounts)
        await sampler.sample_once()
        # Not projected yet: the schedule has it due, nobody holds it, the followers are behind.
        waiting = scraped(metrics)
        assert value(waiting, "rebalancer_schedule_backlog") == 1
        assert value(waiting, "rebalancer_projection_lag_events",
                     projection="workflows") == await event_count(store) > 0

        async def passed() -> str:
            await worker.engine.run_pass()
            return (await load(store, workflow_id)).state

        assert await eventually(passed, lambda s: s in ("done", "failed", "needs_attention"),
                                timeout=30, interval=0, what="the transfer ending") == "done"
        await sampler.sample_once()
        after = scraped(metrics)

    # Steps by kind: the workflow's own moves (created -> running -> done) and the transfer's.
    assert value(after, "rebalancer_steps_total", kind="workflow", outcome="moved") == 2
    assert value(after, "rebalancer_steps_total", kind="transfer", outcome="moved") >= 2
    assert value(after, "rebalancer_steps_total", kind="transfer", outcome="retry") >= 1
    assert value(after, "rebalancer_step_seconds_count", kind="transfer") == total(
        after, "rebalancer_steps_total", kind="transfer")
    assert value(after, "rebalancer_schedule_claims_total") >= 2
    # Exchange calls by exchange and method; the lost answer by its class.
    assert value(after, "rebalancer_exchange_calls_total", exchange="binance",
                 method="transfer") >= 1
    assert total(after, "rebalancer_exchange_errors_total", exchange="binance",
                 error="UnknownOutcomeError") >= 1
    assert value(after, "rebalancer_exchange_call_seconds_count", exchange="binance") == total(
        after, "rebalancer_exchange_calls_total", exchange="binance")
    # The database's numbers: one workflow, done; every other state 0; nothing behind but
    # the relay, which never ran here (every event is behind it).
    assert value(after, "rebalancer_workflows", state="done") == 1
    assert total(after, "rebalancer_workflows") == 1
    assert value(after, "rebalancer_workflows", state="running") == 0
    assert value(after, "rebalancer_schedule_backlog") == 0
    for projection in ("workflows", "exposure", "alerts"):
        assert value(after, "rebalancer_projection_lag_events", projection=projection) == 0
    events = await event_count(store)
    assert value(after, "rebalancer_relay_lag_events", relay="jetstream") == events > 0
    assert value(after, "rebalancer_metrics_sampled_timestamp_seconds") > 0


async def test_two_metrics_objects_never_share_a_counter() -> None:
    first, second = Metrics(), Metrics()
    first.step("trade", "moved", 0.01)
    assert value(scraped(first), "rebalancer_steps_total", kind="trade", outcome="moved") == 1
    assert total(scraped(second), "rebalancer_steps_total") == 0


async def test_serve_exposes_the_workflows_it_moved(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    await migrate(database_url)
    world = write_world(tmp_path, balances={"binance-corp-sub": {"ETH": "10"}})
    settings = Settings(sim_time_scale=1000.0, sim_world=world)
    metrics = Metrics()
    stop = asyncio.Event()
    running = asyncio.create_task(
        serve(settings, database_url, None, tick=0.05, stop=stop, metrics=metrics))
    try:
        accounts = load_accounts()
        await start_workflow(store, to_futures(accounts),
                             {"account": "binance-corp-sub", "amount": "1"}, accounts)
        # The sampler reads every 5 s: the done workflow shows within a couple of rounds.
        series = await eventually(
            lambda: scraped(metrics), lambda s: value(s, "rebalancer_workflows",
                                                      state="done") == 1,
            timeout=20, interval=0.2, what="the done workflow in /metrics",
            describe=lambda s: {k: v for k, v in s.items() if k[0] == "rebalancer_workflows"})
        assert value(series, "rebalancer_steps_total", kind="transfer", outcome="moved") >= 1
        assert value(series, "rebalancer_exchange_calls_total", exchange="binance",
                     method="transfer") == 1
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
