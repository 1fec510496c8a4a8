"""The Binance connector on the fake REST API: ccxt's real signing and parsing, our normalised
results, and the exact method, path and parameters sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from rebalancer.errors import (
    DuplicateClientIdError,
    RejectedError,
    RetryableError,
    UnknownOutcomeError,
)
from rebalancer.exchanges.base import (
    HistoryMatch,
    MasterTransferRequest,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
    TransferRequest,
    TransferStatus,
    Wallet,
    WithdrawRequest,
)
from rebalancer.exchanges.binance import BinanceExchange
from tests.support.venues.binance import FakeBinance
from tests.support.venues.binance_world import ACCOUNTS, arranged
from tests.support.venues.http import Fault, Wire

MASTER = ACCOUNTS.get("binance-corp-master").deposit_addresses["ETH"].address
ORDER = ("POST", "/api/v3/order")
WITHDRAW = ("POST", "/sapi/v1/capital/withdraw/apply")
TRANSFER = ("POST", "/sapi/v1/asset/transfer")
PortMaker = Callable[..., tuple[BinanceExchange, Wire]]


@pytest.fixture
def fake() -> FakeBinance:
    """The default config's Binance accounts on one fake, funded."""
    return arranged()


@pytest.fixture
async def make(fake: FakeBinance) -> AsyncIterator[PortMaker]:
    """Builds ports on the fake and closes them after the test."""
    made: list[BinanceExchange] = []

    def build(name: str = "binance-personal", **kwargs: object) -> tuple[BinanceExchange, Wire]:
        port, wire = fake.port(ACCOUNTS, name, **kwargs)  # type: ignore[arg-type]
        made.append(port)
        return port, wire

    yield build
    await asyncio.gather(*(p.close() for p in made))


def buy(client_id: str, **kwargs: object) -> OrderRequest:
    return OrderRequest(client_id, "ETH/USDT", Side.BUY, OrderType.MARKET, **kwargs)  # type: ignore[arg-type]


def signed(params: dict[str, object]) -> dict[str, object]:
    """The request's own parameters, without the signing ones."""
    return {k: v for k, v in params.items() if k not in ("timestamp", "recvWindow", "signature")}


# -- markets ----------------------------------------------------------------------------------


async def test_market_rules_come_from_the_filters_and_only_spot_markets_are_loaded(
    make: PortMaker,
) -> None:
    port, wire = make()
    rules = await port.market("ETH/USDT")
    assert (rules.amount_step, rules.min_notional) == (Decimal("0.0001"), Decimal(5))
    assert rules.price_tick(Decimal(2000)) == Decimal("0.01")
    assert not rules.market_buy_by_quote_only
    # No futures, coin-M or margin endpoints behind load_markets.
    assert sorted(wire.paths()) == [("GET", "/api/v3/exchangeInfo"),
                                    ("GET", "/sapi/v1/capital/config/getall")]


# -- orders -----------------------------------------------------------------------------------


async def test_a_market_buy_by_quote_sends_quote_order_qty_our_client_id_and_no_price(
    make: PortMaker, fake: FakeBinance,
) -> None:
    port, wire = make()
    order = await port.create_order(buy("c-quote", quote_amount=Decimal("100")))
    assert signed(wire.last(*ORDER).params) == {
        "symbol": "ETHUSDT", "side": "BUY", "type": "MARKET", "quoteOrderQty": "100",
        "newClientOrderId": "c-quote", "newOrderRespType": "FULL"}
    assert (order.status, order.client_id, order.amount) == (OrderStatus.CLOSED, "c-quote", None)
    assert (order.filled, order.cost) == (Decimal("0.05"), Decimal(100))
    assert (order.fee, order.fee_currency) == (Decimal("0.00005"), "ETH")
    assert fake.free("binance-personal", "USDT") == Decimal(9900)


async def test_a_market_buy_by_amount_sends_quantity_and_never_a_price(make: PortMaker) -> None:
    port, wire = make()
    order = await port.create_order(buy("c-qty", amount=Decimal("0.01")))
    sent = signed(wire.last(*ORDER).params)
    assert sent["quantity"] == "0.01" and "price" not in sent and "quoteOrderQty" not in sent
    assert order.amount == Decimal("0.01") and order.average_price == Decimal(2000)
    with pytest.raises(RejectedError):
        await port.create_order(buy("c-priced", amount=Decimal("0.01"), price=Decimal(2000)))
    assert wire.count(*ORDER) == 1


async def test_a_limit_order_rests_and_is_found_by_orig_client_order_id(make: PortMaker) -> None:
    port, wire = make()
    order = await port.create_order(OrderRequest(
        "c-limit", "ETH/USDT", Side.BUY, OrderType.LIMIT, amount=Decimal("0.01"),
        price=Decimal("1500.00")))
    assert signed(wire.last(*ORDER).params) == {
        "symbol": "ETHUSDT", "side": "BUY", "type": "LIMIT", "quantity": "0.01",
        "price": "1500", "timeInForce": "GTC", "newClientOrderId": "c-limit",
        "newOrderRespType": "FULL"}
    assert order.status == OrderStatus.OPEN and order.raw_status == "NEW"
    found = await port.fetch_order("c-limit", "ETH/USDT")
    assert signed(wire.last("GET", "/api/v3/order").params) == {
        "symbol": "ETHUSDT", "origClientOrderId": "c-limit"}
    assert found == order
    assert await port.fetch_order("c-none", "ETH/USDT") is None


async def test_a_resting_order_is_canceled_by_orig_client_order_id_and_read_back(
    make: PortMaker, fake: FakeBinance,
) -> None:
    port, wire = make()
    before = fake.free("binance-personal", "USDT")
    await port.create_order(OrderRequest(
        "c-cancel", "ETH/USDT", Side.BUY, OrderType.LIMIT, amount=Decimal("0.01"),
        price=Decimal("1500.00")))
    assert fake.free("binance-personal", "USDT") == before - Decimal(15)
    assert await port.cancel_order("c-cancel", "ETH/USDT") is None
    assert signed(wire.last("DELETE", "/api/v3/order").params) == {
        "symbol": "ETHUSDT", "origClientOrderId": "c-cancel"}
    found = await port.fetch_order("c-cancel", "ETH/USDT")
    assert found is not None
    assert (found.status, found.raw_status, found.filled) == (
        OrderStatus.CANCELED, "CANCELED", Decimal(0))
    assert fake.free("binance-personal", "USDT") == before
    # An order that already ended is -2011: a refusal, and the caller reads the order back.
    with pytest.raises(RejectedError):
        await port.cancel_order("c-cancel", "ETH/USDT")


async def test_off_tick_prices_and_off_step_amounts_are_refused_before_sending(
    make: PortMaker,
) -> None:
    port, wire = make()
    for request in (
        OrderRequest("c-tick", "ETH/USDT", Side.BUY, OrderType.LIMIT, amount=Decimal("0.01"),
                     price=Decimal("1500.005")),
        buy("c-step", amount=Decimal("0.00015")),
        buy("c-both", amount=Decimal("0.01"), quote_amount=Decimal(20)),
    ):
        with pytest.raises(RejectedError):
            await port.create_order(request)
    assert wire.count(*ORDER) == 0


async def test_a_fill_order_found_later_carries_its_fee_in_bnb(
    make: PortMaker, fake: FakeBinance,
) -> None:
    fake.holders["binance-personal"].bnb_fees = True
    fake.fund("binance-personal", "BNB", Decimal(1))
    port, wire = make()
    order = await port.create_order(buy("c-bnb", amount=Decimal("0.3")))
    # 600 USDT at 0.075 % in BNB at 600 USDT.
    assert (order.fee, order.fee_currency) == (Decimal("0.00075"), "BNB")
    assert await port.fetch_order("c-bnb", "ETH/USDT") == order
    assert signed(wire.last("GET", "/api/v3/myTrades").params) == {
        "symbol": "ETHUSDT", "orderId": order.exchange_id}
    assert fake.free("binance-personal", "BNB") == Decimal("0.99925")


async def test_a_used_client_id_is_looked_up_and_not_sent_although_binance_would_take_it(
    make: PortMaker, fake: FakeBinance,
) -> None:
    port, wire = make()
    await port.create_order(buy("c-again", amount=Decimal("0.01")))
    with pytest.raises(DuplicateClientIdError):
        await port.create_order(buy("c-again", amount=Decimal("0.01")))
    assert wire.count(*ORDER) == 1
    # Binance itself only refuses an id among OPEN orders: a filled one's id is taken again.
    again = await port.client.create_order("ETH/USDT", "market", "buy", "0.01", None,
                                           {"newClientOrderId": "c-again"})
    assert again["info"]["status"] == "FILLED"


async def test_an_open_orders_client_id_is_refused_as_duplicate_order_sent(
    make: PortMaker,
) -> None:
    port, _ = make()
    await port.create_order(OrderRequest("c-open", "ETH/USDT", Side.BUY, OrderType.LIMIT,
                                         amount=Decimal("0.01"), price=Decimal(1500)))
    # Past the lookup (a race): -2010 "Duplicate order sent." is a duplicate, not a refusal.
    with pytest.raises(DuplicateClientIdError, match="Duplicate order sent"):
        await port.send("order c-open", lambda: port.client.create_order(
            "ETH/USDT", "limit", "buy", "0.01", "1500", {"newClientOrderId": "c-open"}))


async def test_an_unknown_raw_order_status_is_unknown_and_kept(
    make: PortMaker, fake: FakeBinance,
) -> None:
    port, _ = make()
    await port.create_order(OrderRequest("c-odd", "ETH/USDT", Side.BUY, OrderType.LIMIT,
                                         amount=Decimal("0.01"), price=Decimal(1500)))
    fake.holders["binance-personal"].orders[-1]["status"] = "PENDING_NEW"
    found = await port.fetch_order("c-odd", "ETH/USDT")
    assert found is not None and (found.status, found.raw_status) == (
        OrderStatus.UNKNOWN, "PENDING_NEW")


# -- errors at the boundary -------------------------------------------------------------------


async def test_a_rate_limit_is_retryable(make: PortMaker) -> None:
    port, _ = make(faults=[Fault("rate_limit", "GET", "/api/v3/account")])
    with pytest.raises(RetryableError):
        await port.balance("ETH")


@pytest.mark.parametrize("kind", ["timeout", "server_error", "lost_response"])
async def test_an_order_withdrawal_or_transfer_without_an_answer_is_unknown_and_not_resent(
    make: PortMaker, fake: FakeBinance, kind: str,
) -> None:
    port, wire = make(faults=[Fault(kind, *ORDER), Fault(kind, *WITHDRAW),
                              Fault(kind, *TRANSFER)])
    with pytest.raises(UnknownOutcomeError):
        await port.create_order(buy("u-order", amount=Decimal("0.01")))
    with pytest.raises(UnknownOutcomeError):
        await port.withdraw(WithdrawRequest("u-wd", "ETH", Decimal("0.05"), MASTER, "ETH"))
    with pytest.raises(UnknownOutcomeError):
        await port.transfer(TransferRequest("u-tr", "USDT", Decimal(10), Wallet.SPOT,
                                            Wallet.FUTURES))
    assert [wire.count(*call) for call in (ORDER, WITHDRAW, TRANSFER)] == [1, 1, 1]


@pytest.mark.parametrize("code,msg", [(-1006, "An unexpected response was received from the "
                                       "message bus. Execution status unknown."),
                                      (-1007, "Timeout waiting for response from backend "
                                       "server. Send status unknown; execution status unknown.")])
async def test_execution_status_unknown_codes_on_an_order_are_unknown_outcomes(
    make: PortMaker, fake: FakeBinance, monkeypatch: pytest.MonkeyPatch, code: int, msg: str,
) -> None:
    from tests.support.venues import binance as venue

    monkeypatch.setitem(venue.ROUTES, ORDER, (
        lambda self, holder, p: venue.error(code, msg), True))
    port, wire = make()
    with pytest.raises(UnknownOutcomeError):
        await port.create_order(buy("u-code", amount=Decimal("0.01")))
    assert wire.count(*ORDER) == 1


async def test_a_read_only_account_sends_nothing(make: PortMaker) -> None:
    port, wire = make(read_only=True)
    with pytest.raises(RejectedError, match="read-only"):
        await port.withdraw(WithdrawRequest("r-wd", "ETH", Decimal("0.05"), MASTER, "ETH"))
    with pytest.raises(RejectedError, match="read-only"):
        await port.send("order r-1", lambda: port.client.create_order(
            "ETH/USDT", "market", "buy", "0.01"))
    assert wire.count(*WITHDRAW) == 0 and wire.count(*ORDER) == 0


async def test_no_key_secret_or_signature_appears_in_an_error_message(
    make: PortMaker, fake: FakeBinance,
) -> None:
    holder = fake.holders["binance-personal"]
    port, wire = make(faults=[Fault("server_error", *WITHDRAW)])
    messages = []
    for call in (
        lambda: port.withdraw(WithdrawRequest("s-wd", "ETH", Decimal("0.05"), MASTER, "ETH")),
        lambda: port.create_order(buy("s-big", amount=Decimal(100))),  # insufficient funds
    ):
        with pytest.raises(Exception) as caught:
            await call()
        messages.append(str(caught.value))
    signatures = [str(r.params["signature"]) for r in wire.sent if "signature" in r.params]
    assert signatures
    for message in messages:
        for secret in (holder.api_key, holder.secret, *signatures):
            assert secret not in message


# -- withdrawals and deposits -----------------------------------------------------------------


async def test_withdrawal_rules_come_per_network_from_the_capital_config(make: PortMaker) -> None:
    port, wire = make()
    rules = await port.withdrawal_rules("USDT", "ETH")
    assert (rules.fee, rules.minimum, rules.multiple, rules.fee_included) == (
        Decimal("3.5"), Decimal(10), Decimal("0.000001"), True)
    assert wire.last("GET", "/sapi/v1/capital/config/getall")


async def test_a_withdrawal_sends_our_id_network_and_tag_and_is_found_by_withdraw_order_id(
    make: PortMaker, fake: FakeBinance,
) -> None:
    fake.allow("binance-personal", "ETH", "ETH", "0xabc0000000000000000000000000000000000001")
    port, wire = make()
    since = datetime.now(UTC) - timedelta(seconds=1)
    sent = await port.withdraw(WithdrawRequest(
        "w-tag", "ETH", Decimal("0.05"), "0xabc0000000000000000000000000000000000001", "ETH",
        tag="memo-7"))
    assert signed(wire.last(*WITHDRAW).params) == {
        "coin": "ETH", "address": "0xabc0000000000000000000000000000000000001",
        "addressTag": "memo-7", "network": "ETH", "amount": "0.05", "withdrawOrderId": "w-tag"}
    # Gross: the fee comes out of the amount.
    assert (sent.fee, sent.received) == (Decimal("0.0016"), Decimal("0.0484"))
    found = await port.fetch_withdrawal("w-tag", HistoryMatch("ETH", Decimal("0.05"), since))
    lookup = signed(wire.last("GET", "/sapi/v1/capital/withdraw/history").params)
    assert lookup["withdrawOrderId"] == "w-tag" and lookup["coin"] == "ETH"
    assert int(str(lookup["endTime"])) - int(str(lookup["startTime"])) < 7 * 86_400_000
    assert found is not None and found.exchange_id == sent.exchange_id
    assert (found.amount, found.fee, found.received) == (
        Decimal("0.05"), Decimal("0.0016"), Decimal("0.0484"))
    assert not found.internal and found.client_id == "w-tag"
    assert await port.fetch_withdrawal("w-none", HistoryMatch("ETH", Decimal(1), since)) is None


async def test_an_internal_withdrawal_completes_without_a_chain_txid_and_arrives(
    make: PortMaker, fake: FakeBinance,
) -> None:
    port, _ = make()
    receiver, wire = make("binance-corp-master")
    since = datetime.now(UTC) - timedelta(seconds=1)
    await port.withdraw(WithdrawRequest("w-int", "ETH", Decimal("0.05"), MASTER, "ETH"))
    match = HistoryMatch("ETH", Decimal("0.05"), since)
    statuses = [(w.status, w.raw_status) for w in
                [await port.fetch_withdrawal("w-int", match) for _ in range(2)] if w]
    assert statuses == [(TransferStatus.PENDING, "4"), (TransferStatus.OK, "6")]
    done = await port.fetch_withdrawal("w-int", match)
    assert done is not None and done.internal
    assert done.raw["txId"].startswith("Internal transfer ") and done.txid == done.raw[
        "txId"].removeprefix("Internal transfer ")
    [deposit] = await receiver.fetch_deposits("ETH", since)
    assert (deposit.txid, deposit.amount, deposit.internal) == (done.txid, Decimal("0.0484"),
                                                                True)
    assert signed(wire.last("GET", "/sapi/v1/capital/deposit/hisrec").params)["coin"] == "ETH"


@pytest.mark.parametrize("raw,status", [(7, TransferStatus.FAILED), (8, TransferStatus.PENDING),
                                        (6, TransferStatus.OK), (9, TransferStatus.UNKNOWN)])
async def test_deposit_statuses_follow_the_table_and_an_unknown_one_is_kept(
    make: PortMaker, fake: FakeBinance, raw: int, status: TransferStatus,
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    fake.credit_deposit("binance-corp-master", "ETH", Decimal(1), network="ETH", address=MASTER,
                        tag=None, txid="0xABC", internal=False)
    fake.holders["binance-corp-master"].deposits[-1]["status"] = raw
    port, _ = make("binance-corp-master")
    [deposit] = await port.fetch_deposits("ETH", since)
    assert (deposit.status, deposit.raw_status, deposit.txid) == (status, str(raw), "abc")


async def test_an_unknown_withdrawal_status_is_unknown_and_kept(
    make: PortMaker, fake: FakeBinance,
) -> None:
    port, _ = make()
    since = datetime.now(UTC) - timedelta(seconds=1)
    await port.withdraw(WithdrawRequest("w-odd", "ETH", Decimal("0.05"), MASTER, "ETH"))
    fake.holders["binance-personal"].withdrawals[-1]["status"] = 12
    found = await port.fetch_withdrawal("w-odd", HistoryMatch("ETH", Decimal("0.05"), since))
    assert found is not None and (found.status, found.raw_status) == (
        TransferStatus.UNKNOWN, "12")


# -- transfers --------------------------------------------------------------------------------


async def test_a_futures_transfer_is_a_main_umfuture_asset_transfer_found_in_history(
    make: PortMaker, fake: FakeBinance,
) -> None:
    port, wire = make()
    since = datetime.now(UTC) - timedelta(seconds=1)
    done = await port.transfer(TransferRequest("t-fut", "USDT", Decimal(250), Wallet.SPOT,
                                               Wallet.FUTURES))
    assert signed(wire.last(*TRANSFER).params) == {
        "asset": "USDT", "amount": "250", "type": "MAIN_UMFUTURE"}
    assert done.status == TransferStatus.OK
    assert await port.balance("USDT", Wallet.FUTURES) == Decimal(250)
    assert wire.last("GET", "/fapi/v3/account")
    back = await port.transfer(TransferRequest("t-back", "USDT", Decimal(250), Wallet.FUTURES,
                                               Wallet.SPOT))
    assert signed(wire.last(*TRANSFER).params)["type"] == "UMFUTURE_MAIN"
    # Same amount both ways and no client id at Binance: only the exchange id tells them apart.
    with pytest.raises(UnknownOutcomeError):
        await port.fetch_transfer("t-fut", HistoryMatch("USDT", Decimal(250), since))
    known = HistoryMatch("USDT", Decimal(250), since, exchange_id=done.exchange_id)
    assert await port.fetch_transfer("t-fut", known) == done
    claimed = HistoryMatch("USDT", Decimal(250), since, exclude_ids=frozenset({back.exchange_id}))
    assert await port.fetch_transfer("t-fut", claimed) == done
    assert {signed(r.params)["type"] for r in wire.sent if r.path == "/sapi/v1/asset/transfer"
            and r.method == "GET"} == {"MAIN_UMFUTURE", "UMFUTURE_MAIN"}


async def test_a_master_transfer_is_a_universal_transfer_with_our_client_tran_id(
    make: PortMaker, fake: FakeBinance,
) -> None:
    port, wire = make("binance-corp-master")
    done = await port.master_transfer(MasterTransferRequest(
        "m-sub", "ETH", Decimal(1), "binance-corp-master", "binance-corp-sub"))
    assert signed(wire.last("POST", "/sapi/v1/sub-account/universalTransfer").params) == {
        "fromAccountType": "SPOT", "toAccountType": "SPOT", "asset": "ETH", "amount": "1",
        "clientTranId": "m-sub", "toEmail": "sub@corp.example"}
    assert (done.status, done.to_account) == (TransferStatus.OK, "binance-corp-sub")
    assert fake.free("binance-corp-sub", "ETH") == Decimal(1)
    back = await port.master_transfer(MasterTransferRequest(
        "m-back", "ETH", Decimal("0.5"), "binance-corp-sub", "binance-corp-master"))
    assert signed(wire.last("POST", "/sapi/v1/sub-account/universalTransfer").params)[
        "fromEmail"] == "sub@corp.example"
    assert back.from_account == "binance-corp-sub" and back.status == TransferStatus.OK
    match = HistoryMatch("ETH", Decimal("0.5"), datetime.now(UTC) - timedelta(minutes=1))
    assert await port.fetch_master_transfer("m-back", match) == back
    assert signed(wire.last("GET", "/sapi/v1/sub-account/universalTransfer").params) == {
        "clientTranId": "m-back", "toEmail": "master@corp.example"}


async def test_a_master_transfer_is_refused_before_any_request_unless_master_of_both_sides(
    make: PortMaker,
) -> None:
    sub, sub_wire = make("binance-corp-sub")
    master, master_wire = make("binance-corp-master")
    personal, personal_wire = make("binance-personal")
    with pytest.raises(RejectedError):
        await sub.master_transfer(MasterTransferRequest(
            "m-sub-key", "ETH", Decimal(1), "binance-corp-sub", "binance-corp-master"))
    with pytest.raises(RejectedError):
        await master.master_transfer(MasterTransferRequest(
            "m-foreign", "ETH", Decimal(1), "binance-corp-master", "binance-personal"))
    with pytest.raises(RejectedError):
        await personal.master_transfer(MasterTransferRequest(
            "m-personal", "ETH", Decimal(1), "binance-personal", "binance-corp-sub"))
    assert sub_wire.sent == master_wire.sent == personal_wire.sent == []


async def test_a_signature_made_with_the_wrong_secret_is_refused(
    make: PortMaker, fake: FakeBinance,
) -> None:
    from rebalancer.exchanges.live import Credentials

    holder = fake.holders["binance-personal"]
    port, _ = make(credentials=Credentials(holder.api_key, "not-the-secret"))
    with pytest.raises(RejectedError) as caught:
        await port.balance("ETH")
    assert "not-the-secret" not in str(caught.value)
