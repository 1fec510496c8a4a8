"""Bad input is refused before anything is stored; exchange refusals fail the task and stop.

A spec or parameter error raises SpecError naming the culprit and appends nothing, from Python
and from the command line. A refusal (ours or the exchange's) fails its task with the reason in
the TaskStateChanged `error`, fails the workflow, and nothing is sent after it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from events.store import EventStore
from rebalancer.accounts import DEFAULT_CONFIG, Accounts, load_accounts
from rebalancer.commands import start_workflow
from rebalancer.errors import SpecError
from rebalancer.specs.builders import task, workflow
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.models import WorkflowSpec
from rebalancer.specs.validation import InvalidSpecError
from tests.conftest import ROOT
from tests.support import (
    SEED_PARAMS,
    SEED_SPEC,
    Worker,
    event_count,
    operations,
    write_accounts,
)

ACCOUNTS = load_accounts()
SEED = builtin_specs()[SEED_SPEC]
GOOD_PARAMS: dict[str, Any] = {**SEED_PARAMS, "from_amount": "1000000"}
# withdraw_to_interim asks for the result of await_deposit_interim, which comes after it.
LATER_REFERENCE = "{$.await_deposit_interim.refresh_result.result.amount}"


def seed_with_later_reference() -> dict[str, Any]:
    data = SEED.model_dump(mode="json")
    data["tasks"][1]["config"]["amount"] = LATER_REFERENCE
    return data


# -- spec and parameter errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "params", "named"),
    [
        pytest.param(SEED, {**GOOD_PARAMS, "slippage": "0.1"},
                     ["param 'slippage': unknown"], id="unknown_param"),
        pytest.param(SEED, {**GOOD_PARAMS, "from_amount": 1000000.5},
                     ["param 'from_amount'", "binary floats are not money"], id="float_amount"),
        pytest.param(SEED, {**GOOD_PARAMS, "from_account": "upbit-nobody"},
                     ["param 'from_account'", "unknown account 'upbit-nobody'"],
                     id="unknown_account"),
        # Built without validation (as a stored or hand-made model could be): start checks it.
        pytest.param(WorkflowSpec.model_validate(seed_with_later_reference()), GOOD_PARAMS,
                     ["task 'withdraw_to_interim'", LATER_REFERENCE, "comes later"],
                     id="later_task_reference"),
    ],
)
async def test_bad_spec_or_param_is_refused_before_anything_is_appended(
    database_url: str, store: EventStore, spec: WorkflowSpec, params: dict[str, Any],
    named: list[str],
) -> None:
    with pytest.raises(SpecError) as refused:
        await start_workflow(store, spec, params, ACCOUNTS)
    for name in named:
        assert name in str(refused.value)
    assert await event_count(database_url) == 0


def test_builder_refuses_a_reference_to_a_later_task() -> None:
    tasks = [task(t.name, t.kind, twap=t.twap, **t.config) for t in SEED.tasks]
    tasks[1] = task("withdraw_to_interim", "withdraw",
                    **{**SEED.tasks[1].config, "amount": LATER_REFERENCE})
    with pytest.raises(InvalidSpecError) as refused:
        workflow(SEED.name, SEED.params, tasks, SEED.result, accounts=ACCOUNTS)
    assert "task 'withdraw_to_interim'" in str(refused.value)
    assert "await_deposit_interim" in str(refused.value)


@pytest.fixture
def config_with_later_reference(tmp_path: Path) -> Path:
    """Our accounts configuration plus a spec directory holding `later_reference`: the seed
    path with its second task referencing a later one."""
    specs = tmp_path / "specs"
    specs.mkdir()
    data = {**seed_with_later_reference(), "name": "later_reference"}
    (specs / "later_reference.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    config = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**config, "specs": ["specs"]}), encoding="utf-8")
    return path


def _cli_params(params: Mapping[str, str]) -> list[str]:
    return [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        pytest.param({**GOOD_PARAMS, "slippage": "0.1"}, ["slippage", "unknown"],
                     id="unknown_param"),
        pytest.param({**GOOD_PARAMS, "from_amount": "1e6 KRW"}, ["from_amount", "not a decimal"],
                     id="not_an_amount"),
        pytest.param({**GOOD_PARAMS, "from_account": "upbit-nobody"},
                     ["from_account", "unknown account 'upbit-nobody'"], id="unknown_account"),
        pytest.param(None, ["withdraw_to_interim", "await_deposit_interim", "comes later"],
                     id="later_task_reference"),
    ],
)
def test_cli_start_refuses_bad_input_with_one_line_and_exit_2(
    database_url: str, config_with_later_reference: Path, params: dict[str, str] | None,
    named: list[str],
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env["REBALANCER_DATABASE_URL"] = database_url
    # Nothing may get as far as the command API: an unreachable one would say so.
    env["REBALANCER_NATS_URL"] = "nats://127.0.0.1:1"
    if params is None:
        env["REBALANCER_CONFIG"] = str(config_with_later_reference)
    done = subprocess.run(
        [sys.executable, "-m", "rebalancer", "start",
         SEED_SPEC if params is not None else "later_reference",
         *_cli_params(params if params is not None else GOOD_PARAMS)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    for name in named:
        assert name in lines[0]
    assert asyncio.run(event_count(database_url)) == 0


# -- refusals while running ---------------------------------------------------------------------

BINANCE_PERSONAL_ETH = ACCOUNTS.get("binance-personal").deposit_addresses["ETH"].address
SOMEONE_ELSE = "0x00000000219ab540356cbb839cbe05303d7705fa"


def buy_withdraw_await(accounts: Accounts) -> WorkflowSpec:
    """Buy ETH on Upbit, withdraw it to Binance personal, await it there."""
    return workflow(
        "buy_withdraw_await",
        {"from_amount": "amount"},
        [
            task("buy", "trade", account="upbit-personal", side="buy", order_type="market",
                 base_currency="ETH", quote_currency="KRW", quote_amount="{from_amount}"),
            task("withdraw", "withdraw", from_account="upbit-personal",
                 to_account="binance-personal", currency="ETH", network="ETH",
                 amount="{$.buy.refresh_result.extra.cumulative_amount_excluding_fee}"),
            task("await_deposit", "deposit", account="binance-personal", currency="ETH",
                 txid="{$.withdraw.refresh_result.result.txid}"),
        ],
        accounts=accounts,
    )


def withdraw_more_than_held(accounts: Accounts) -> WorkflowSpec:
    """Withdraw ETH that upbit-personal does not hold, then await it."""
    return workflow(
        "withdraw_more_than_held",
        {"from_amount": "amount"},
        [
            task("withdraw", "withdraw", from_account="upbit-personal",
                 to_account="binance-personal", currency="ETH", network="ETH",
                 amount="{from_amount}"),
            task("await_deposit", "deposit", account="binance-personal", currency="ETH",
                 txid="{$.withdraw.refresh_result.result.txid}"),
        ],
        accounts=accounts,
    )


def allow_someone_else_only(accounts: dict[str, Any]) -> None:
    accounts["upbit-personal"]["withdrawal_allowlist"] = [
        {"currency": "ETH", "network": "ETH", "address": SOMEONE_ELSE}
    ]


@dataclass(frozen=True)
class Refusal:
    spec: Callable[[Accounts], WorkflowSpec]
    from_amount: str
    failed_task: str
    code: str
    message: str  # part of the error message
    executed: list[str]  # sim.operations kinds that ran before the refusal
    accounts: Callable[[dict[str, Any]], None] | None = None  # edits our accounts config


REFUSALS = {
    # The exchange refuses: 20 billion KRW is twice what upbit-personal holds.
    "insufficient_krw": Refusal(buy_withdraw_await, "20000000000", "buy", "rejected",
                                "insufficient KRW on upbit-personal", []),
    # The exchange refuses a withdrawal whose intent was already stored.
    "insufficient_eth": Refusal(withdraw_more_than_held, "5", "withdraw", "rejected",
                                "insufficient ETH on upbit-personal", []),
    # Our own allowlist refuses before the exchange is ever called.
    "address_not_allowed": Refusal(buy_withdraw_await, "1000000", "withdraw",
                                   "address_not_allowed", BINANCE_PERSONAL_ETH, ["order"],
                                   accounts=allow_someone_else_only),
    # Upbit's 5,000 KRW minimum order (read from the exchange's market rules).
    "below_minimum_order": Refusal(buy_withdraw_await, "4000", "buy", "below_minimum",
                                   "4000 is below the minimum order of 5000 KRW", []),
}


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
async def test_refusal_fails_task_and_workflow_and_sends_nothing_more(
    database_url: str, store: EventStore, tmp_path: Path, refusal: Refusal
) -> None:
    accounts = (
        load_accounts(write_accounts(tmp_path, refusal.accounts)) if refusal.accounts else ACCOUNTS
    )
    spec = refusal.spec(accounts)
    async with Worker(database_url, accounts=accounts) as worker:
        workflow_id, _ = await start_workflow(
            store, spec, {"from_amount": refusal.from_amount}, accounts
        )
        # Run it until it ends.
        flow = await worker.drive(workflow_id)
        failed = spec.task_index(refusal.failed_task)

        # The task failed with the reason, and so did the workflow.
        assert flow.state == "failed"
        assert [t.state for t in flow.tasks] == (
            ["done"] * failed + ["failed"] + ["created"] * (len(spec.tasks) - failed - 1)
        )
        stream = await store.read_stream(f"workflow-{workflow_id}")
        fail = stream[-2].data
        assert (fail["task_name"], fail["trigger"], fail["dest"]) == (
            refusal.failed_task, "fail", "failed"
        )
        assert fail["error"]["code"] == refusal.code
        assert refusal.message in fail["error"]["message"]
        assert stream[-1].data["dest"] == "failed"
        assert refusal.failed_task in (flow.reason or "")
        assert refusal.message in (flow.reason or "")

        # Nothing was sent after the refusal (nor by it), and nothing more happens.
        executed = await operations(database_url)
        assert [op["kind"] for op in executed] == refusal.executed
        events = len(stream)
        for _ in range(3):
            assert await worker.step(workflow_id) == "idle"
        assert await operations(database_url) == executed
        assert len(await store.read_stream(f"workflow-{workflow_id}")) == events
        ok, totals = await worker.world.check()
        assert ok, totals
