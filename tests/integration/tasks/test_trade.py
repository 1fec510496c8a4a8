"""The trade processor's TWAP path when the exchange refuses slices, on the simulated world.

A refused slice is recorded in `refresh_result.extra.slices` (status "rejected", its client id,
the exchange's message). Before the last slice the task goes back to `created` (`reset`, error
`slice_rejected`) and the next step sends the next slice under a new client id; a refused last
slice completes the task if any slice filled and the spec says `on_partial: continue` (the
default, needs_attention, is tests/integration/tasks/test_partial_fill.py's), and fails it
(`rejected`) if none did.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from events.store import EventStore
from rebalancer.accounts import Accounts
from rebalancer.commands import start_workflow
from rebalancer.specs.builders import twap_trade, workflow
from rebalancer.specs.models import WorkflowSpec
from rebalancer.workflow import client_id
from tests.support import Worker, load, operations, write_world
from tests.support.faults import fault_counter, seed_hitting

D = Decimal
SCALE = 1000.0
BUDGET = "300000"  # KRW: three slices of 100,000, each over Upbit's 5,000 KRW minimum


def twap_buy(accounts: Accounts) -> WorkflowSpec:
    # No interval, so each slice goes at the next step (the spacing is test_chain's business).
    return workflow(
        "twap_buy",
        {"account": "account", "budget": "amount"},
        [twap_trade("buy_eth", slices=3, interval_seconds=0, on_partial="continue",
                    account="{account}", side="buy",
                    order_type="market", base_currency="ETH", quote_currency="KRW",
                    quote_amount="{budget}")],
        accounts=accounts,
    )


def world_with(directory: Path, krw: str) -> Path:
    return write_world(directory, balances={"upbit-personal": {"KRW": krw}})


async def start(store: EventStore, worker: Worker) -> str:
    workflow_id, _ = await start_workflow(
        store, twap_buy(worker.accounts), {"account": "upbit-personal", "budget": BUDGET},
        worker.accounts,
    )
    return workflow_id


async def task_moves(store: EventStore, workflow_id: str) -> list[tuple[str, str]]:
    return [(e.data["trigger"], e.data["dest"])
            for e in await store.read_stream(f"workflow-{workflow_id}")
            if e.data.get("task_name")]


def slices(refresh_result: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list(((refresh_result or {}).get("extra") or {}).get("slices") or [])


async def held(worker: Worker, currency: str) -> Decimal:
    return (await worker.world.balances()).get("upbit-personal", {}).get(currency, D(0))


async def test_a_refused_last_slice_completes_the_task_with_what_the_others_bought(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    # Enough KRW for two slices: the third is refused for balance.
    async with Worker(database_url, world=world_with(tmp_path, "250000"),
                      time_scale=SCALE) as worker:
        workflow_id = await start(store, worker)
        flow = await worker.drive(workflow_id)
        assert flow.state == "done"
        trade = flow.tasks[0]
        assert trade.state == "done"
        assert await task_moves(store, workflow_id) == [
            ("submit", "submitting"), ("accept", "requested"),
            ("next_slice", "submitting"), ("accept", "requested"),
            ("next_slice", "submitting"), ("complete", "done"),
        ]
        recorded = slices(trade.refresh_result)
        assert [s["status"] for s in recorded] == ["closed", "closed", "rejected"]
        refused = recorded[2]
        assert refused["client_id"] == client_id(workflow_id, 0, 3)
        assert "insufficient" in refused["error"]
        # Two orders executed, one per filled slice, under the first two client ids.
        orders = await operations(database_url, "order")
        assert [o["audit_ref"] for o in orders] == [client_id(workflow_id, 0, n) for n in (1, 2)]
        # The cumulative figures count the two filled slices only, and match the balances.
        extra = (trade.refresh_result or {})["extra"]
        assert D(extra["cumulative_cost"]) == sum(D(s["cost"]) for s in recorded[:2]) > 0
        assert await held(worker, "KRW") == D(250000) - D(extra["cumulative_cost"])
        assert await held(worker, "ETH") == D(extra["cumulative_amount_excluding_fee"]) > 0
        ok, totals = await worker.world.check()
        assert ok, totals


async def test_every_slice_refused_fails_the_task_after_trying_each_under_its_own_id(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    # Less KRW than one slice: every slice is refused for balance.
    async with Worker(database_url, world=world_with(tmp_path, "1000"),
                      time_scale=SCALE) as worker:
        workflow_id = await start(store, worker)
        flow = await worker.drive(workflow_id)
        assert flow.state == "failed"
        trade = flow.tasks[0]
        assert trade.state == "failed"
        assert (trade.error or {}).get("code") == "rejected"
        assert await task_moves(store, workflow_id) == [
            ("submit", "submitting"), ("reset", "created"),
            ("submit", "submitting"), ("reset", "created"),
            ("submit", "submitting"), ("fail", "failed"),
        ]
        events = await store.read_stream(f"workflow-{workflow_id}")
        resets = [e.data for e in events if e.data.get("trigger") == "reset"]
        assert [(r["error"]["code"], r["error"]["slice"]) for r in resets] == [
            ("slice_rejected", 0), ("slice_rejected", 1)]
        recorded = slices(trade.refresh_result)
        assert [(s["slice"], s["status"]) for s in recorded] == [
            (0, "rejected"), (1, "rejected"), (2, "rejected")]
        assert [s["client_id"] for s in recorded] == [
            client_id(workflow_id, 0, n) for n in (1, 2, 3)]
        assert await operations(database_url, "order") == []
        assert await held(worker, "KRW") == D(1000)
        assert await held(worker, "ETH") == 0


async def test_a_refused_middle_slice_is_skipped_and_the_next_one_is_sent(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    world = world_with(tmp_path, "1000000")
    async with Worker(database_url, world=world, time_scale=SCALE, owner="starter") as starter:
        workflow_id = await start(store, starter)
        assert await starter.step(workflow_id) == "moved"  # the workflow starts
    # Only orders draw for `reject`: the first and third slice pass, the second is refused.
    probability = 0.5
    seed = seed_hitting("reject", probability, await fault_counter(database_url),
                        [False, True, False])
    async with Worker(database_url, world=world, time_scale=SCALE,
                      faults=f"reject={probability}", seed=seed) as worker:
        flow = await worker.drive(workflow_id)
        assert flow.state == "done"
        assert await task_moves(store, workflow_id) == [
            ("submit", "submitting"), ("accept", "requested"),
            ("next_slice", "submitting"), ("reset", "created"),
            ("submit", "submitting"), ("complete", "done"),
        ]
        trade = (await load(store, workflow_id)).tasks[0]
        recorded = slices(trade.refresh_result)
        assert [(s["slice"], s["status"]) for s in recorded] == [
            (0, "closed"), (1, "rejected"), (2, "closed")]
        assert "simulated rejection" in recorded[1]["error"]
        orders = await operations(database_url, "order")
        assert [o["audit_ref"] for o in orders] == [client_id(workflow_id, 0, n) for n in (1, 3)]
        extra = (trade.refresh_result or {})["extra"]
        assert await held(worker, "KRW") == D(1000000) - D(extra["cumulative_cost"])
        assert D(extra["cumulative_cost"]) == D(recorded[0]["cost"]) + D(recorded[2]["cost"])
        ok, totals = await worker.world.check()
        assert ok, totals
