"""The exchange port contract run against the Binance connector on a fake of Binance's REST API
(ccxt's own signing and parsing; only its HTTP layer stubbed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from rebalancer.exchanges.binance import BinanceExchange
from tests.contract.exchange_port import ExchangePortContract, Venue
from tests.support.venues.binance_world import ACCOUNTS, EXTERNAL, arranged
from tests.support.venues.http import Fault


async def clock() -> datetime:
    # The fake stamps its records with this machine's clock.
    return datetime.now(UTC)


class TestBinancePort(ExchangePortContract):
    @pytest.fixture
    async def venue(self) -> AsyncIterator[Venue]:
        fake = arranged()
        ports: list[BinanceExchange] = []

        def port(name: str, faults: list[Fault] | None = None) -> BinanceExchange:
            made, _ = fake.port(ACCOUNTS, name, faults=faults)
            ports.append(made)
            return made

        trader = "binance-personal"
        order = ("POST", "/api/v3/order")
        lookup = ("GET", "/api/v3/order")
        yield Venue(
            trader=port(trader),
            symbol="ETH/USDT",
            sender=port(trader),
            receiver=port("binance-corp-master"),
            currency="ETH",
            network="ETH",
            receive_address=ACCOUNTS.get("binance-corp-master").deposit_addresses["ETH"].address,
            foreign_address=EXTERNAL,
            withdraw_client_ids=True,
            now=clock,
            futures=port(trader),
            transfer_currency="USDT",
            master=port("binance-corp-master"),
            sub=port("binance-corp-sub"),
            rate_limited=port(trader, [Fault("rate_limit")]),
            # The connector looks a client id up before it sends an order (Binance accepts a
            # filled order's id again): that first lookup answers, the order and every later
            # lookup time out. A kind http.py does not know lets the request through.
            timing_out=port(trader, [Fault("pass", *lookup, times=1), Fault("timeout", *order),
                                     Fault("timeout", *lookup)]),
            losing_answers=port(trader, [Fault("lost_response", *order)]),
        )
        # ccxt's close pauses a moment per client: all at once.
        await asyncio.gather(*(made.close() for made in ports))
