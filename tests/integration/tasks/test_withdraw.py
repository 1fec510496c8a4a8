"""The withdraw processor, step by step, on the event-sourced store.

A one-task workflow withdraws ETH; after every engine step the stored stream (never an
engine's memory) must show the task's state and what it recorded: the intent
(`request_params`), the exchange's acknowledgement (`request_result`) and what the exchange
later reported (`refresh_result`). With `with_restart`, every step runs in a brand-new worker
(store, world connection, engine) built from nothing but the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from events.store import EventStore
from rebalancer.accounts import load_accounts
from rebalancer.commands import start_workflow
from rebalancer.exchanges.base import OrderRequest, OrderType, Side
from rebalancer.workflow import client_id
from tests.support import (
    Worker,
    load,
    money,
    operations,
    withdraw_once,
    write_world,
)

D = Decimal
ACCOUNTS = load_accounts()
SCALE = 1000.0


@dataclass(frozen=True)
class Route:
    """One withdrawal path and what the exchange's rules make of the amount asked for."""

    source: str
    dest: str
    funding: OrderRequest  # a market buy that gives the source its ETH (ledger-safe)
    available: str  # what the task is asked to withdraw
    sent: str  # what the exchange is asked for: after its fee policy and amount multiple
    fee: str  # the withdrawal rule's fee, recorded with the intent
    fee_included: bool
    received: str
    internal: bool  # Binance -> Binance: no chain (an internal transfer id), no fee
    raw_pending: str
    raw_ok: str
    remainders: list[dict[str, Any]] = field(default_factory=list)


ROUTES = {
    # Upbit charges the fee on top: 0.2 available sends 0.19, which arrives whole, on chain.
    "upbit_onchain": Route(
        source="upbit-personal",
        dest="binance-personal",
        funding=OrderRequest("funding-1", "ETH/KRW", Side.BUY, OrderType.MARKET,
                             quote_amount=D(1_000_000)),
        available="0.2",
        sent="0.19",
        fee="0.01",
        fee_included=False,
        received="0.19",
        internal=False,
        raw_pending="PROCESSING",
        raw_ok="DONE",
    ),
    # Binance wants a multiple of 0.0001: what is left over is recorded as a remainder.
    "binance_internal": Route(
        source="binance-personal",
        dest="binance-corp-master",
        funding=OrderRequest("funding-1", "ETH/USDT", Side.BUY, OrderType.MARKET,
                             amount=D("0.25")),
        available="0.23981252",
        sent="0.2398",
        fee="0.0005",
        fee_included=True,
        received="0.2398",
        internal=True,
        raw_pending="4",
        raw_ok="6",
        remainders=[
            {"currency": "ETH", "amount": "0.00001252", "reason": "withdrawal_min_amount"}
        ],
    ),
}


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """USDT for the Binance buy, and withdrawals that stay pending 0.4 s (at SCALE): the step
    right after the request must find them still processing, so `processing` is its own step."""
    return write_world(
        tmp_path_factory.mktemp("world"),
        balances={"binance-personal": {"USDT": "1000"}},
        delays={"withdrawal_seconds": 400, "internal_seconds": 400},
    )


@pytest.mark.parametrize("with_restart", [True, False], ids=["with_restart", "without_restart"])
@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
async def test_withdraw_task_processor(
    database_url: str, store: EventStore, world_file: Path, route: Route, with_restart: bool
) -> None:
    async with Worker(database_url, world=world_file, time_scale=SCALE) as worker:
        # Fund the source through the world itself, so every currency's total still holds.
        await worker.world.for_account(route.source).create_order(route.funding)
        workflow_id, _ = await start_workflow(
            store,
            withdraw_once(ACCOUNTS),
            {"from_account": route.source, "to_account": route.dest, "amount": route.available},
            ACCOUNTS,
        )
        intent_id = client_id(workflow_id, 0, 1)
        address = ACCOUNTS.get(route.dest).deposit_addresses["ETH"].address

        async def step() -> list[tuple[str, str]]:
            """One engine step that moved the stream; its (trigger, dest) moves."""
            if with_restart:
                await worker.restart()
            events = await worker.step_until_moved(workflow_id)
            return [(e.data["trigger"], e.data["dest"]) for e in events]

        # Created: nothing recorded yet.
        flow = await load(store, workflow_id)
        withdrawal = flow.tasks[0]
        assert (flow.state, withdrawal.state) == ("created", "created")
        assert withdrawal.request_params is None
        assert withdrawal.request_result is None
        assert withdrawal.refresh_result is None

        # 1. The workflow starts; the task is not touched yet.
        assert await step() == [("start", "running")]
        flow = await load(store, workflow_id)
        assert (flow.state, flow.tasks[0].state) == ("running", "created")
        assert await operations(database_url, "withdraw") == []

        # 2. Request: the intent is stored (submitting), then the one withdraw call is made.
        assert await step() == [("submit", "submitting"), ("accept", "requested")]
        flow = await load(store, workflow_id)
        withdrawal = flow.tasks[0]
        assert withdrawal.state == "requested"
        assert money(withdrawal.request_params or {}, "amount", "available", "fee") == {
            "from_account": route.source,
            "to_account": route.dest,
            "currency": "ETH",
            "amount": D(route.sent),
            "available": D(route.available),
            "address": address,
            "network": "ETH",
            "tag": None,
            "fee": D(route.fee),
            "fee_included": route.fee_included,
            "remainders": route.remainders,
            "client_id": intent_id,
        }
        [sent] = await operations(database_url, "withdraw")
        assert withdrawal.request_result == {
            "id": str(sent["id"]),
            "status": "pending",
            "raw_status": route.raw_pending,
        }
        assert withdrawal.refresh_result is None
        assert (sent["account"], sent["amount"], sent["audit_ref"]) == (
            route.source, D(route.sent), intent_id
        )
        assert sent["address"] == address
        # The intent was committed before the exchange executed anything.
        stream = await store.read_stream(f"workflow-{workflow_id}")
        submitted = next(e for e in stream if e.data.get("trigger") == "submit")
        assert submitted.recorded_at < sent["created_at"]

        # 3. Refresh: the exchange still processes it (no txid yet).
        assert await step() == [("progress", "processing")]
        withdrawal = (await load(store, workflow_id)).tasks[0]
        assert withdrawal.state == "processing"
        processing = withdrawal.refresh_result or {}
        assert processing["extra"] == {"status": "processing"}
        assert money(processing["result"], "amount", "fee", "received") == {
            "id": str(sent["id"]),
            "txid": None,
            "amount": D(route.sent),
            "fee": sent["fee"],
            "received": D(route.received),
            "network": "ETH",
            "address": address,
            "status": "pending",
            "internal": route.internal,
            "raw_status": route.raw_pending,
        }

        # 4. Refresh: sent. The txid (on chain only), what arrives, and what was left behind.
        assert await step() == [("complete", "done")]
        withdrawal = (await load(store, workflow_id)).tasks[0]
        assert withdrawal.state == "done"
        [sent] = await operations(database_url, "withdraw")
        done = withdrawal.refresh_result or {}
        assert done["extra"] == {"status": "done", "remainders": route.remainders}
        assert done["result"]["status"] == "ok"
        assert done["result"]["raw_status"] == route.raw_ok
        assert D(done["result"]["received"]) == D(route.received)
        assert done["result"]["txid"] == sent["txid"]
        if route.internal:
            assert done["result"]["txid"] == str(sent["id"])  # "Internal transfer <id>"
            assert D(done["result"]["fee"]) == 0
        else:
            assert len(done["result"]["txid"]) == 64
            assert D(done["result"]["fee"]) == D(route.fee)
        # Requested results are kept as they were.
        assert withdrawal.request_result == {
            "id": str(sent["id"]),
            "status": "pending",
            "raw_status": route.raw_pending,
        }

        # 5. Every task is done: so is the workflow, and nothing more happens.
        assert await step() == [("complete", "done")]
        assert (await load(store, workflow_id)).state == "done"
        assert await worker.step(workflow_id) == "idle"

        # The task went the whole way, one stored move at a time.
        stream = await store.read_stream(f"workflow-{workflow_id}")
        moves = [
            (e.data["source"], e.data["dest"]) for e in stream if e.type == "TaskStateChanged"
        ]
        assert moves == [
            ("created", "submitting"),
            ("submitting", "requested"),
            ("requested", "processing"),
            ("processing", "done"),
        ]
        assert len(await operations(database_url, "withdraw")) == 1
        ok, totals = await worker.world.check()
        assert ok, totals
