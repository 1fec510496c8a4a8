"""The exchange port contract run against the Upbit connector on the fake Upbit (stubbed HTTP)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from rebalancer.accounts import Accounts
from rebalancer.exchanges.upbit import UpbitExchange
from tests.contract.exchange_port import ExchangePortContract, Venue
from tests.support.venues.chain import Chain
from tests.support.venues.http import Fault
from tests.support.venues.upbit import UpbitVenue

TRADER, RECEIVER = "upbit-personal", "upbit-second"
RECEIVE_ADDRESS = "0x8894e0a0c962cb723c1976a4421c95949be2d4e3"
FOREIGN_ADDRESS = "0x00000000219ab540356cbb839cbe05303d7705fa"  # registered by nobody
ACCOUNTS = Accounts.model_validate({"accounts": {
    TRADER: {"exchange": "upbit", "withdrawal_allowlist": [
        {"currency": "ETH", "network": "ETH", "address": RECEIVE_ADDRESS}]},
    RECEIVER: {"exchange": "upbit", "deposit_addresses": {
        "ETH": {"address": RECEIVE_ADDRESS, "network": "ETH"}}},
}})


async def now() -> datetime:
    return datetime.now(UTC)


class TestUpbitConnector(ExchangePortContract):
    @pytest.fixture
    async def venue(self) -> AsyncIterator[Venue]:
        chain = Chain()
        upbit = UpbitVenue(chain)
        upbit.add_account(TRADER, "trader-access-key", "trader-secret-key")
        upbit.add_account(RECEIVER, "second-access-key", "second-secret-key")
        upbit.fund(TRADER, "KRW", "10000000000")
        upbit.fund(TRADER, "ETH", "2")
        upbit.register(TRADER, "ETH", "ETH", RECEIVE_ADDRESS)
        chain.register("ETH", RECEIVE_ADDRESS, upbit, RECEIVER)
        ports: list[UpbitExchange] = []

        def port(account: str, faults: list[Fault] | None = None) -> UpbitExchange:
            connector, _ = upbit.port(account, ACCOUNTS, faults=faults)
            ports.append(connector)
            return connector

        trader = port(TRADER)
        yield Venue(
            trader=trader,
            symbol="ETH/KRW",
            sender=trader,
            receiver=port(RECEIVER),
            currency="ETH",
            network="ETH",
            receive_address=RECEIVE_ADDRESS,
            foreign_address=FOREIGN_ADDRESS,
            withdraw_client_ids=False,
            now=now,
            rate_limited=port(TRADER, [Fault("rate_limit")]),
            # Order calls only: the reads before the POST (markets, order rules) answer.
            timing_out=port(TRADER, [Fault("timeout", "POST", "/v1/orders"),
                                     Fault("timeout", "GET", "/v1/order")]),
            losing_answers=port(TRADER, [Fault("lost_response", "POST", "/v1/orders")]),
        )
        for connector in ports:
            await connector.close()
