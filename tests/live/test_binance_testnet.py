"""Opt-in: the Binance connector against Binance's spot testnet (real HTTP, real signing).

Run with `pytest tests/live --exchange=binance-testnet` and REBALANCER_TESTNET_API_KEY /
REBALANCER_TESTNET_SECRET set (keys from https://testnet.binance.vision). The testnet has no
withdrawal, deposit, wallet-transfer or sub-account endpoints: those are only covered by the
recorded-payload tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from rebalancer.accounts import Account, Accounts
from rebalancer.errors import RejectedError
from rebalancer.exchanges.base import OrderRequest, OrderStatus, OrderType, Side, floor_to
from rebalancer.exchanges.live import Credentials

SYMBOL = "ETH/USDT"


@pytest.fixture
async def testnet(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    if "binance-testnet" not in request.config.getoption("--exchange"):
        pytest.skip("opt-in: --exchange=binance-testnet")
    key = os.environ.get("REBALANCER_TESTNET_API_KEY")
    secret = os.environ.get("REBALANCER_TESTNET_SECRET")
    if not key or not secret:
        pytest.skip("REBALANCER_TESTNET_API_KEY and REBALANCER_TESTNET_SECRET are not set")
    from rebalancer.exchanges.binance import BinanceExchange

    account = Account(id="testnet", exchange="binance")
    port = BinanceExchange(account, Accounts(accounts={"testnet": account}),
                           Credentials(key, secret), testnet=True)
    try:
        yield port
    finally:
        await port.close()


async def test_rules_price_and_balance_are_read(testnet: object) -> None:
    from rebalancer.exchanges.binance import BinanceExchange

    assert isinstance(testnet, BinanceExchange)
    rules = await testnet.market(SYMBOL)
    assert rules.amount_step > 0 and rules.min_notional > 0
    assert await testnet.ticker_price(SYMBOL) > 0
    assert await testnet.balance("USDT") >= 0


async def test_a_minimum_market_buy_and_sell_are_found_again_by_client_id(
    testnet: object,
) -> None:
    from rebalancer.exchanges.binance import BinanceExchange

    assert isinstance(testnet, BinanceExchange)
    rules = await testnet.market(SYMBOL)
    price = await testnet.ticker_price(SYMBOL)
    buy_id = f"rb-live-{uuid.uuid4().hex[:12]}"
    quote = max(rules.min_notional * 2, Decimal(11))
    bought = await testnet.create_order(OrderRequest(
        buy_id, SYMBOL, Side.BUY, OrderType.MARKET, quote_amount=quote))
    assert bought.status == OrderStatus.CLOSED and bought.client_id == buy_id
    assert await testnet.fetch_order(buy_id, SYMBOL) == bought
    sell_id = f"rb-live-{uuid.uuid4().hex[:12]}"
    amount = floor_to(bought.filled - (bought.fee if bought.fee_currency == "ETH" else 0),
                      rules.amount_step)
    if amount * price >= rules.min_notional:
        sold = await testnet.create_order(OrderRequest(
            sell_id, SYMBOL, Side.SELL, OrderType.MARKET, amount=amount))
        assert sold.status == OrderStatus.CLOSED


async def test_withdrawals_are_refused_on_the_testnet(testnet: object) -> None:
    from rebalancer.exchanges.binance import BinanceExchange

    assert isinstance(testnet, BinanceExchange)
    with pytest.raises(RejectedError):
        await testnet.withdrawal_rules("ETH", "ETH")
