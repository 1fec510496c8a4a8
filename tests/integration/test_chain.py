"""A five-task chain, step by step, and the built-in path end to end.

The chain (buy, withdraw, await deposit, spot -> futures, master -> sub) has no legal
order with our accounts; the closest one withdraws from Upbit straight to the corporate master
(its address added to a copy of upbit-personal's allowlist), moves master -> sub, then the
sub's spot -> futures. Every task result the next task needs is a `{$.task.path}` reference.
"""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from events.store import EventStore
from rebalancer.accounts import Accounts, load_accounts
from rebalancer.commands import start_workflow
from rebalancer.specs.builders import task, workflow
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.models import WorkflowSpec
from rebalancer.specs.resolution import resolve_params, resolve_result
from rebalancer.workflow import Workflow, client_id
from tests.support import (
    MONEY_MOVES,
    SEED_PARAMS,
    SEED_SPEC,
    Worker,
    intents,
    load,
    money,
    operations,
    write_accounts,
    write_world,
)

D = Decimal
SCALE = 1000.0
KIND_OF_OPERATION = {
    "trade": "order",
    "withdraw": "withdraw",
    "transfer": "transfer",
    "master_transfer": "master_transfer",
}


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Accounts:
    """Our accounts, with upbit-personal allowed to withdraw straight to the corporate master."""
    master = load_accounts().get("binance-corp-master").deposit_addresses["ETH"]

    def allow_master(accounts: dict[str, Any]) -> None:
        accounts["upbit-personal"]["withdrawal_allowlist"].append(
            {"currency": "ETH", "network": master.network, "address": master.address}
        )

    return load_accounts(write_accounts(tmp_path_factory.mktemp("accounts"), allow_master))


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every delay 0.3 s at SCALE: long enough that the step right after a request sees the
    order open, the withdrawal processing and the deposit confirming, each as its own step."""
    return write_world(
        tmp_path_factory.mktemp("world"),
        delays={"limit_fill_seconds": 300, "withdrawal_seconds": 300,
                "confirmation_seconds": 300},
    )


def seed_chain(accounts: Accounts) -> WorkflowSpec:
    return workflow(
        "seed_chain",
        {
            "from_account": "account",
            "to_account": "account",
            "from_currency": "currency",
            "interim_currency": "currency",
            "interim_amount": "amount",
            "price": "amount",
        },
        [
            # A limit buy below the ask rests, fills half, then the rest (open -> done).
            task(
                "BUY_IN_SOURCE_SPOT",
                "trade",
                account="{from_account}",
                side="buy",
                order_type="limit",
                base_currency="{interim_currency}",
                quote_currency="{from_currency}",
                amount="{interim_amount}",
                price="{price}",
            ),
            task(
                "WITHDRAW_FROM_SOURCE_SPOT_TO_MASTER_SPOT",
                "withdraw",
                from_account="{from_account}",
                to_account="{to_account.master_account}",
                currency="{interim_currency}",
                # task names are matched case-insensitively
                amount="{$.BUY_IN_SOURCE_SPOT.refresh_result.extra.cumulative_amount_excluding_fee}",
                network="ETH",
            ),
            task(
                "AWAIT_DEPOSIT_TO_MASTER_SPOT",
                "deposit",
                account="{to_account.master_account}",
                currency="{interim_currency}",
                from_account="{from_account}",
                txid="{$.withdraw_from_source_spot_to_master_spot.refresh_result.result.txid}",
                amount="{$.withdraw_from_source_spot_to_master_spot.refresh_result.result.received}",
            ),
            task(
                "TRANSFER_FROM_MASTER_SPOT_TO_SUB_SPOT",
                "master_transfer",
                master_account="{to_account.master_account}",
                from_account="{to_account.master_account}",
                to_account="{to_account}",
                currency="{interim_currency}",
                amount="{$.await_deposit_to_master_spot.refresh_result.result.amount}",
                from_wallet="spot",
                to_wallet="spot",
            ),
            task(
                "TRANSFER_FROM_SUB_SPOT_TO_SUB_FUTURES",
                "transfer",
                account="{to_account}",
                currency="{interim_currency}",
                amount="{$.transfer_from_master_spot_to_sub_spot.refresh_result.result.amount}",
                from_wallet="spot",
                to_wallet="futures",
            ),
        ],
        result={
            "to_amount": "{$.transfer_from_sub_spot_to_sub_futures.refresh_result.result.amount}"
        },
        accounts=accounts,
    )


def states(flow: Workflow) -> tuple[str, list[str]]:
    return flow.state, [t.state for t in flow.tasks]


async def test_seed_chain_advances_one_step_at_a_time(
    database_url: str, store: EventStore, accounts: Accounts, world_file: Path
) -> None:
    spec = seed_chain(accounts)
    async with Worker(
        database_url, accounts=accounts, world=world_file, time_scale=SCALE
    ) as worker:
        before = await worker.world.balances()
        workflow_id, _ = await start_workflow(
            store,
            spec,
            {
                "from_account": "upbit-personal",
                "to_account": "binance-corp-sub",
                "from_currency": "KRW",
                "interim_currency": "ETH",
                "interim_amount": "0.25",
                "price": "4000000",  # below the ask (4,001,000): the order rests
            },
            accounts,
        )

        async def advance(*moves: tuple[str, str, str]) -> Workflow:
            """One step that moved: it appended exactly `moves` (task, trigger, dest)."""
            events = await worker.step_until_moved(workflow_id)
            made = [
                (e.data.get("task_name", "_workflow"), e.data["trigger"], e.data["dest"])
                for e in events
            ]
            assert made == list(moves)
            return await load(store, workflow_id)

        buy, withdraw, deposit, to_sub, to_futures = (t.name for t in spec.tasks)
        created = ["created"] * 5
        flow = await load(store, workflow_id)
        assert states(flow) == ("created", created)

        # The workflow starts.
        flow = await advance(("_workflow", "start", "running"))
        assert states(flow) == ("running", created)

        # BUY_IN_SOURCE_SPOT: the order rests (open), fills half, then the rest.
        flow = await advance((buy, "submit", "submitting"), (buy, "open", "open"))
        assert states(flow) == ("running", ["open", *created[1:]])
        trade = flow.tasks[0]
        assert trade.request_params is not None
        assert trade.request_params["client_id"] == client_id(workflow_id, 0, 1)
        assert (trade.request_result or {})["status"] == "open"
        assert D((trade.refresh_result or {})["result"]["filled"]) == 0

        flow = await advance((buy, "fill", "open"))
        assert states(flow) == ("running", ["open", *created[1:]])
        assert D((flow.tasks[0].refresh_result or {})["result"]["filled"]) == D("0.125")

        flow = await advance((buy, "complete", "done"))
        assert states(flow) == ("running", ["done", *created[1:]])
        bought = (flow.tasks[0].refresh_result or {})["extra"]
        assert D(bought["cumulative_amount"]) == D("0.25")
        assert D(bought["cumulative_amount_excluding_fee"]) == D("0.249875")  # 0.05 % in ETH
        assert D(bought["cumulative_cost"]) == D(1_000_000)

        # WITHDRAW_FROM_SOURCE_SPOT_TO_MASTER_SPOT: Upbit's 0.01 ETH fee comes on top.
        flow = await advance((withdraw, "submit", "submitting"), (withdraw, "accept", "requested"))
        assert states(flow) == ("running", ["done", "requested", *created[2:]])
        master_address = accounts.get("binance-corp-master").deposit_addresses["ETH"].address
        params = flow.tasks[1].request_params or {}
        assert money(params, "amount", "available", "fee") == {
            "from_account": "upbit-personal",
            "to_account": "binance-corp-master",
            "currency": "ETH",
            "amount": D("0.239875"),
            "available": D("0.249875"),
            "address": master_address,
            "network": "ETH",
            "tag": None,
            "fee": D("0.01"),
            "fee_included": False,
            "remainders": [],
            "client_id": client_id(workflow_id, 1, 1),
        }

        flow = await advance((withdraw, "progress", "processing"))
        assert states(flow) == ("running", ["done", "processing", *created[2:]])

        flow = await advance((withdraw, "complete", "done"))
        assert states(flow) == ("running", ["done", "done", *created[2:]])
        sent = (flow.tasks[1].refresh_result or {})["result"]
        assert sent["txid"] and D(sent["received"]) == D("0.239875")

        # AWAIT_DEPOSIT_TO_MASTER_SPOT: matched by the withdrawal's txid, then confirmed.
        flow = await advance((deposit, "watch", "requested"))
        assert states(flow) == ("running", ["done", "done", "requested", *created[3:]])
        assert (flow.tasks[2].request_params or {})["txid"] == sent["txid"]

        flow = await advance((deposit, "progress", "processing"))
        assert states(flow) == ("running", ["done", "done", "processing", *created[3:]])

        flow = await advance((deposit, "complete", "done"))
        assert states(flow) == ("running", ["done", "done", "done", *created[3:]])
        arrived = (flow.tasks[2].refresh_result or {})["result"]
        assert (arrived["txid"], D(arrived["amount"])) == (sent["txid"], D("0.239875"))

        # TRANSFER_FROM_MASTER_SPOT_TO_SUB_SPOT: with the master's key and a client id. The
        # answer already says it is done: completed in the same step, no look-up after it.
        flow = await advance((to_sub, "submit", "submitting"), (to_sub, "accept", "requested"),
                             (to_sub, "complete", "done"))
        assert states(flow) == ("running", ["done", "done", "done", "done", "created"])

        # TRANSFER_FROM_SUB_SPOT_TO_SUB_FUTURES
        flow = await advance(
            (to_futures, "submit", "submitting"), (to_futures, "accept", "requested"),
            (to_futures, "complete", "done"),
        )
        assert states(flow) == ("running", ["done"] * 5)

        # DONE: and a done workflow takes no further step.
        flow = await advance(("_workflow", "complete", "done"))
        assert states(flow) == ("done", ["done"] * 5)
        assert await worker.step(workflow_id) == "idle"

        # The result, computed from the last task, is what the world shows.
        params_of = resolve_params(spec, flow.params, accounts)
        result = resolve_result(spec, params_of, flow.results())
        after = await worker.world.balances()
        assert D(result["to_amount"]) == D("0.239875")
        assert after["binance-corp-sub:futures"]["ETH"] == D(result["to_amount"])
        assert after["upbit-personal"]["ETH"] == 0
        spent = before["upbit-personal"]["KRW"] - after["upbit-personal"]["KRW"]
        assert spent == D(1_000_000)
        ok, totals = await worker.world.check()
        assert ok, totals


async def test_builtin_seed_path_runs_to_done_with_one_operation_per_intent(
    database_url: str, store: EventStore
) -> None:
    spec = builtin_specs()[SEED_SPEC]
    async with Worker(database_url, time_scale=SCALE) as worker:
        workflow_id, _ = await start_workflow(
            store, spec, {**SEED_PARAMS, "from_amount": "1000000"}, worker.accounts
        )
        # Drive it like a worker would (the TWAP waits its real 2 s between slices).
        flow = await worker.drive(workflow_id, timeout=30)
        assert states(flow) == ("done", ["done"] * len(spec.tasks)), flow.reason

        ok, totals = await worker.world.check()
        assert ok, totals

        # Every executed money move belongs to exactly one stored intent, of its task's kind.
        stored = await intents(database_url)
        by_client_id = {i["client_id"]: i for i in stored}
        assert len(by_client_id) == len(stored)  # client ids are unique per intent
        executed = await operations(database_url, *MONEY_MOVES)
        refs = Counter(op["audit_ref"] for op in executed)
        assert all(count == 1 for count in refs.values()), refs
        assert set(refs) == set(by_client_id)  # and no intent went unexecuted (no faults)
        for op in executed:
            assert op["kind"] == KIND_OF_OPERATION[by_client_id[op["audit_ref"]]["kind"]]
            assert op["client_id"] in (None, op["audit_ref"])

        # The TWAP made four orders of 250,000 KRW, at least its interval apart.
        twap = [op for op in executed if op["kind"] == "order" and op["symbol"] == "ETH/KRW"]
        assert [op["quote_amount"] for op in twap] == [D(250_000)] * 4
        gaps = [b["created_at"] - a["created_at"] for a, b in itertools.pairwise(twap)]
        assert all(gap >= timedelta(seconds=1.9) for gap in gaps), gaps

        # The result is what landed in the sub's futures wallet.
        params_of = resolve_params(spec, flow.params, worker.accounts)
        result = resolve_result(spec, params_of, flow.results())
        balances = await worker.world.balances()
        assert balances["binance-corp-sub:futures"]["USDT"] == D(result["to_amount"]) > 0
