"""Several workers on one database, and a worker that lost an exchange's answer.

Two engines (two owners, each with its own store and world connection, as two processes would
have) drive twenty built-in-path workflows at once: every one ends done, every stream is legal, and
no intent was executed twice. Then a withdrawal's response is lost (or the call never lands):
the task stays `submitting`, and the next step asks the exchange before sending anything again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from events.store import EventStore
from rebalancer.audit import audit
from rebalancer.commands import start_workflow
from rebalancer.exchanges.base import OrderRequest, OrderType, Side
from rebalancer.specs.loading import builtin_specs
from rebalancer.workflow import Workflow, client_id
from tests.support import (
    MONEY_MOVES,
    SEED_PARAMS,
    SEED_SPEC,
    Worker,
    eventually,
    intents,
    load,
    operations,
    withdraw_once,
    write_world,
)
from tests.support.faults import fault_counter, seed_hitting

D = Decimal
SCALE = 1000.0
WORKFLOWS = 20
# 200,000 KRW buys about 0.05 ETH; 100,000 would leave 0.015 ETH after Upbit's 0.01 ETH fee,
# below its 0.02 ETH withdrawal minimum (the workflow would rightly fail).
AMOUNT = "200000"
# The built-in path's TWAP waits 2 s between slices; a clock that far ahead lets the slices go at
# once here (test_chain checks the spacing with a true clock).
TWAP_INTERVAL = timedelta(seconds=2)


def ahead() -> datetime:
    return datetime.now(UTC) + TWAP_INTERVAL


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """USDT on binance-personal, so it can buy the ETH it withdraws."""
    return write_world(
        tmp_path_factory.mktemp("world"), balances={"binance-personal": {"USDT": "1000"}}
    )


async def test_two_workers_drive_twenty_workflows_to_done_without_executing_twice(
    database_url: str, store: EventStore
) -> None:
    spec = builtin_specs()[SEED_SPEC]
    async with (
        # Each takes at most five at a time, so neither can hold all twenty.
        Worker(database_url, owner="worker-a", clock=ahead, concurrency=5) as first,
        Worker(database_url, owner="worker-b", clock=ahead, concurrency=5) as second,
    ):
        ids = [
            (await start_workflow(store, spec, {**SEED_PARAMS, "from_amount": AMOUNT},
                                  first.accounts))[0]
            for _ in range(WORKFLOWS)
        ]
        stop = asyncio.Event()

        async def drive(worker: Worker) -> Counter[str]:
            outcomes: Counter[str] = Counter()
            while not stop.is_set():
                outcomes.update(await worker.engine.run_pass())
                await asyncio.sleep(0.002)
            return outcomes

        async def all_flows() -> list[Workflow]:
            return [await load(store, w) for w in ids]

        def ended(flows: list[Workflow]) -> bool:
            return all(f.state in ("done", "failed", "needs_attention") for f in flows)

        def where(flows: list[Workflow]) -> Counter[str]:
            return Counter(
                f"{f.state} at {f.current.name} {f.current.state}" if f.current else f.state
                for f in flows
            )

        drivers = [asyncio.create_task(drive(w)) for w in (first, second)]
        try:
            flows = await eventually(all_flows, ended, timeout=40, interval=0.1,
                                     what="every workflow ending", describe=where)
        finally:
            stop.set()
            outcomes = await asyncio.gather(*drivers)

        # Every workflow is done.
        assert [f.state for f in flows] == ["done"] * WORKFLOWS, [
            f.reason for f in flows if f.state != "done"
        ]
        # Both workers moved workflows (the events name who appended them).
        assert all(o["moved"] > 0 for o in outcomes), outcomes
        streams = [await store.read_stream(f"workflow-{w}") for w in ids]
        actors = {e.metadata.get("actor") for stream in streams for e in stream}
        assert {"worker-a", "worker-b"} <= actors

        # Every stream is legal: hash chains and machine moves.
        report = await audit(store)
        assert report.ok, [f.line() for f in report.findings]
        assert report.streams == WORKFLOWS

        # No intent executed twice, none lost, and one of each move per workflow.
        stored = await intents(database_url)
        client_ids = Counter(i["client_id"] for i in stored)
        assert all(n == 1 for n in client_ids.values()), client_ids.most_common(3)
        executed = await operations(database_url, *MONEY_MOVES)
        refs = Counter(op["audit_ref"] for op in executed)
        assert all(n == 1 for n in refs.values()), refs.most_common(3)
        assert set(refs) == set(client_ids)
        assert Counter(op["kind"] for op in executed) == {
            "order": 5 * WORKFLOWS,  # four TWAP slices and one sell each
            "withdraw": 2 * WORKFLOWS,
            "master_transfer": WORKFLOWS,
            "transfer": WORKFLOWS,
        }
        ok, totals = await first.world.check()
        assert ok, totals


# -- a lost answer ------------------------------------------------------------------------------

ROUTES = {
    # Binance keeps our withdrawOrderId: reconciled by client id.
    "binance_by_client_id": (
        "binance-personal",
        "binance-corp-master",
        OrderRequest("funding-1", "ETH/USDT", Side.BUY, OrderType.MARKET, amount=D("0.25")),
    ),
    # Upbit takes no client id: reconciled by currency, amount, address and time.
    "upbit_by_history": (
        "upbit-personal",
        "binance-personal",
        OrderRequest("funding-1", "ETH/KRW", Side.BUY, OrderType.MARKET,
                     quote_amount=D(1_000_000)),
    ),
}


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
async def test_lost_withdraw_response_is_reconciled_without_a_second_withdrawal(
    database_url: str, store: EventStore, world_file: Path, route: tuple[str, str, OrderRequest]
) -> None:
    source, dest, funding = route
    async with (
        Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as healthy,
        # Every money-moving call of this one executes, but its answer never arrives.
        Worker(database_url, world=world_file, time_scale=SCALE, owner="lossy",
               faults="lost_response=1.0") as lossy,
    ):
        await healthy.world.for_account(source).create_order(funding)
        workflow_id, _ = await start_workflow(
            store, withdraw_once(healthy.accounts),
            {"from_account": source, "to_account": dest, "amount": "0.2"}, healthy.accounts,
        )
        intent_id = client_id(workflow_id, 0, 1)
        assert await lossy.step(workflow_id) == "moved"  # the workflow starts

        # The intent is stored, the withdrawal executes, the answer is lost.
        assert await lossy.step(workflow_id) == "retry"
        withdrawal = (await load(store, workflow_id)).tasks[0]
        assert withdrawal.state == "submitting"
        assert (withdrawal.request_params or {})["client_id"] == intent_id
        assert withdrawal.request_result is None
        [landed] = await operations(database_url, "withdraw")
        assert landed["audit_ref"] == intent_id

        # The next step (another worker) asks the exchange and finds it: no second withdrawal.
        events = await healthy.step_until_moved(workflow_id)
        assert [(e.data["trigger"], e.data["dest"]) for e in events] == [("accept", "requested")]
        withdrawal = (await load(store, workflow_id)).tasks[0]
        assert (withdrawal.request_result or {})["id"] == str(landed["id"])
        assert [op["id"] for op in await operations(database_url, "withdraw")] == [landed["id"]]

        # It is followed to the end as if nothing had happened.
        while (flow := await load(store, workflow_id)).state == "running":
            await healthy.step_until_moved(workflow_id)
        assert flow.state == "done"
        assert [op["id"] for op in await operations(database_url, "withdraw")] == [landed["id"]]
        assert [e.data["trigger"] for e in await store.read_stream(f"workflow-{workflow_id}")
                if e.data.get("task_name")] == ["submit", "accept", "progress", "complete"]
        ok, totals = await healthy.world.check()
        assert ok, totals


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
async def test_withdraw_that_never_landed_is_sent_again_with_a_new_client_id(
    database_url: str, store: EventStore, world_file: Path, route: tuple[str, str, OrderRequest]
) -> None:
    source, dest, funding = route
    async with Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as healthy:
        await healthy.world.for_account(source).create_order(funding)
        workflow_id, _ = await start_workflow(
            store, withdraw_once(healthy.accounts),
            {"from_account": source, "to_account": dest, "amount": "0.2"}, healthy.accounts,
        )
        assert await healthy.step(workflow_id) == "moved"  # the workflow starts

        probability = 0.5
        # Of the next two calls only the second times out: the withdrawal rules (a read) are
        # answered, the withdraw itself never reaches the exchange.
        seed = seed_hitting("timeout", probability, await fault_counter(database_url),
                            [False, True])
        async with Worker(database_url, world=world_file, time_scale=SCALE, owner="timing-out",
                          faults=f"timeout={probability}", seed=seed) as timing_out:
            # The intent is stored; the withdraw call times out before the exchange sees it.
            assert await timing_out.step(workflow_id) == "retry"
        assert (await load(store, workflow_id)).tasks[0].state == "submitting"
        assert await operations(database_url, "withdraw") == []

        # The exchange says it never landed: back to created, nothing sent in that step.
        events = await healthy.step_until_moved(workflow_id)
        assert [(e.data["trigger"], e.data["dest"]) for e in events] == [("reset", "created")]
        assert await operations(database_url, "withdraw") == []

        # Only now is it sent again, under a new client id.
        events = await healthy.step_until_moved(workflow_id)
        assert [(e.data["trigger"], e.data["dest"]) for e in events] == [
            ("submit", "submitting"), ("accept", "requested")
        ]
        second = client_id(workflow_id, 0, 2)
        assert events[0].data["request_params"]["client_id"] == second
        [landed] = await operations(database_url, "withdraw")
        assert landed["audit_ref"] == second

        while (flow := await load(store, workflow_id)).state == "running":
            await healthy.step_until_moved(workflow_id)
        assert flow.state == "done"
        assert len(await operations(database_url, "withdraw")) == 1
        ok, totals = await healthy.world.check()
        assert ok, totals


async def test_an_identical_withdrawal_of_another_workflow_is_not_taken_for_ours(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    # Upbit keeps no client id: only the history (currency, amount, address, time) tells.
    source, dest, funding = ROUTES["upbit_by_history"]
    async with Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as healthy:
        # Enough ETH for two withdrawals.
        await healthy.world.for_account(source).create_order(funding)
        await healthy.world.for_account(source).create_order(
            dataclasses.replace(funding, client_id="funding-2"))
        params = {"from_account": source, "to_account": dest, "amount": "0.2"}
        spec = withdraw_once(healthy.accounts)
        first, _ = await start_workflow(store, spec, params, healthy.accounts, command_id="a")
        while (flow := await load(store, first)).state == "running" or flow.state == "created":
            await healthy.step_until_moved(first)
        [theirs] = await operations(database_url, "withdraw")

        second, _ = await start_workflow(store, spec, params, healthy.accounts, command_id="b")
        assert await healthy.step(second) == "moved"  # the workflow starts
        probability = 0.5
        # Of the next two calls only the second times out: the withdrawal rules (a read) are
        # answered, the withdraw itself never reaches the exchange.
        seed = seed_hitting("timeout", probability, await fault_counter(database_url),
                            [False, True])
        async with Worker(database_url, world=world_file, time_scale=SCALE, owner="timing-out",
                          faults=f"timeout={probability}", seed=seed) as timing_out:
            # Our intent is stored; our withdraw never reaches the exchange.
            assert await timing_out.step(second) == "retry"
        assert [op["id"] for op in await operations(database_url, "withdraw")] == [theirs["id"]]

        # The history holds an identical withdrawal, but the first workflow recorded it as its
        # own: it is no candidate, so ours never landed and is sent again (not adopted).
        events = await healthy.step_until_moved(second)
        assert [(e.data["trigger"], e.data["dest"]) for e in events] == [("reset", "created")]
        while (flow := await load(store, second)).state == "running":
            await healthy.step_until_moved(second)
        assert flow.state == "done"
        ours = [op for op in await operations(database_url, "withdraw") if op["id"] != theirs["id"]]
        assert len(ours) == 1
        assert (flow.tasks[0].request_result or {})["id"] == str(ours[0]["id"])
