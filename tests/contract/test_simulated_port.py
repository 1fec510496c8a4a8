"""The exchange port contract run against the simulated world's Binance and Upbit (real PG)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from rebalancer.accounts import load_accounts
from rebalancer.exchanges.simulated import DEFAULT_WORLD, SimulatedWorld
from tests.contract.exchange_port import ExchangePortContract, Venue

ACCOUNTS = load_accounts()
EXTERNAL = "0x00000000219ab540356cbb839cbe05303d7705fa"  # on nobody's allowlist
SCALE = 200.0  # an on-chain withdrawal of 65 simulated seconds arrives in a third of a second


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo world with both sides of each market on our accounts, and resting limit
    orders that stay resting (a contract test sees them open)."""
    data = yaml.safe_load(DEFAULT_WORLD.read_text(encoding="utf-8"))
    data["balances"].update({
        "upbit-personal": {"KRW": "10000000000", "ETH": "2"},
        "binance-personal": {"ETH": "10", "USDT": "10000"},
        "binance-corp-master": {"ETH": "5"},
    })
    data["delays"]["limit_fill_seconds"] = 10_000_000
    path = tmp_path_factory.mktemp("contract-world") / "world.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def worlds(database_url: str, world_file: Path) -> AsyncIterator[
        tuple[SimulatedWorld, dict[str, SimulatedWorld]]]:
    """A healthy world, and the same database seen through one world per injected fault."""
    async with contextlib.AsyncExitStack() as stack:
        async def opened(faults: str) -> SimulatedWorld:
            world = await SimulatedWorld.open(database_url, world=world_file, accounts=ACCOUNTS,
                                              faults=faults, seed=1, time_scale=SCALE)
            stack.push_async_callback(world.close)
            return world

        healthy = await opened("")
        faulty = {kind: await opened(f"{kind}=1")
                  for kind in ("rate_limit", "timeout", "lost_response")}
        yield healthy, faulty


class TestSimulatedBinance(ExchangePortContract):
    @pytest.fixture
    async def venue(self, database_url: str, world_file: Path) -> AsyncIterator[Venue]:
        async with worlds(database_url, world_file) as (world, faulty):
            trader = "binance-personal"
            yield Venue(
                trader=world.for_account(trader),
                symbol="ETH/USDT",
                sender=world.for_account(trader),
                receiver=world.for_account("binance-corp-master"),
                currency="ETH",
                network="ETH",
                receive_address=ACCOUNTS.get("binance-corp-master")
                .deposit_addresses["ETH"].address,
                foreign_address=EXTERNAL,
                withdraw_client_ids=True,
                now=world.now,
                futures=world.for_account(trader),
                transfer_currency="USDT",
                master=world.for_account("binance-corp-master"),
                sub=world.for_account("binance-corp-sub"),
                rate_limited=faulty["rate_limit"].for_account(trader),
                timing_out=faulty["timeout"].for_account(trader),
                losing_answers=faulty["lost_response"].for_account(trader),
            )


class TestSimulatedUpbit(ExchangePortContract):
    @pytest.fixture
    async def venue(self, database_url: str, world_file: Path) -> AsyncIterator[Venue]:
        async with worlds(database_url, world_file) as (world, faulty):
            trader = "upbit-personal"
            yield Venue(
                trader=world.for_account(trader),
                symbol="ETH/KRW",
                sender=world.for_account(trader),
                receiver=world.for_account("binance-personal"),
                currency="ETH",
                network="ETH",
                receive_address=ACCOUNTS.get("binance-personal").deposit_addresses["ETH"].address,
                foreign_address=EXTERNAL,
                withdraw_client_ids=False,
                now=world.now,
                rate_limited=faulty["rate_limit"].for_account(trader),
                timing_out=faulty["timeout"].for_account(trader),
                losing_answers=faulty["lost_response"].for_account(trader),
            )
