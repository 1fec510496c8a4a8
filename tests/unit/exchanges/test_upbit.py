"""The Upbit connector on the fake Upbit: ccxt's real signing and parsing, our normalised
results, and the exact requests sent."""

# Over 400 lines on purpose: every call of the port has its exact-request test here, next to
# the one fixture they share; the contract suite covers the behaviour common to all venues.

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from rebalancer.accounts import Accounts
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
from rebalancer.exchanges.upbit import DEPOSIT_STATUS, WITHDRAWAL_STATUS, UpbitExchange
from tests.support.venues.chain import Chain
from tests.support.venues.http import Fault, Wire
from tests.support.venues.upbit import UpbitVenue

ME, OTHER = "upbit-personal", "upbit-second"
ADDRESS = "0x8894e0a0c962cb723c1976a4421c95949be2d4e3"
TAGGED = "rXRPdestination000000000000000000"
ACCOUNTS = Accounts.model_validate({"accounts": {
    ME: {"exchange": "upbit"},
    OTHER: {"exchange": "upbit",
            "deposit_addresses": {"ETH": {"address": ADDRESS, "network": "ETH"}}},
}})
KEY, SECRET = "my-access-key-0123", "my-secret-key-4567"
PRICE = Decimal("4321000")


@dataclass
class Setup:
    upbit: UpbitVenue
    port: UpbitExchange
    wire: Wire
    other: UpbitExchange
    ports: list[UpbitExchange]

    def another(self, *, faults: list[Fault] | None = None, read_only: bool = False,
                ) -> tuple[UpbitExchange, Wire]:
        port, wire = self.upbit.port(ME, ACCOUNTS, faults=faults, read_only=read_only)
        self.ports.append(port)
        return port, wire


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    chain = Chain()
    upbit = UpbitVenue(chain)
    upbit.add_account(ME, KEY, SECRET)
    upbit.add_account(OTHER, "other-access-key", "other-secret-key")
    upbit.fund(ME, "KRW", "1000000")
    upbit.fund(ME, "ETH", "1")
    upbit.register(ME, "ETH", "ETH", ADDRESS)
    chain.register("ETH", ADDRESS, upbit, OTHER)
    port, wire = upbit.port(ME, ACCOUNTS)
    other, _ = upbit.port(OTHER, ACCOUNTS)
    state = Setup(upbit, port, wire, other, [port, other])
    yield state
    for each in state.ports:
        await each.close()


def buy(client_id: str, krw: str) -> OrderRequest:
    return OrderRequest(client_id, "ETH/KRW", Side.BUY, OrderType.MARKET,
                        quote_amount=Decimal(krw))


# -- market rules ---------------------------------------------------------------------------


async def test_market_rules_read_the_minimum_and_fees_at_runtime_and_apply_the_krw_ticks(
    setup: Setup,
) -> None:
    setup.upbit.min_total = Decimal("7000")
    rules = await setup.port.market("ETH/KRW")
    assert setup.wire.last("GET", "/v1/orders/chance").params == {"market": "KRW-ETH"}
    assert (rules.min_notional, rules.taker_fee) == (Decimal(7000), Decimal("0.0005"))
    assert rules.market_buy_by_quote_only
    # ccxt says 1e-8 for every Upbit price; the KRW units are ours.
    assert [rules.price_tick(Decimal(p)) for p in (
        "4321000", "750000", "123000", "60000", "12345", "5000", "4999", "100")] == [
        Decimal(t) for t in ("1000", "500", "100", "50", "10", "5", "1", "1")]


# -- orders ---------------------------------------------------------------------------------


async def test_a_market_buy_is_sent_as_krw_to_spend_and_its_cancel_state_judged_a_fill(
    setup: Setup,
) -> None:
    order = await setup.port.create_order(buy("u-buy", "10000"))
    sent = setup.wire.last("POST", "/v1/orders")
    assert sent.params == {"market": "KRW-ETH", "side": "bid", "ord_type": "price",
                           "price": "10000", "identifier": "u-buy"}
    assert "volume" not in sent.params
    # 10,000 KRW buys 0.00231427 ETH at 4,321,000: the unspent KRW is refunded and Upbit
    # ends the order `cancel`; it executed all it could, so it is a fill.
    volume = Decimal("0.00231427")
    assert (order.status, order.raw_status) == (OrderStatus.CLOSED, "cancel")
    assert (order.client_id, order.side, order.type) == ("u-buy", Side.BUY, OrderType.MARKET)
    assert order.filled == volume and order.cost == volume * PRICE
    assert order.fee == volume * PRICE * Decimal("0.0005") and order.fee_currency == "KRW"
    assert order.average_price == PRICE
    assert setup.upbit.free(ME, "KRW") == Decimal(1000000) - order.cost - order.fee
    assert setup.upbit.free(ME, "ETH") == 1 + volume


async def test_a_market_buy_in_base_amount_is_refused_before_any_request(setup: Setup) -> None:
    with pytest.raises(RejectedError, match="KRW amount only"):
        await setup.port.create_order(OrderRequest(
            "u-base", "ETH/KRW", Side.BUY, OrderType.MARKET, amount=Decimal("0.01")))
    assert setup.wire.sent == []


async def test_a_market_sell_is_sent_by_volume_and_closes(setup: Setup) -> None:
    order = await setup.port.create_order(OrderRequest(
        "u-sell", "ETH/KRW", Side.SELL, OrderType.MARKET, amount=Decimal("0.01")))
    assert setup.wire.last("POST", "/v1/orders").params == {
        "market": "KRW-ETH", "side": "ask", "ord_type": "market", "volume": "0.01",
        "identifier": "u-sell"}
    assert (order.status, order.filled, order.cost) == (
        OrderStatus.CLOSED, Decimal("0.01"), Decimal("0.01") * PRICE)
    assert setup.upbit.free(ME, "KRW") == 1000000 + order.cost - order.fee


async def test_a_limit_buy_on_the_tick_rests_and_one_off_the_tick_is_never_sent(
    setup: Setup,
) -> None:
    with pytest.raises(RejectedError, match="tick 1000"):
        await setup.port.create_order(OrderRequest(
            "u-off", "ETH/KRW", Side.BUY, OrderType.LIMIT, amount=Decimal("0.01"),
            price=Decimal("3888500")))
    assert setup.wire.count("POST", "/v1/orders") == 0
    order = await setup.port.create_order(OrderRequest(
        "u-rest", "ETH/KRW", Side.BUY, OrderType.LIMIT, amount=Decimal("0.01"),
        price=Decimal("3888000")))
    assert setup.wire.last("POST", "/v1/orders").params == {
        "market": "KRW-ETH", "side": "bid", "ord_type": "limit", "price": "3888000",
        "volume": "0.01", "identifier": "u-rest"}
    assert (order.status, order.raw_status, order.filled) == (OrderStatus.OPEN, "wait", 0)
    assert setup.upbit.locked(ME, "KRW") == Decimal("38880") * Decimal("1.0005")


async def test_a_resting_order_is_canceled_by_identifier_and_read_back(setup: Setup) -> None:
    await setup.port.create_order(OrderRequest(
        "u-cancel", "ETH/KRW", Side.BUY, OrderType.LIMIT, amount=Decimal("0.01"),
        price=Decimal("3888000")))
    assert await setup.port.cancel_order("u-cancel", "ETH/KRW") is None
    # Not ccxt's cancel_order, which would send only a uuid.
    assert setup.wire.last("DELETE", "/v1/order").params == {"identifier": "u-cancel"}
    found = await setup.port.fetch_order("u-cancel", "ETH/KRW")
    assert found is not None
    assert (found.status, found.raw_status, found.filled) == (OrderStatus.CANCELED, "cancel", 0)
    assert setup.upbit.locked(ME, "KRW") == 0
    # Canceling it again is refused: the caller reads the order back to know how it ended.
    with pytest.raises(RejectedError):
        await setup.port.cancel_order("u-cancel", "ETH/KRW")


async def test_an_order_under_the_krw_minimum_is_refused_before_sending(setup: Setup) -> None:
    with pytest.raises(RejectedError, match="below the minimum"):
        await setup.port.create_order(buy("u-small", "4999"))
    assert setup.wire.count("POST", "/v1/orders") == 0


async def test_an_order_is_looked_up_by_identifier_through_the_raw_endpoint(
    setup: Setup,
) -> None:
    order = await setup.port.create_order(buy("u-find", "20000"))
    found = await setup.port.fetch_order("u-find", "ETH/KRW")
    # Not ccxt's fetch_order, which would send uuid=None.
    assert setup.wire.last("GET", "/v1/order").params == {"identifier": "u-find"}
    assert found == order
    assert await setup.port.fetch_order("u-never", "ETH/KRW") is None
    assert setup.wire.last("GET", "/v1/order").params == {"identifier": "u-never"}


@pytest.mark.parametrize(("state", "executed", "remaining", "status"), [
    ("wait", "0", "0.01", OrderStatus.OPEN),
    ("watch", "0", "0.01", OrderStatus.OPEN),
    ("done", "0.01", "0", OrderStatus.CLOSED),
    ("cancel", "0", "0.01", OrderStatus.CANCELED),
    ("cancel", "0.004", "0.006", OrderStatus.CANCELED),  # partly filled, then canceled
    ("cancel", "0.01", "0", OrderStatus.CLOSED),
    ("prevented", "0", "0.01", OrderStatus.UNKNOWN),  # not in the table: never guessed
])
async def test_order_states_map_and_an_unknown_one_is_kept_raw(
    setup: Setup, state: str, executed: str, remaining: str, status: OrderStatus,
) -> None:
    await setup.port.create_order(OrderRequest(
        "u-state", "ETH/KRW", Side.BUY, OrderType.LIMIT, amount=Decimal("0.01"),
        price=Decimal("3000000")))
    [stored] = setup.upbit.accounts[ME].orders.values()
    stored.update(state=state, executed_volume=executed, remaining_volume=remaining)
    found = await setup.port.fetch_order("u-state", "ETH/KRW")
    assert found is not None and (found.status, found.raw_status) == (status, state)
    assert found.raw["state"] == state


async def test_a_used_identifier_is_a_duplicate_even_after_a_refused_order(
    setup: Setup,
) -> None:
    with pytest.raises(RejectedError) as refused:
        await setup.port.create_order(buy("u-poor", "5000000"))
    assert not isinstance(refused.value, UnknownOutcomeError)
    with pytest.raises(DuplicateClientIdError):
        await setup.port.create_order(buy("u-poor", "10000"))
    assert await setup.port.fetch_order("u-poor", "ETH/KRW") is None
    assert setup.upbit.free(ME, "KRW") == 1000000


# -- withdrawals and deposits ---------------------------------------------------------------


async def test_withdrawal_rules_come_from_the_withdraw_chance_of_the_network(
    setup: Setup,
) -> None:
    rules = await setup.port.withdrawal_rules("ETH", "ETH")
    assert setup.wire.last("GET", "/v1/withdraws/chance").params == {
        "currency": "ETH", "net_type": "ETH"}
    assert (rules.fee, rules.minimum, rules.multiple, rules.fee_included) == (
        Decimal("0.01"), Decimal("0.02"), Decimal("0.0001"), False)
    with pytest.raises(RejectedError):
        await setup.port.withdrawal_rules("ETH", "TRON")


async def test_a_withdrawal_names_its_network_and_pays_the_fee_on_top(setup: Setup) -> None:
    sent = await setup.port.withdraw(WithdrawRequest(
        "w-1", "ETH", Decimal("0.05"), ADDRESS, "ETH"))
    assert setup.wire.last("POST", "/v1/withdraws/coin").params == {
        "amount": "0.05", "net_type": "ETH", "currency": "ETH", "address": ADDRESS}
    assert (sent.status, sent.raw_status) == (TransferStatus.PENDING, "WAITING")
    assert (sent.amount, sent.fee, sent.received) == (
        Decimal("0.05"), Decimal("0.01"), Decimal("0.05"))
    assert (sent.address, sent.network, sent.client_id) == (ADDRESS, "ETH", "w-1")
    assert setup.upbit.free(ME, "ETH") == Decimal("0.94")


async def test_a_tag_is_sent_as_the_secondary_address(setup: Setup) -> None:
    setup.upbit.register(ME, "ETH", "ETH", TAGGED, "12345")
    await setup.port.withdraw(WithdrawRequest(
        "w-tag", "ETH", Decimal("0.05"), TAGGED, "ETH", tag="12345"))
    sent = setup.wire.last("POST", "/v1/withdraws/coin").params
    assert (sent["address"], sent["secondary_address"]) == (TAGGED, "12345")


async def test_withdrawals_are_matched_in_history_by_currency_amount_and_time(
    setup: Setup,
) -> None:
    since = datetime.now(UTC)
    first = await setup.port.withdraw(WithdrawRequest(
        "w-a", "ETH", Decimal("0.05"), ADDRESS, "ETH"))
    await setup.port.withdraw(WithdrawRequest("w-b", "ETH", Decimal("0.07"), ADDRESS, "ETH"))
    match = HistoryMatch("ETH", Decimal("0.05"), since, ADDRESS)
    found = await setup.port.fetch_withdrawal("w-a", match)
    assert setup.wire.last("GET", "/v1/withdraws").params == {"currency": "ETH", "limit": "100"}
    assert found is not None and found.exchange_id == first.exchange_id
    assert found.client_id == "w-a" and found.status == TransferStatus.PENDING
    # Earlier than `since`, another amount, or claimed by another task: not ours.
    later = HistoryMatch("ETH", Decimal("0.05"), since + timedelta(seconds=5), ADDRESS)
    assert await setup.port.fetch_withdrawal("w-a", later) is None
    assert await setup.port.fetch_withdrawal(
        "w-a", HistoryMatch("ETH", Decimal("0.06"), since, ADDRESS)) is None
    claimed = HistoryMatch("ETH", Decimal("0.05"), since, ADDRESS,
                           exclude_ids=frozenset({first.exchange_id}))
    assert await setup.port.fetch_withdrawal("w-a", claimed) is None


async def test_several_candidates_are_an_unknown_outcome_naming_them_until_the_id_narrows(
    setup: Setup,
) -> None:
    since = datetime.now(UTC)
    request = WithdrawRequest("w-same", "ETH", Decimal("0.05"), ADDRESS, "ETH")
    first = await setup.port.withdraw(request)
    second = await setup.port.withdraw(request)
    match = HistoryMatch("ETH", Decimal("0.05"), since, ADDRESS)
    with pytest.raises(UnknownOutcomeError) as ambiguous:
        await setup.port.fetch_withdrawal("w-same", match)
    assert first.exchange_id in str(ambiguous.value)
    assert second.exchange_id in str(ambiguous.value)
    narrowed = HistoryMatch("ETH", Decimal("0.05"), since, ADDRESS,
                            exchange_id=second.exchange_id)
    found = await setup.port.fetch_withdrawal("w-same", narrowed)
    assert found is not None and found.exchange_id == second.exchange_id
    others = HistoryMatch("ETH", Decimal("0.05"), since, ADDRESS,
                          exclude_ids=frozenset({first.exchange_id}))
    found = await setup.port.fetch_withdrawal("w-same", others)
    assert found is not None and found.exchange_id == second.exchange_id


async def test_a_withdrawal_completes_with_a_normalised_txid_and_arrives_as_a_deposit(
    setup: Setup,
) -> None:
    since = datetime.now(UTC)
    sent = await setup.port.withdraw(WithdrawRequest(
        "w-go", "ETH", Decimal("0.05"), ADDRESS, "ETH"))
    match = HistoryMatch("ETH", Decimal("0.05"), since, ADDRESS, exchange_id=sent.exchange_id)
    states = []
    for _ in range(3):
        found = await setup.port.fetch_withdrawal("w-go", match)
        assert found is not None
        states.append((found.raw_status, found.status))
    assert states == [("PROCESSING", TransferStatus.PENDING), ("DONE", TransferStatus.OK),
                      ("DONE", TransferStatus.OK)]
    assert found.txid and not found.txid.startswith("0x") and found.txid == found.txid.lower()
    [deposit] = await setup.other.fetch_deposits("ETH", since)
    assert (deposit.status, deposit.raw_status, deposit.txid, deposit.amount) == (
        TransferStatus.OK, "ACCEPTED", found.txid, Decimal("0.05"))
    assert setup.upbit.free(OTHER, "ETH") == Decimal("0.05")


@pytest.mark.parametrize("raw", [*sorted(WITHDRAWAL_STATUS), "DONE", "CANCELLED", "Almost"])
async def test_withdrawal_states_in_either_case_and_unknown_ones_kept(
    setup: Setup, raw: str,
) -> None:
    since = datetime.now(UTC)
    sent = await setup.port.withdraw(WithdrawRequest(
        "w-s", "ETH", Decimal("0.05"), ADDRESS, "ETH"))
    [stored] = setup.upbit.accounts[ME].withdrawals
    stored["state"] = raw  # read back as it is now: the fake advances WAITING/PROCESSING only
    found = await setup.port.fetch_withdrawal(
        "w-s", HistoryMatch("ETH", Decimal("0.05"), since, exchange_id=sent.exchange_id))
    assert found is not None and found.raw_status == raw
    assert found.status == WITHDRAWAL_STATUS.get(raw.lower(), TransferStatus.UNKNOWN)
    if raw == "Almost":
        assert found.status == TransferStatus.UNKNOWN


@pytest.mark.parametrize(("raw", "status"), [
    # (the fake advances an upper-case PROCESSING on a read, so the lower case is read here)
    ("processing", TransferStatus.PENDING), ("ACCEPTED", TransferStatus.OK),
    ("accepted", TransferStatus.OK), ("TRAVEL_RULE_SUSPECTED", TransferStatus.PENDING),
    ("REFUNDING", TransferStatus.FAILED), ("refunded", TransferStatus.FAILED),
    ("REJECTED", TransferStatus.FAILED), ("CANCELLED", TransferStatus.CANCELED),
    ("canceled", TransferStatus.CANCELED), ("DONE", TransferStatus.UNKNOWN),
    ("HELD_FOR_REVIEW", TransferStatus.UNKNOWN),
])
async def test_deposit_states_map_and_unknown_ones_are_kept_raw(
    setup: Setup, raw: str, status: TransferStatus,
) -> None:
    since = datetime.now(UTC)
    setup.upbit.credit_deposit(OTHER, "ETH", Decimal("0.3"), network="ETH", address=ADDRESS,
                               tag=None, txid="0xABC", internal=False)
    setup.upbit.accounts[OTHER].deposits[0]["state"] = raw
    [deposit] = await setup.other.fetch_deposits("ETH", since)
    assert (deposit.status, deposit.raw_status, deposit.txid) == (status, raw, "abc")
    assert deposit.raw["state"] == raw
    assert set(DEPOSIT_STATUS) >= {"processing", "accepted", "travel_rule_suspected"}


async def test_deposits_are_read_by_currency_since_a_moment(setup: Setup) -> None:
    setup.upbit.credit_deposit(OTHER, "ETH", Decimal("0.1"), network="ETH", address=ADDRESS,
                               tag=None, txid="0x01", internal=False)
    setup.upbit.accounts[OTHER].deposits[0]["created_at"] = "2020-01-01T09:00:00+09:00"
    since = datetime.now(UTC)
    setup.upbit.credit_deposit(OTHER, "ETH", Decimal("0.2"), network="ETH", address=ADDRESS,
                               tag=None, txid="0x02", internal=True)
    other, wire = setup.upbit.port(OTHER, ACCOUNTS)
    setup.ports.append(other)
    [deposit] = await other.fetch_deposits("ETH", since)
    assert wire.last("GET", "/v1/deposits").params == {"currency": "ETH", "limit": "100"}
    assert (deposit.amount, deposit.txid, deposit.network, deposit.internal) == (
        Decimal("0.2"), "02", "ETH", True)


# -- refusals and faults at the boundary ----------------------------------------------------


async def test_transfers_are_refused_without_a_request(setup: Setup) -> None:
    with pytest.raises(RejectedError):
        await setup.port.transfer(TransferRequest(
            "t", "KRW", Decimal(1), Wallet.SPOT, Wallet.FUTURES))
    with pytest.raises(RejectedError):
        await setup.port.master_transfer(MasterTransferRequest(
            "m", "KRW", Decimal(1), ME, OTHER))
    with pytest.raises(RejectedError):
        await setup.port.balance("KRW", Wallet.FUTURES)
    match = HistoryMatch("KRW", Decimal(1), datetime.now(UTC))
    assert await setup.port.fetch_transfer("t", match) is None
    assert await setup.port.fetch_master_transfer("m", match) is None
    assert setup.wire.sent == []


async def test_a_read_only_account_sends_no_order_and_no_withdrawal(setup: Setup) -> None:
    port, wire = setup.another(read_only=True)
    with pytest.raises(RejectedError, match="read-only"):
        await port.withdraw(WithdrawRequest("w-ro", "ETH", Decimal("0.05"), ADDRESS, "ETH"))
    assert wire.sent == []
    with pytest.raises(RejectedError, match="read-only"):
        await port.create_order(buy("u-ro", "10000"))
    assert wire.count("POST", "/v1/orders") == 0
    assert await port.balance("KRW") == 1000000  # reads still work


async def test_a_rate_limit_is_retryable_and_executes_nothing(setup: Setup) -> None:
    await setup.port.market("ETH/KRW")
    port, wire = setup.another(faults=[Fault("rate_limit", "POST", "/v1/orders")])
    with pytest.raises(RetryableError):
        await port.create_order(buy("u-429", "10000"))
    assert wire.count("POST", "/v1/orders") == 1
    assert await setup.port.fetch_order("u-429", "ETH/KRW") is None


@pytest.mark.parametrize("kind", ["timeout", "lost_response", "server_error"])
async def test_an_order_without_an_answer_is_an_unknown_outcome_and_not_resent(
    setup: Setup, kind: str,
) -> None:
    port, wire = setup.another(faults=[Fault(kind, "POST", "/v1/orders")])
    with pytest.raises(UnknownOutcomeError) as unknown:
        await port.create_order(buy("u-lost", "10000"))
    assert not isinstance(unknown.value, DuplicateClientIdError)
    assert wire.count("POST", "/v1/orders") == 1
    found = await setup.port.fetch_order("u-lost", "ETH/KRW")
    assert (found is None) == (kind == "timeout")  # a timeout never reached Upbit


@pytest.mark.parametrize("kind", ["timeout", "server_error"])
async def test_a_withdrawal_without_an_answer_is_an_unknown_outcome_found_in_history(
    setup: Setup, kind: str,
) -> None:
    since = datetime.now(UTC)
    port, wire = setup.another(faults=[Fault(kind, "POST", "/v1/withdraws/coin")])
    with pytest.raises(UnknownOutcomeError):
        await port.withdraw(WithdrawRequest("w-lost", "ETH", Decimal("0.05"), ADDRESS, "ETH"))
    assert wire.count("POST", "/v1/withdraws/coin") == 1
    found = await setup.port.fetch_withdrawal(
        "w-lost", HistoryMatch("ETH", Decimal("0.05"), since, ADDRESS))
    assert (found is None) == (kind == "timeout")


async def test_a_timed_out_read_is_retryable(setup: Setup) -> None:
    port, _ = setup.another(faults=[Fault("timeout", "GET", "/v1/order")])
    with pytest.raises(RetryableError) as error:
        await port.fetch_order("u-any", "ETH/KRW")
    assert not isinstance(error.value, UnknownOutcomeError)


async def test_the_signature_is_checked_and_no_error_message_carries_a_secret(
    setup: Setup,
) -> None:
    setup.upbit.accounts[ME].secret = "the-venue-expects-another-secret"
    messages = []
    for call in (lambda: setup.port.balance("KRW"),
                 lambda: setup.port.create_order(buy("u-auth", "10000")),
                 lambda: setup.port.withdraw(WithdrawRequest(
                     "w-auth", "ETH", Decimal("0.05"), ADDRESS, "ETH"))):
        with pytest.raises(RejectedError) as refused:
            await call()
        messages.append(str(refused.value))
    setup.upbit.accounts[ME].secret = SECRET
    for kind in ("rate_limit", "timeout", "server_error"):
        port, _ = setup.another(faults=[Fault(kind)])
        with pytest.raises((RetryableError, UnknownOutcomeError)) as failed:
            await port.withdraw(WithdrawRequest("w-f", "ETH", Decimal("0.05"), ADDRESS, "ETH"))
        messages.append(str(failed.value))
    tokens = [r.headers["Authorization"].removeprefix("Bearer ") for r in setup.wire.sent
              if "Authorization" in r.headers]
    assert tokens and "jwt_verification" in messages[0]
    for message in messages:
        for secret in (KEY, SECRET, *tokens, *(t.split(".")[2] for t in tokens)):
            assert secret not in message
