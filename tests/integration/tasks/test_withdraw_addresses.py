"""Deposit addresses one per network, and tags (memos) honoured from the config to the deposit.

Runs on the simulated world with a copy of the demo accounts: binance-personal gets XRP with a
tag and ETH on two networks (ETH and ARBITRUM); upbit-personal may withdraw to all of them.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from events.store import EventStore
from rebalancer.accounts import load_accounts
from rebalancer.commands import start_workflow
from rebalancer.errors import RejectedError
from rebalancer.exchanges.base import WithdrawRequest
from rebalancer.exchanges.simulated.spec import DEFAULT_WORLD
from rebalancer.specs.builders import task, workflow
from tests.support import Worker, eventually, operations, write_accounts

D = Decimal
XRP_ADDRESS = "rEb8TK3gBgk5auZkwc6sHnwrGVJH8DuaLh"
XRP_TAG = "104472"
ARB_ADDRESS = "0x4b0897b0513fdc7c541b6d9d7e929c4e5364d2db"
ETH_ADDRESS = "0x8894e0a0c962cb723c1976a4421c95949be2d4e3"  # binance-personal's, demo config


def edit_accounts(accounts: dict[str, Any]) -> None:
    accounts["binance-personal"]["deposit_addresses"] = {
        "ETH": [
            {"address": ETH_ADDRESS, "network": "ETH"},
            {"address": ARB_ADDRESS, "network": "ARBITRUM"},
        ],
        "XRP": {"address": XRP_ADDRESS, "network": "XRP", "tag": XRP_TAG},
    }
    accounts["upbit-personal"]["withdrawal_allowlist"] += [
        {"currency": "ETH", "network": "ARBITRUM", "address": ARB_ADDRESS},
        {"currency": "XRP", "network": "XRP", "address": XRP_ADDRESS, "tag": XRP_TAG},
    ]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """(accounts, world): Upbit withdraws ETH on ARBITRUM and XRP on XRP too."""
    config = write_accounts(tmp_path, edit_accounts)
    data = yaml.safe_load(DEFAULT_WORLD.read_text(encoding="utf-8"))
    data["exchanges"]["upbit"]["withdrawals"] += [
        {"currency": "ETH", "network": "ARBITRUM", "fee": "0.001", "minimum": "0.002",
         "multiple": "0.00000001", "fee_included": False},
        {"currency": "XRP", "network": "XRP", "fee": "1", "minimum": "21", "multiple": "0.000001",
         "fee_included": False},
    ]
    data["balances"]["upbit-personal"].update({"ETH": "1", "XRP": "100"})
    world = tmp_path / "world.yaml"
    world.write_text(yaml.safe_dump(data), encoding="utf-8")
    return config, world


async def arrived(worker: Worker, database_url: str) -> dict[str, Any]:
    """The one deposit the withdrawal made, once the world has credited it."""
    async def credited() -> list[dict[str, Any]]:
        await worker.world.balances()  # settles what came due
        return await operations(database_url, "deposit")

    [deposit] = await eventually(credited, what="the deposit arriving")
    return deposit


async def withdraw(store: EventStore, worker: Worker, currency: str, network: str,
                   amount: str, **extra: Any) -> Any:
    spec = workflow("one_withdraw", {}, [task(
        "send", "withdraw", from_account="upbit-personal", to_account="binance-personal",
        currency=currency, amount=amount, network=network, **extra)], accounts=worker.accounts)
    workflow_id, _ = await start_workflow(store, spec, {}, worker.accounts)
    return (await worker.drive(workflow_id)).tasks[0]


async def test_the_address_on_the_asked_network_is_the_one_sent_to(
    database_url: str, store: EventStore, files: tuple[Path, Path]
) -> None:
    config, world = files
    async with Worker(database_url, accounts=load_accounts(config), world=world) as worker:
        sent = await withdraw(store, worker, "ETH", "ARBITRUM", "0.5")
        assert sent.state == "done", sent.error
        assert (sent.request_params["address"], sent.request_params["network"]) == (
            ARB_ADDRESS, "ARBITRUM")
        [op] = await operations(database_url, "withdraw")
        assert (op["address"], op["network"], op["to_account"]) == (
            ARB_ADDRESS, "ARBITRUM", "binance-personal")
        # The world's address registry knows the second address: the deposit is ours.
        deposit = await arrived(worker, database_url)
        assert (deposit["account"], deposit["network"]) == ("binance-personal", "ARBITRUM")


async def test_a_network_with_no_address_fails_naming_the_networks_there_are(
    database_url: str, store: EventStore, files: tuple[Path, Path]
) -> None:
    config, world = files
    async with Worker(database_url, accounts=load_accounts(config), world=world) as worker:
        failed = await withdraw(store, worker, "ETH", "BSC", "0.5")
        assert failed.state == "failed"
        assert failed.error["code"] == "no_deposit_address"
        assert "BSC" in failed.error["message"]
        assert "ETH, ARBITRUM" in failed.error["message"]
        assert failed.request_params is None
        assert await operations(database_url, "withdraw") == []


async def test_the_address_tag_goes_with_the_withdrawal_and_arrives_with_the_deposit(
    database_url: str, store: EventStore, files: tuple[Path, Path]
) -> None:
    config, world = files
    async with Worker(database_url, accounts=load_accounts(config), world=world) as worker:
        sent = await withdraw(store, worker, "XRP", "XRP", "50")
        assert sent.state == "done", sent.error
        assert sent.request_params["tag"] == XRP_TAG
        [op] = await operations(database_url, "withdraw")
        assert (op["tag"], op["to_account"]) == (XRP_TAG, "binance-personal")
        deposit = await arrived(worker, database_url)
        assert (deposit["account"], deposit["tag"], deposit["amount"]) == (
            "binance-personal", XRP_TAG, D(49))


async def test_a_spec_naming_another_tag_fails_before_any_intent(
    database_url: str, store: EventStore, files: tuple[Path, Path]
) -> None:
    config, world = files
    async with Worker(database_url, accounts=load_accounts(config), world=world) as worker:
        failed = await withdraw(store, worker, "XRP", "XRP", "50", tag="999")
        assert failed.state == "failed"
        assert failed.error["code"] == "tag_mismatch"
        assert failed.request_params is None
        assert await operations(database_url, "withdraw") == []


@pytest.mark.parametrize("tag", [None, "999"], ids=["missing", "wrong"])
async def test_the_world_refuses_a_withdrawal_to_a_tagged_address_without_its_tag(
    database_url: str, files: tuple[Path, Path], tag: str | None
) -> None:
    config, world = files
    async with Worker(database_url, accounts=load_accounts(config), world=world) as worker:
        port = worker.world.for_account("upbit-personal")
        request = WithdrawRequest("c-1", "XRP", D(50), XRP_ADDRESS, "XRP", tag=tag)
        with pytest.raises(RejectedError, match="only with its tag"):
            await port.withdraw(request)
        assert await operations(database_url, "withdraw") == []
        held = await worker.world.balances()
        assert held["upbit-personal"]["XRP"] == D(100)
