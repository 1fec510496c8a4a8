"""Each transfer processor on the simulated world: spot -> futures (`transfer`, matched by the
history: Binance keeps no client id there) and master -> sub (`master_transfer`, by clientTranId).

Each is sent and followed to done, reconciled after its answer was lost (no second transfer),
sent again after a call that never landed, and failed for good when the exchange refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from events.store import EventStore
from rebalancer.accounts import Accounts
from rebalancer.commands import start_workflow
from rebalancer.specs.builders import task, workflow
from rebalancer.specs.models import WorkflowSpec
from rebalancer.workflow import client_id
from tests.support import Worker, load, operations, to_futures, write_world
from tests.support.faults import fault_counter, seed_hitting

D = Decimal
SCALE = 1000.0
AMOUNT = D("0.25")


def master_to_sub(accounts: Accounts) -> WorkflowSpec:
    return workflow(
        "master_transfer_once",
        {"master": "account", "sub": "account", "amount": "amount"},
        [task("move_to_sub", "master_transfer", master_account="{master}",
              from_account="{master}", to_account="{sub}", currency="ETH", amount="{amount}",
              from_wallet="spot", to_wallet="spot")],
        accounts=accounts,
    )


@dataclass(frozen=True)
class Route:
    """One processor's workflow, its params, and the two balances (world keys) it moves."""

    spec: Callable[[Accounts], WorkflowSpec]
    params: dict[str, str]
    operation: str  # its kind in sim.operations
    source: str
    dest: str


ROUTES = {
    "transfer": Route(to_futures, {"account": "binance-corp-sub"}, "transfer",
                      "binance-corp-sub", "binance-corp-sub:futures"),
    "master_transfer": Route(
        master_to_sub, {"master": "binance-corp-master", "sub": "binance-corp-sub"},
        "master_transfer", "binance-corp-master", "binance-corp-sub"),
}
routes = pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ETH in the master's and the sub's spot wallets: enough for one transfer, not five."""
    return write_world(
        tmp_path_factory.mktemp("world"),
        balances={"binance-corp-master": {"ETH": "1"}, "binance-corp-sub": {"ETH": "1"}},
    )


async def eth(worker: Worker, route: Route) -> tuple[Decimal, Decimal]:
    """ETH held at the route's source and destination."""
    held = await worker.world.balances()
    return held.get(route.source, {}).get("ETH", D(0)), held.get(route.dest, {}).get("ETH", D(0))


async def start(store: EventStore, worker: Worker, route: Route, amount: Decimal = AMOUNT) -> str:
    workflow_id, _ = await start_workflow(
        store, route.spec(worker.accounts), {**route.params, "amount": str(amount)},
        worker.accounts,
    )
    assert await worker.step(workflow_id) == "moved"  # the workflow starts
    return workflow_id


async def task_triggers(store: EventStore, workflow_id: str) -> list[str]:
    return [e.data["trigger"] for e in await store.read_stream(f"workflow-{workflow_id}")
            if e.data.get("task_name")]


@routes
async def test_a_transfer_moves_the_amount_once_and_ends_done(
    database_url: str, store: EventStore, world_file: Path, route: Route
) -> None:
    async with Worker(database_url, world=world_file, time_scale=SCALE) as worker:
        before = await eth(worker, route)
        workflow_id = await start(store, worker, route)
        flow = await worker.drive(workflow_id)
        assert flow.state == "done"
        assert await task_triggers(store, workflow_id) == ["submit", "accept", "complete"]
        [landed] = await operations(database_url, route.operation)
        assert landed["audit_ref"] == client_id(workflow_id, 0, 1)
        assert (flow.tasks[0].refresh_result or {})["result"]["id"] == str(landed["id"])
        assert D((flow.tasks[0].refresh_result or {})["result"]["amount"]) == AMOUNT
        assert await eth(worker, route) == (before[0] - AMOUNT, before[1] + AMOUNT)
        ok, totals = await worker.world.check()
        assert ok, totals


@routes
async def test_a_lost_answer_is_reconciled_without_a_second_transfer(
    database_url: str, store: EventStore, world_file: Path, route: Route
) -> None:
    async with (
        Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as healthy,
        # Every money-moving call of this one executes, but its answer never arrives.
        Worker(database_url, world=world_file, time_scale=SCALE, owner="lossy",
               faults="lost_response=1.0") as lossy,
    ):
        before = await eth(healthy, route)
        workflow_id = await start(store, healthy, route)

        # The intent is stored, the transfer executes, the answer is lost.
        assert await lossy.step(workflow_id) == "retry"
        moving = (await load(store, workflow_id)).tasks[0]
        assert moving.state == "submitting" and moving.request_result is None
        [landed] = await operations(database_url, route.operation)
        assert await eth(healthy, route) == (before[0] - AMOUNT, before[1] + AMOUNT)

        # The next step asks the exchange (history or client id) and finds it.
        events = await healthy.step_until_moved(workflow_id)
        assert [(e.data["trigger"], e.data["dest"]) for e in events] == [("accept", "requested")]
        assert events[0].data["request_result"]["id"] == str(landed["id"])

        flow = await healthy.drive(workflow_id)
        assert flow.state == "done"
        assert [op["id"] for op in await operations(database_url, route.operation)] == [
            landed["id"]]
        assert await task_triggers(store, workflow_id) == ["submit", "accept", "complete"]
        assert await eth(healthy, route) == (before[0] - AMOUNT, before[1] + AMOUNT)
        ok, totals = await healthy.world.check()
        assert ok, totals


@routes
async def test_a_transfer_that_never_landed_is_sent_again_with_a_new_client_id(
    database_url: str, store: EventStore, world_file: Path, route: Route
) -> None:
    async with Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as healthy:
        before = await eth(healthy, route)
        workflow_id = await start(store, healthy, route)
        # The transfer is the step's first exchange call: it times out before the exchange
        # sees it (the caller cannot know that).
        probability = 0.5
        seed = seed_hitting("timeout", probability, await fault_counter(database_url), [True])
        async with Worker(database_url, world=world_file, time_scale=SCALE, owner="timing-out",
                          faults=f"timeout={probability}", seed=seed) as timing_out:
            assert await timing_out.step(workflow_id) == "retry"
        assert (await load(store, workflow_id)).tasks[0].state == "submitting"
        assert await operations(database_url, route.operation) == []

        # The exchange knows nothing of it: back to created, nothing sent in that step.
        events = await healthy.step_until_moved(workflow_id)
        assert [(e.data["trigger"], e.data["dest"]) for e in events] == [("reset", "created")]
        assert await operations(database_url, route.operation) == []

        # Only now is it sent again, under the next client id, and it lands once.
        flow = await healthy.drive(workflow_id)
        assert flow.state == "done"
        [landed] = await operations(database_url, route.operation)
        assert landed["audit_ref"] == client_id(workflow_id, 0, 2)
        assert await task_triggers(store, workflow_id) == [
            "submit", "reset", "submit", "accept", "complete"]
        assert await eth(healthy, route) == (before[0] - AMOUNT, before[1] + AMOUNT)


@routes
@pytest.mark.parametrize(
    ("faults", "amount", "refusal"),
    [("reject=1.0", AMOUNT, "simulated rejection"), ("", D(5), "insufficient")],
    ids=["rejected", "more_than_held"],
)
async def test_a_refused_transfer_fails_the_task_and_workflow_and_moves_nothing(
    database_url: str, store: EventStore, world_file: Path, route: Route,
    faults: str, amount: Decimal, refusal: str,
) -> None:
    async with Worker(database_url, world=world_file, time_scale=SCALE, faults=faults) as worker:
        before = await eth(worker, route)
        workflow_id = await start(store, worker, route, amount)
        flow = await worker.drive(workflow_id)
        assert flow.state == "failed"
        assert flow.tasks[0].state == "failed"
        error = flow.tasks[0].error or {}
        assert error.get("code") == "rejected" and refusal in error.get("message", "").lower()
        # Refused is final: no reset, no second intent.
        assert await task_triggers(store, workflow_id) == ["submit", "fail"]
        assert await operations(database_url, route.operation) == []
        assert await eth(worker, route) == before
