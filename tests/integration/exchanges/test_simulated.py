"""The simulated world's own rules, numbers and faults against a real PostgreSQL (the port
contract every connector meets is tests/contract/)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from rebalancer.accounts import Accounts, load_accounts
from rebalancer.cli import sim as sim_cli
from rebalancer.errors import (
    DuplicateClientIdError,
    RejectedError,
    RetryableError,
    UnknownOutcomeError,
)
from rebalancer.exchanges.base import (
    Exchange,
    Exchanges,
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
from rebalancer.exchanges.simulated import DEFAULT_WORLD, Faults, SimulatedWorld
from rebalancer.service import open_exchanges
from rebalancer.settings import Settings
from tests.support import eventually

D = Decimal
SCALE = 200.0  # 60 s of confirmations take 0.3 s, a withdrawal's processing 25 ms
ACCOUNTS = load_accounts()
UPBIT_TO_BINANCE = ACCOUNTS.get("binance-personal").deposit_addresses["ETH"].address
PERSONAL_TO_MASTER = ACCOUNTS.get("binance-corp-master").deposit_addresses["ETH"].address
EXTERNAL = "0x00000000219ab540356cbb839cbe05303d7705fa"


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo world plus some ETH/USDT on our accounts, so tests need not buy first."""
    data = yaml.safe_load(DEFAULT_WORLD.read_text(encoding="utf-8"))
    data["balances"].update({
        "upbit-personal": {"KRW": "10000000000", "ETH": "2"},
        "binance-personal": {"ETH": "10", "USDT": "10000"},
        "binance-corp-master": {"ETH": "5"},
    })
    path = tmp_path_factory.mktemp("world") / "world.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def _open(database_url: str, world_file: Path, **knobs: Any) -> SimulatedWorld:
    options: dict[str, Any] = {"faults": "", "seed": 7, "time_scale": SCALE}
    options.update(knobs)
    return await SimulatedWorld.open(database_url, world=world_file, **options)


@pytest.fixture
async def world(database_url: str, world_file: Path) -> AsyncIterator[SimulatedWorld]:
    """A seeded world on the test's own database: fast clock, no faults."""
    opened = await _open(database_url, world_file)
    try:
        yield opened
    finally:
        await opened.close()


def operations(database_url: str, **where: Any) -> list[dict[str, Any]]:
    clause = " and ".join(f"{k} = %s" for k in where) or "true"
    with psycopg.connect(database_url) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        cur.execute(f"select * from sim.operations where {clause} order by id",
                    tuple(where.values()))
        return cur.fetchall()


def market_buy_krw(client_id: str, krw: str) -> OrderRequest:
    return OrderRequest(client_id=client_id, symbol="ETH/KRW", side=Side.BUY,
                        type=OrderType.MARKET, quote_amount=D(krw))


async def assert_totals_unchanged(world: SimulatedWorld) -> None:
    ok, rows = await world.check()
    assert ok, rows


def test_the_world_implements_the_exchange_ports(world: SimulatedWorld) -> None:
    # mypy checks these assignments structurally against the protocols.
    ports: Exchanges = world
    port: Exchange = ports.for_account("binance-corp-sub")
    assert (port.exchange, port.account) == ("binance", "binance-corp-sub")


# -- orders ---------------------------------------------------------------------------------


async def test_upbit_market_buy_spends_krw_and_receives_eth_less_the_fee(
    world: SimulatedWorld,
) -> None:
    upbit = world.for_account("upbit-personal")
    order = await upbit.create_order(market_buy_krw("buy-1", "1000000"))
    # Filled at the ask, truncated to the step; the fee comes out of the ETH received.
    filled = D("0.24993751")  # 1,000,000 / 4,001,000 truncated to 1e-8
    assert order.status == OrderStatus.CLOSED
    assert order.filled == filled
    assert order.cost == filled * D(4001000)
    assert order.fee == D("0.00012497") and order.fee_currency == "ETH"
    assert order.raw_status == "cancel"  # Upbit: the KRW leftover was refunded
    assert await upbit.balance("ETH") == D(2) + filled - order.fee
    assert await upbit.balance("KRW") == D(10_000_000_000) - order.cost
    assert (await world.balances())["upbit-fees"]["ETH"] == order.fee
    assert await upbit.fetch_order("buy-1", "ETH/KRW") == order
    assert await upbit.fetch_order("never-sent", "ETH/KRW") is None
    await assert_totals_unchanged(world)


async def test_upbit_refuses_a_buy_under_5000_krw_and_a_market_buy_by_eth_amount(
    world: SimulatedWorld, database_url: str,
) -> None:
    upbit = world.for_account("upbit-personal")
    with pytest.raises(RejectedError, match="minimum 5000 KRW"):
        await upbit.create_order(market_buy_krw("small", "4999"))
    with pytest.raises(RejectedError, match="quote_amount"):
        await upbit.create_order(OrderRequest(client_id="by-base", symbol="ETH/KRW",
                                              side=Side.BUY, type=OrderType.MARKET,
                                              amount=D("0.1")))
    # Exactly the minimum is fine.
    assert (await upbit.create_order(market_buy_krw("ok", "5000"))).status == OrderStatus.CLOSED
    assert [op["client_id"] for op in operations(database_url, kind="order")] == ["ok"]


async def test_upbit_refuses_a_limit_price_off_the_krw_tick_table(world: SimulatedWorld) -> None:
    upbit = world.for_account("upbit-personal")

    def limit_buy(client_id: str, price: str) -> OrderRequest:
        return OrderRequest(client_id=client_id, symbol="ETH/KRW", side=Side.BUY,
                            type=OrderType.LIMIT, amount=D("0.01"), price=D(price))

    # Above 1,000,000 KRW the tick is 1,000; between 500,000 and 1,000,000 it is 500.
    with pytest.raises(RejectedError, match="tick 1000"):
        await upbit.create_order(limit_buy("off-tick", "3999500"))
    with pytest.raises(RejectedError, match="tick 500"):
        await upbit.create_order(limit_buy("off-tick-2", "999900"))
    rules = await upbit.market("ETH/KRW")
    assert rules.price_tick(D(3999500)) == D(1000) and rules.market_buy_by_quote_only
    order = await upbit.create_order(limit_buy("on-tick", "999500"))
    assert order.status == OrderStatus.OPEN and order.raw_status == "wait"


async def test_binance_market_sell_receives_usdt_less_the_fee(world: SimulatedWorld) -> None:
    binance = world.for_account("binance-personal")
    order = await binance.create_order(OrderRequest(
        client_id="sell-1", symbol="ETH/USDT", side=Side.SELL, type=OrderType.MARKET,
        amount=D("1.00009")))
    # Truncated to the 0.0001 LOT step, sold at the bid 2899.9, 0.1 % fee in USDT.
    assert order.status == OrderStatus.CLOSED and order.raw_status == "FILLED"
    assert order.filled == D("1.0000") and order.cost == D("2899.9")
    assert order.fee == D("2.8999") and order.fee_currency == "USDT"
    assert await binance.balance("ETH") == D(9)
    assert await binance.balance("USDT") == D(10000) + D("2899.9") - D("2.8999")
    # Binance's minimum notional is 5 USDT.
    with pytest.raises(RejectedError, match="minimum 5 USDT"):
        await binance.create_order(OrderRequest(
            client_id="sell-2", symbol="ETH/USDT", side=Side.SELL, type=OrderType.MARKET,
            amount=D("0.001")))
    await assert_totals_unchanged(world)


async def test_limit_order_rests_open_then_fills_in_two_halves(
    database_url: str, world_file: Path,
) -> None:
    # A slower clock, so the half-filled state lasts long enough to be seen.
    async with await _open(database_url, world_file, time_scale=20) as world:
        binance = world.for_account("binance-personal")
        order = await binance.create_order(OrderRequest(
            client_id="limit-1", symbol="ETH/USDT", side=Side.BUY, type=OrderType.LIMIT,
            amount=D(1), price=D(2800)))
        assert order.status == OrderStatus.OPEN and order.filled == 0
        # The order's 2,800 USDT are reserved while it rests.
        assert await binance.balance("USDT") == D(7200)
        seen: list[tuple[OrderStatus, Decimal]] = [(order.status, order.filled)]

        async def closed() -> list[tuple[OrderStatus, Decimal]] | None:
            # Every distinct (status, filled) on the way is kept, so polling must stay quick.
            found = await binance.fetch_order("limit-1", "ETH/USDT")
            assert found is not None
            if (found.status, found.filled) != seen[-1]:
                seen.append((found.status, found.filled))
            return seen if seen[-1][0] == OrderStatus.CLOSED else None

        await eventually(closed, interval=0.02, what="the limit order closing")
        assert seen == [(OrderStatus.OPEN, D(0)), (OrderStatus.OPEN, D("0.5")),
                        (OrderStatus.CLOSED, D(1))]
        assert await binance.balance("USDT") == D(7200)
        assert await binance.balance("ETH") == D(10) + D(1) - D("0.001")
        await assert_totals_unchanged(world)


async def test_a_resting_order_is_canceled_its_reservation_freed_and_a_second_cancel_refused(
    database_url: str, world_file: Path,
) -> None:
    # Slow enough that the half fill comes long after: the order rests untouched.
    async with await _open(database_url, world_file, time_scale=0.01) as world:
        upbit = world.for_account("upbit-personal")
        await upbit.create_order(OrderRequest(
            client_id="rest-1", symbol="ETH/KRW", side=Side.SELL, type=OrderType.LIMIT,
            amount=D("0.5"), price=D(4100000)))
        assert await upbit.balance("ETH") == D("1.5")  # 0.5 reserved while it rests
        assert await upbit.cancel_order("rest-1", "ETH/KRW") is None
        found = await upbit.fetch_order("rest-1", "ETH/KRW")
        assert found is not None
        assert (found.status, found.raw_status, found.filled) == (
            OrderStatus.CANCELED, "cancel", 0)
        assert await upbit.balance("ETH") == D(2)
        # It is over: a second cancel is refused and changes nothing; so is one for an order
        # this account never sent.
        with pytest.raises(RejectedError, match="nothing to cancel"):
            await upbit.cancel_order("rest-1", "ETH/KRW")
        with pytest.raises(RejectedError, match="no order"):
            await upbit.cancel_order("never-sent", "ETH/KRW")
        assert await upbit.balance("ETH") == D(2)
        await assert_totals_unchanged(world)


async def test_limit_order_through_the_touch_fills_at_once_at_the_book_price(
    world: SimulatedWorld,
) -> None:
    binance = world.for_account("binance-personal")
    order = await binance.create_order(OrderRequest(
        client_id="cross", symbol="ETH/USDT", side=Side.SELL, type=OrderType.LIMIT,
        amount=D(1), price=D(2000)))
    assert order.status == OrderStatus.CLOSED and order.average_price == D("2899.9")


async def test_insufficient_funds_are_refused_and_nothing_changes(
    world: SimulatedWorld, database_url: str,
) -> None:
    binance = world.for_account("binance-personal")
    before = await world.balances()
    with pytest.raises(RejectedError, match="insufficient USDT on binance-personal"):
        await binance.create_order(OrderRequest(
            client_id="too-big", symbol="ETH/USDT", side=Side.BUY, type=OrderType.MARKET,
            amount=D(100)))
    with pytest.raises(RejectedError, match="insufficient ETH on upbit-personal"):
        await world.for_account("upbit-personal").withdraw(WithdrawRequest(
            client_id="w-too-big", currency="ETH", amount=D(5), address=UPBIT_TO_BINANCE,
            network="ETH"))
    assert await world.balances() == before
    assert operations(database_url) == []
    assert await binance.fetch_order("too-big", "ETH/USDT") is None


# -- withdrawals and deposits ---------------------------------------------------------------


async def test_upbit_withdrawal_arrives_at_binance_after_the_delay_with_the_fee_on_top(
    world: SimulatedWorld, database_url: str,
) -> None:
    upbit = world.for_account("upbit-personal")
    binance = world.for_account("binance-personal")
    since = await world.now()
    withdrawal = await upbit.withdraw(WithdrawRequest(
        client_id="w-1", currency="ETH", amount=D("0.5"), address=UPBIT_TO_BINANCE,
        network="ETH"))
    # Upbit charges the 0.01 fee on top; nothing has arrived yet, the money is in transit.
    assert withdrawal.status == TransferStatus.PENDING and withdrawal.txid is None
    assert withdrawal.fee == D("0.01") and withdrawal.received == D("0.5")
    assert withdrawal.client_id is None and not withdrawal.internal
    assert await upbit.balance("ETH") == D(2) - D("0.51")
    assert await binance.balance("ETH") == D(10)
    assert (await world.balances())["transit"]["ETH"] == D("0.5")
    await assert_totals_unchanged(world)

    match = HistoryMatch(currency="ETH", amount=D("0.5"), since=since, address=UPBIT_TO_BINANCE)

    async def sent() -> bool:
        found = await upbit.fetch_withdrawal("w-1", match)
        return found is not None and found.status == TransferStatus.OK

    await eventually(sent)
    done = await upbit.fetch_withdrawal("w-1", match)
    assert done is not None and done.txid is not None and len(done.txid) == 64
    assert done.raw_status == "DONE"
    deposits = await binance.fetch_deposits("ETH", since)
    assert [(d.txid, d.amount) for d in deposits] == [(done.txid, D("0.5"))]

    async def arrived() -> bool:
        return await binance.balance("ETH") == D("10.5")

    await eventually(arrived)
    [deposit] = await binance.fetch_deposits("ETH", since)
    assert deposit.status == TransferStatus.OK and deposit.txid == done.txid
    assert deposit.raw_status == "1" and not deposit.internal
    assert (await world.balances())["transit"]["ETH"] == 0
    [op] = operations(database_url, kind="withdraw")
    assert op["client_id"] is None and op["audit_ref"] == "w-1" and op["status"] == "ok"
    [credited] = operations(database_url, kind="deposit")
    assert credited["account"] == "binance-personal" and credited["txid"] == done.txid
    await assert_totals_unchanged(world)


async def test_binance_to_binance_withdrawal_is_internal_free_with_an_internal_txid(
    world: SimulatedWorld,
) -> None:
    personal = world.for_account("binance-personal")
    master = world.for_account("binance-corp-master")
    since = await world.now()
    withdrawal = await personal.withdraw(WithdrawRequest(
        client_id="w-int", currency="ETH", amount=D(1), address=PERSONAL_TO_MASTER,
        network="ETH"))
    assert withdrawal.internal and withdrawal.fee == 0 and withdrawal.received == D(1)
    assert withdrawal.client_id == "w-int"  # Binance keeps withdrawOrderId
    assert await personal.balance("ETH") == D(9)

    async def arrived() -> bool:
        return await master.balance("ETH") == D(6)

    await eventually(arrived, timeout=2)  # about 1 s / SCALE
    found = await personal.fetch_withdrawal("w-int", HistoryMatch("ETH", D(1), since))
    # Binance says "Internal transfer <id>"; the port gives it normalised, as <id>, on both
    # sides, so the deposit is matched exactly rather than by amount.
    assert found is not None and found.status == TransferStatus.OK
    assert found.txid == found.exchange_id
    [deposit] = await master.fetch_deposits("ETH", since)
    assert deposit.internal and deposit.txid == found.txid and deposit.status == TransferStatus.OK


async def test_binance_on_chain_withdrawal_takes_the_fee_out_of_the_amount(
    database_url: str, world_file: Path,
) -> None:
    # An allowlisted address none of our accounts owns: an on-chain withdrawal.
    data = ACCOUNTS.model_dump()
    data["accounts"]["binance-personal"]["withdrawal_allowlist"].append(
        {"currency": "ETH", "network": "ETH", "address": EXTERNAL, "tag": None})
    accounts = Accounts.model_validate(data)
    async with await _open(database_url, world_file, accounts=accounts) as world:
        binance = world.for_account("binance-personal")
        withdrawal = await binance.withdraw(WithdrawRequest(
            client_id="w-ext", currency="ETH", amount=D(1), address=EXTERNAL, network="ETH"))
        assert not withdrawal.internal
        assert withdrawal.fee == D("0.0005") and withdrawal.received == D("0.9995")
        assert await binance.balance("ETH") == D(9)

        async def arrived() -> bool:
            return (await world.balances()).get("external", {}).get("ETH") == D("0.9995")

        await eventually(arrived)
        match = HistoryMatch("ETH", D(1), withdrawal.created_at)
        found = await binance.fetch_withdrawal("w-ext", match)
        assert found is not None and found.txid is not None and found.raw_status == "6"
        await assert_totals_unchanged(world)


async def test_withdrawals_to_unregistered_addresses_below_minimum_or_off_multiple_are_refused(
    world: SimulatedWorld, database_url: str,
) -> None:
    upbit = world.for_account("upbit-personal")
    binance = world.for_account("binance-personal")
    with pytest.raises(RejectedError, match="not a registered"):
        await upbit.withdraw(WithdrawRequest(
            client_id="w-x", currency="ETH", amount=D("0.5"), address=EXTERNAL, network="ETH"))
    with pytest.raises(RejectedError, match=r"below the withdrawal minimum 0\.02"):
        await upbit.withdraw(WithdrawRequest(
            client_id="w-min", currency="ETH", amount=D("0.015"), address=UPBIT_TO_BINANCE,
            network="ETH"))
    with pytest.raises(RejectedError, match=r"multiple of 0\.0001"):
        await binance.withdraw(WithdrawRequest(
            client_id="w-mul", currency="ETH", amount=D("0.00155"),
            address=PERSONAL_TO_MASTER, network="ETH"))
    with pytest.raises(RejectedError, match="network"):
        await upbit.withdraw(WithdrawRequest(
            client_id="w-net", currency="ETH", amount=D("0.5"), address=UPBIT_TO_BINANCE,
            network=""))
    assert operations(database_url) == []
    rules = await upbit.withdrawal_rules("ETH", "ETH")
    assert (rules.fee, rules.minimum, rules.fee_included) == (D("0.01"), D("0.02"), False)
    rules = await binance.withdrawal_rules("ETH", "ETH")
    assert (rules.fee, rules.minimum, rules.multiple, rules.fee_included) == (
        D("0.0005"), D("0.001"), D("0.0001"), True)


# -- client ids -----------------------------------------------------------------------------


async def test_upbit_withdrawals_and_futures_transfers_have_no_client_id_and_match_history(
    world: SimulatedWorld, database_url: str,
) -> None:
    upbit = world.for_account("upbit-personal")
    binance = world.for_account("binance-personal")
    since = await world.now()
    request = WithdrawRequest(client_id="same", currency="ETH", amount=D("0.1"),
                              address=UPBIT_TO_BINANCE, network="ETH")
    first = await upbit.withdraw(request)
    # Found by currency, amount, address and time, whatever client id is asked for.
    found = await upbit.fetch_withdrawal("other-id", HistoryMatch(
        "ETH", D("0.1"), since, UPBIT_TO_BINANCE))
    assert found is not None and found.exchange_id == first.exchange_id
    assert await upbit.fetch_withdrawal("same", HistoryMatch("ETH", D("0.2"), since)) is None
    # The same client id again is executed again: Upbit cannot tell.
    await upbit.withdraw(request)
    assert await upbit.balance("ETH") == D(2) - 2 * D("0.11")
    with pytest.raises(UnknownOutcomeError, match="2 withdrawals"):
        await upbit.fetch_withdrawal("same", HistoryMatch("ETH", D("0.1"), since))
    later = await world.now()
    assert await upbit.fetch_withdrawal("same", HistoryMatch("ETH", D("0.1"), later)) is None

    move = TransferRequest(client_id="t-1", currency="USDT", amount=D(100),
                           from_wallet=Wallet.SPOT, to_wallet=Wallet.FUTURES)
    done = await binance.transfer(move)
    assert done.status == TransferStatus.OK and done.client_id is None
    assert await binance.fetch_transfer("t-1", HistoryMatch("USDT", D(100), since)) == done
    await binance.transfer(move)
    assert await binance.balance("USDT", Wallet.FUTURES) == D(200)
    assert await binance.balance("USDT") == D(9800)
    with pytest.raises(UnknownOutcomeError, match="2 transfers"):
        await binance.fetch_transfer("t-1", HistoryMatch("USDT", D(100), since))
    rows = operations(database_url, audit_ref="t-1")
    assert [(r["client_id"], r["account"]) for r in rows] == [(None, "binance-personal")] * 2
    assert {r["client_id"] for r in operations(database_url, audit_ref="same")} == {None}
    assert (await world.balances())["binance-personal:futures"]["USDT"] == D(200)
    with pytest.raises(RejectedError, match="no futures"):
        await upbit.transfer(TransferRequest(client_id="t-2", currency="KRW", amount=D(1),
                                             from_wallet=Wallet.SPOT, to_wallet=Wallet.FUTURES))
    await assert_totals_unchanged(world)


async def test_master_moves_money_to_its_sub_and_no_one_else_can(
    world: SimulatedWorld,
) -> None:
    master = world.for_account("binance-corp-master")
    sub = world.for_account("binance-corp-sub")
    since = await world.now()
    done = await master.master_transfer(MasterTransferRequest(
        client_id="m-1", currency="ETH", amount=D(2), from_account="binance-corp-master",
        to_account="binance-corp-sub"))
    assert done.status == TransferStatus.OK and done.to_account == "binance-corp-sub"
    assert await master.balance("ETH") == D(3) and await sub.balance("ETH") == D(2)
    # Sub spot -> sub futures, also with the master's key.
    await master.master_transfer(MasterTransferRequest(
        client_id="m-2", currency="ETH", amount=D(1), from_account="binance-corp-sub",
        to_account="binance-corp-sub", to_wallet=Wallet.FUTURES))
    assert await sub.balance("ETH", Wallet.FUTURES) == D(1)
    match = HistoryMatch("ETH", D(2), since)
    assert await master.fetch_master_transfer("m-1", match) == done
    assert await master.fetch_master_transfer("never", match) is None
    with pytest.raises(RejectedError, match="not a master"):
        await sub.master_transfer(MasterTransferRequest(
            client_id="m-3", currency="ETH", amount=D(1), from_account="binance-corp-sub",
            to_account="binance-corp-master"))
    with pytest.raises(RejectedError, match="not a sub-account"):
        await master.master_transfer(MasterTransferRequest(
            client_id="m-4", currency="ETH", amount=D(1), from_account="binance-corp-master",
            to_account="binance-personal"))
    with pytest.raises(RejectedError, match="insufficient"):
        await master.master_transfer(MasterTransferRequest(
            client_id="m-5", currency="ETH", amount=D(4), from_account="binance-corp-master",
            to_account="binance-corp-sub"))
    await assert_totals_unchanged(world)


# -- faults ---------------------------------------------------------------------------------


async def test_reject_refuses_money_moves_and_leaves_reads_alone(
    database_url: str, world_file: Path,
) -> None:
    async with await _open(database_url, world_file, faults="reject=1") as world:
        binance = world.for_account("binance-personal")
        with pytest.raises(RejectedError, match="simulated rejection"):
            await binance.transfer(TransferRequest(client_id="t", currency="USDT", amount=D(1),
                                                   from_wallet=Wallet.SPOT,
                                                   to_wallet=Wallet.FUTURES))
        assert await binance.balance("USDT") == D(10000)
    assert operations(database_url) == []


async def test_lost_response_commits_the_operation_and_the_caller_gets_unknown_outcome(
    database_url: str, world_file: Path,
) -> None:
    async with await _open(database_url, world_file, faults="lost_response=1") as world:
        upbit = world.for_account("upbit-personal")
        with pytest.raises(UnknownOutcomeError, match="lost response"):
            await upbit.create_order(market_buy_krw("lost", "100000"))
        # Reads are never lost; the order is there, by its client id.
        found = await upbit.fetch_order("lost", "ETH/KRW")
        assert found is not None and found.status == OrderStatus.CLOSED
        assert await upbit.balance("KRW") == D(10_000_000_000) - found.cost
        # Sending it again does not execute it again.
        with pytest.raises(DuplicateClientIdError):
            await upbit.create_order(market_buy_krw("lost", "100000"))
        with pytest.raises(UnknownOutcomeError):
            await world.for_account("binance-corp-master").master_transfer(
                MasterTransferRequest(client_id="lost-m", currency="ETH", amount=D(1),
                                      from_account="binance-corp-master",
                                      to_account="binance-corp-sub"))
        assert await world.for_account("binance-corp-sub").balance("ETH") == D(1)
    assert len(operations(database_url, client_id="lost")) == 1


async def test_latency_delays_every_call(database_url: str, world_file: Path) -> None:
    async with await _open(database_url, world_file, faults="latency_ms=60") as world:
        started = time.monotonic()
        await world.for_account("upbit-personal").balance("KRW")
        assert time.monotonic() - started >= 0.06


def test_a_bad_fault_string_names_the_key() -> None:
    with pytest.raises(ValueError, match="'lost'"):
        Faults.parse("lost=0.1")
    with pytest.raises(ValueError, match="'timeout'"):
        Faults.parse("timeout=2")
    with pytest.raises(ValueError, match="'rate_limit'"):
        Faults.parse("rate_limit=often")
    parsed = Faults.parse("lost_response=0.1, timeout=0.05,rate_limit=0.05,reject=0,latency_ms=20")
    assert (parsed.lost_response, parsed.timeout, parsed.latency_ms) == (0.1, 0.05, 20)


async def test_opening_a_world_with_bad_knobs_names_the_knob(database_url: str) -> None:
    with pytest.raises(ValueError, match="simulated world faults: unknown fault 'lost'"):
        await SimulatedWorld.open(database_url, faults="lost=0.1")
    with pytest.raises(ValueError, match="time scale must be a positive number"):
        await SimulatedWorld.open(database_url, time_scale=0)


async def test_faults_are_a_deterministic_function_of_seed_and_counter(
    database_url: str, world_file: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The knobs come from the environment through the settings a process reads once.
    monkeypatch.setenv("REBALANCER_SIM_FAULTS", "rate_limit=0.5")
    monkeypatch.setenv("REBALANCER_SIM_SEED", "42")
    monkeypatch.setenv("REBALANCER_SIM_TIME_SCALE", str(SCALE))
    monkeypatch.setenv("REBALANCER_SIM_WORLD", str(world_file))
    settings = Settings()

    async def outcomes(world: SimulatedWorld) -> list[bool]:
        port = world.for_account("upbit-personal")
        seen = []
        for _ in range(30):
            try:
                await port.balance("KRW")
                seen.append(True)
            except RetryableError:
                seen.append(False)
        return seen

    async with contextlib.AsyncExitStack() as stack:
        world = await open_exchanges(settings, database_url, ACCOUNTS, stack)
        assert isinstance(world, SimulatedWorld)
        assert world.random_seed == 42 and world.time_scale == SCALE
        first = await outcomes(world)
        await world.seed(reset=True)  # restarts the fault counter
        again = await outcomes(world)
    assert first == again and 5 < first.count(False) < 25


# -- invariants and durability --------------------------------------------------------------


async def test_totals_never_change_across_random_concurrent_operations(
    database_url: str, world_file: Path,
) -> None:
    async with await _open(database_url, world_file,
                           faults="lost_response=0.2,timeout=0.1,rate_limit=0.1,reject=0.05",
                           seed=3) as world:
        rng = random.Random(11)
        ports = {a: world.for_account(a) for a in ACCOUNTS.accounts}
        counter = iter(range(10_000))

        def one() -> Awaitable[Any]:
            n = next(counter)
            choice = rng.randrange(7)
            amount = D(rng.randrange(1, 3000)) / 1000
            if choice == 0:
                return ports["upbit-personal"].create_order(
                    market_buy_krw(f"o{n}", str(rng.randrange(5000, 3_000_000))))
            if choice == 1:
                return ports["binance-personal"].create_order(OrderRequest(
                    f"o{n}", "ETH/USDT", rng.choice(list(Side)), OrderType.MARKET, amount=amount))
            if choice == 2:
                return ports["binance-personal"].create_order(OrderRequest(
                    f"o{n}", "ETH/USDT", Side.BUY, OrderType.LIMIT, amount=amount,
                    price=D(rng.randrange(2800, 2950))))
            if choice == 3:
                return ports["upbit-personal"].withdraw(WithdrawRequest(
                    f"w{n}", "ETH", amount / 10 + D("0.02"), UPBIT_TO_BINANCE, "ETH"))
            if choice == 4:
                return ports["binance-personal"].withdraw(WithdrawRequest(
                    f"w{n}", "ETH", amount / 10, PERSONAL_TO_MASTER, "ETH"))
            if choice == 5:
                return ports["binance-personal"].transfer(TransferRequest(
                    f"t{n}", "USDT", amount, rng.choice(list(Wallet)), Wallet.FUTURES))
            return ports["binance-corp-master"].master_transfer(MasterTransferRequest(
                f"m{n}", "ETH", amount / 10, "binance-corp-master", "binance-corp-sub"))

        outcomes: dict[str, int] = {}
        for _ in range(6):
            results = await asyncio.gather(*(one() for _ in range(25)), return_exceptions=True)
            for result in results:
                name = type(result).__name__
                outcomes[name] = outcomes.get(name, 0) + 1
                if isinstance(result, BaseException) and not isinstance(
                        result, RejectedError | RetryableError | UnknownOutcomeError):
                    raise result
            await assert_totals_unchanged(world)
        # Every kind of outcome happened, and none of them moved money out of the world.
        assert {"RejectedError", "RetryableError", "UnknownOutcomeError"} <= set(outcomes)

    async with await _open(database_url, world_file) as calm:
        async def settled() -> bool:
            await calm.ledger(limit=1)  # settles whatever came due
            return (await calm.balances()).get("transit", {}).get("ETH", D(0)) == 0

        await eventually(settled)
        await assert_totals_unchanged(calm)
        assert all(amount >= 0 for held in (await calm.balances()).values()
                   for amount in held.values())


async def test_a_new_world_on_the_same_database_sees_the_pending_deposit_arrive(
    database_url: str, world_file: Path,
) -> None:
    first = await _open(database_url, world_file, time_scale=60)  # 1 s of confirmations
    withdrawal = await first.for_account("upbit-personal").withdraw(WithdrawRequest(
        client_id="w-crash", currency="ETH", amount=D("0.5"), address=UPBIT_TO_BINANCE,
        network="ETH"))
    await first.close()  # the worker "crashes"

    async with await _open(database_url, world_file) as second:
        # Opening again does not seed again.
        assert (await second.seed())["seeded"] is False
        binance = second.for_account("binance-personal")
        assert await binance.balance("ETH") == D(10)

        async def arrived() -> bool:
            return await binance.balance("ETH") == D("10.5")

        await eventually(arrived)
        [deposit] = await binance.fetch_deposits("ETH", withdrawal.created_at - timedelta(1))
        assert deposit.status == TransferStatus.OK and deposit.amount == D("0.5")
        await assert_totals_unchanged(second)


# -- sim commands ---------------------------------------------------------------------------


async def test_sim_seed_is_idempotent_and_check_finds_a_changed_total(database_url: str) -> None:
    first = await sim_cli.seed(database_url)
    assert first["seeded"] is True
    assert first["balances"]["upbit-personal"]["KRW"] == D(10_000_000_000)
    again = await sim_cli.seed(database_url)
    assert again["seeded"] is False and "already seeded" in again["message"]
    assert "already seeded" in sim_cli.format_seed(again)
    ok, rows = await sim_cli.check(database_url)
    assert ok and {r["currency"] for r in rows} == {"ETH", "KRW", "USDT"}
    assert "OK" in sim_cli.format_check(ok, rows)

    # Money appearing from nowhere is caught.
    with psycopg.connect(database_url) as conn:
        conn.execute("update sim.balances set amount = amount + 1"
                     " where account = 'upbit-personal' and currency = 'KRW'")
    ok, rows = await sim_cli.check(database_url)
    assert not ok
    assert [r["difference"] for r in rows if r["currency"] == "KRW"] == [D(1)]
    assert "FAIL" in sim_cli.format_check(ok, rows)

    reseeded = await sim_cli.seed(database_url, reset=True)
    assert reseeded["seeded"] is True and (await sim_cli.check(database_url))[0]


async def test_sim_ledger_lists_executed_operations(world: SimulatedWorld,
                                                    database_url: str) -> None:
    await world.for_account("upbit-personal").create_order(market_buy_krw("l-1", "50000"))
    await world.for_account("binance-personal").transfer(TransferRequest(
        "l-2", "USDT", D(5), Wallet.SPOT, Wallet.FUTURES))
    rows = await sim_cli.ledger(database_url)
    assert [(r["kind"], r["client_id"], r["audit_ref"]) for r in rows] == [
        ("order", "l-1", "l-1"), ("transfer", None, "l-2")]
    assert len(await sim_cli.ledger(database_url, limit=1)) == 1
    text = sim_cli.format_ledger(rows)
    assert "l-1" in text and "transfer" in text
    assert '"amount": "5"' in sim_cli.to_json(rows)
    assert (await sim_cli.check(database_url))[0]
