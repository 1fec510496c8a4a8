"""The exchange port's contract: one abstract test class every connector's suite subclasses."""

# A subclass provides the `venue` fixture: the ports of a few arranged accounts and the facts
# the contract may rely on about them (see `Venue`). The tests only use the port of
# rebalancer/exchanges/base.py and assert on balances and statuses, never on calls, so the same
# class runs against the simulated world, and later against a connector replaying recorded
# HTTP. Over 400 lines on purpose: one class is the one thing a connector has to subclass.

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import pytest

from rebalancer.errors import (
    RejectedError,
    RetryableError,
    UnknownOutcomeError,
)
from rebalancer.exchanges.base import (
    Exchange,
    HistoryMatch,
    MarketRules,
    MasterTransferRequest,
    Order,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
    TransferRequest,
    TransferStatus,
    Wallet,
    WithdrawRequest,
    floor_to,
)
from tests.support import eventually


@dataclass(frozen=True)
class Venue:
    """Arranged accounts on one exchange connector, and what the contract may rely on.

    `trader` holds enough of both sides of `symbol` for a few orders of twice the minimum;
    `sender` holds enough `currency` for a few minimum withdrawals to `receive_address`
    (owned by `receiver`, on the sender's allowlist), while `foreign_address` is not allowlisted.
    Optional parts: `futures` (an account holding `transfer_currency` with a futures wallet),
    `master` and `sub` (a master account and one of its subs; the master holds `currency`),
    and the trader's account behind injected faults: every call rate-limited, timed out, or
    answered with the answer lost. Without `futures` / `master` the contract checks that
    such requests are refused.
    """

    trader: Exchange
    symbol: str
    sender: Exchange
    receiver: Exchange
    currency: str
    network: str
    receive_address: str
    foreign_address: str
    withdraw_client_ids: bool  # the venue de-duplicates withdrawals by our client id
    now: Callable[[], Awaitable[datetime]]  # the venue's clock, for HistoryMatch.since
    futures: Exchange | None = None
    transfer_currency: str | None = None
    master: Exchange | None = None
    sub: Exchange | None = None
    rate_limited: Exchange | None = None
    timing_out: Exchange | None = None
    losing_answers: Exchange | None = None
    settle_timeout: float = 10.0


def ceil_to(value: Decimal, step: Decimal) -> Decimal:
    floored = floor_to(value, step)
    return floored if floored == value else floored + step


async def buy_request(port: Exchange, client_id: str, symbol: str,
                      quote: Decimal | None = None) -> OrderRequest:
    """A market buy of about `quote` (default: twice the minimum), in the form the venue takes."""
    rules = await port.market(symbol)
    price = await port.ticker_price(symbol)
    quote = quote if quote is not None else 2 * max(rules.min_notional, price * rules.amount_step)
    if rules.market_buy_by_quote_only:
        return OrderRequest(client_id, symbol, Side.BUY, OrderType.MARKET, quote_amount=quote)
    amount = ceil_to(quote / price, rules.amount_step)
    return OrderRequest(client_id, symbol, Side.BUY, OrderType.MARKET, amount=amount)


async def sell_request(port: Exchange, client_id: str, symbol: str) -> OrderRequest:
    rules = await port.market(symbol)
    price = await port.ticker_price(symbol)
    amount = ceil_to(2 * max(rules.min_notional / price, rules.amount_step), rules.amount_step)
    return OrderRequest(client_id, symbol, Side.SELL, OrderType.MARKET, amount=amount)


async def holdings(port: Exchange, rules: MarketRules) -> tuple[Decimal, Decimal]:
    return await port.balance(rules.base), await port.balance(rules.quote)


def assert_settled_at_fill(order: Order, rules: MarketRules, before: tuple[Decimal, Decimal],
                           after: tuple[Decimal, Decimal]) -> None:
    """Base and quote moved by exactly the fill, its cost and the fee where it was charged."""
    sign = 1 if order.side == Side.BUY else -1
    base_fee = order.fee if order.fee_currency == rules.base else 0
    quote_fee = order.fee if order.fee_currency == rules.quote else 0
    assert after[0] - before[0] == sign * order.filled - base_fee
    assert after[1] - before[1] == -sign * order.cost - quote_fee


class ExchangePortContract:
    """What every `Exchange` port must do; subclass it and provide the `venue` fixture."""

    @pytest.fixture
    def venue(self) -> Venue:
        """Overridden by each connector's suite: its arranged accounts (see `Venue`)."""
        raise NotImplementedError("a connector's contract suite provides the venue fixture")

    # -- market data -------------------------------------------------------------------------

    async def test_market_rules_describe_the_symbol_and_its_ticker_price_is_positive(
        self, venue: Venue,
    ) -> None:
        rules = await venue.trader.market(venue.symbol)
        assert (rules.symbol, f"{rules.base}/{rules.quote}") == (venue.symbol, venue.symbol)
        assert rules.amount_step > 0 and rules.min_notional >= 0 and 0 <= rules.taker_fee < 1
        price = await venue.trader.ticker_price(venue.symbol)
        assert price > 0 and rules.price_tick(price) > 0

    async def test_an_unknown_market_is_rejected(self, venue: Venue) -> None:
        with pytest.raises(RejectedError):
            await venue.trader.market("NOPE/NONE")

    # -- orders ------------------------------------------------------------------------------

    async def test_market_buy_closes_and_moves_the_balances_by_the_fill(
        self, venue: Venue,
    ) -> None:
        rules = await venue.trader.market(venue.symbol)
        before = await holdings(venue.trader, rules)
        order = await venue.trader.create_order(
            await buy_request(venue.trader, "c-buy", venue.symbol))
        assert order.status == OrderStatus.CLOSED and order.client_id == "c-buy"
        assert order.filled > 0 and order.cost > 0 and order.side == Side.BUY
        assert order.average_price == order.cost / order.filled
        assert_settled_at_fill(order, rules, before, await holdings(venue.trader, rules))

    async def test_market_sell_closes_and_moves_the_balances_by_the_fill(
        self, venue: Venue,
    ) -> None:
        rules = await venue.trader.market(venue.symbol)
        before = await holdings(venue.trader, rules)
        request = await sell_request(venue.trader, "c-sell", venue.symbol)
        order = await venue.trader.create_order(request)
        assert order.status == OrderStatus.CLOSED and order.filled == request.amount
        assert_settled_at_fill(order, rules, before, await holdings(venue.trader, rules))

    async def test_an_order_is_found_by_its_client_id_and_an_unknown_id_is_none(
        self, venue: Venue,
    ) -> None:
        order = await venue.trader.create_order(
            await buy_request(venue.trader, "c-found", venue.symbol))
        assert await venue.trader.fetch_order("c-found", venue.symbol) == order
        assert await venue.trader.fetch_order("c-never-sent", venue.symbol) is None

    async def test_an_order_below_the_minimum_is_rejected_and_changes_nothing(
        self, venue: Venue,
    ) -> None:
        rules = await venue.trader.market(venue.symbol)
        if rules.min_notional == 0:
            pytest.skip("this market has no minimum order size")
        before = await holdings(venue.trader, rules)
        request = await buy_request(venue.trader, "c-small", venue.symbol,
                                    quote=rules.min_notional / 2)
        with pytest.raises(RejectedError):
            await venue.trader.create_order(request)
        assert await holdings(venue.trader, rules) == before
        assert await venue.trader.fetch_order("c-small", venue.symbol) is None

    async def test_an_order_beyond_the_balance_is_rejected_and_changes_nothing(
        self, venue: Venue,
    ) -> None:
        rules = await venue.trader.market(venue.symbol)
        before = await holdings(venue.trader, rules)
        request = await buy_request(venue.trader, "c-big", venue.symbol, quote=2 * before[1])
        with pytest.raises(RejectedError):
            await venue.trader.create_order(request)
        assert await holdings(venue.trader, rules) == before
        assert await venue.trader.fetch_order("c-big", venue.symbol) is None

    async def test_a_limit_buy_below_the_book_rests_open_and_reserves_its_cost(
        self, venue: Venue,
    ) -> None:
        rules = await venue.trader.market(venue.symbol)
        target = await venue.trader.ticker_price(venue.symbol) * Decimal("0.9")
        price = floor_to(target, rules.price_tick(target))
        amount = ceil_to(2 * max(rules.min_notional / price, rules.amount_step), rules.amount_step)
        free = await venue.trader.balance(rules.quote)
        order = await venue.trader.create_order(OrderRequest(
            "c-rest", venue.symbol, Side.BUY, OrderType.LIMIT, amount=amount, price=price))
        assert order.status == OrderStatus.OPEN and order.filled == 0
        found = await venue.trader.fetch_order("c-rest", venue.symbol)
        assert found is not None and found.status == OrderStatus.OPEN and found.filled == 0
        # The free balance holds the order's cost back while it rests.
        assert await venue.trader.balance(rules.quote) <= free - amount * price

    async def test_a_limit_price_off_the_tick_is_rejected(self, venue: Venue) -> None:
        rules = await venue.trader.market(venue.symbol)
        target = await venue.trader.ticker_price(venue.symbol) * Decimal("0.9")
        tick = rules.price_tick(target)
        price = floor_to(target, tick) + tick / 2
        amount = ceil_to(2 * max(rules.min_notional / price, rules.amount_step), rules.amount_step)
        with pytest.raises(RejectedError):
            await venue.trader.create_order(OrderRequest(
                "c-off-tick", venue.symbol, Side.BUY, OrderType.LIMIT, amount=amount,
                price=price))
        assert await venue.trader.fetch_order("c-off-tick", venue.symbol) is None

    async def test_an_order_sent_again_with_a_used_client_id_is_not_executed_twice(
        self, venue: Venue,
    ) -> None:
        rules = await venue.trader.market(venue.symbol)
        request = await buy_request(venue.trader, "c-twice", venue.symbol)
        order = await venue.trader.create_order(request)
        after_first = await holdings(venue.trader, rules)
        # An unknown outcome to the caller: reconcile by the client id, do not resend.
        with pytest.raises(UnknownOutcomeError):
            await venue.trader.create_order(request)
        assert await holdings(venue.trader, rules) == after_first
        assert await venue.trader.fetch_order("c-twice", venue.symbol) == order

    # -- withdrawals and deposits ------------------------------------------------------------

    async def withdrawal(self, venue: Venue, client_id: str) -> WithdrawRequest:
        """A withdrawal of twice what the venue accepts at least, to the receiver."""
        rules = await venue.sender.withdrawal_rules(venue.currency, venue.network)
        smallest = max(rules.minimum, rules.fee + rules.multiple)
        return WithdrawRequest(client_id, venue.currency, ceil_to(2 * smallest, rules.multiple),
                               venue.receive_address, venue.network)

    async def test_withdrawal_rules_are_given_for_the_network_and_refused_for_an_unknown_one(
        self, venue: Venue,
    ) -> None:
        rules = await venue.sender.withdrawal_rules(venue.currency, venue.network)
        assert (rules.currency, rules.network) == (venue.currency, venue.network)
        assert rules.fee >= 0 and rules.minimum >= 0 and rules.multiple > 0
        with pytest.raises(RejectedError):
            await venue.sender.withdrawal_rules(venue.currency, "NO-SUCH-NETWORK")

    async def test_a_withdrawal_debits_the_sender_and_is_found_by_client_id_or_history(
        self, venue: Venue,
    ) -> None:
        rules = await venue.sender.withdrawal_rules(venue.currency, venue.network)
        since = await venue.now()
        before = await venue.sender.balance(venue.currency)
        request = await self.withdrawal(venue, "w-debit")
        sent = await venue.sender.withdraw(request)
        assert sent.status in (TransferStatus.PENDING, TransferStatus.OK)
        assert (sent.currency, sent.amount, sent.address) == (
            venue.currency, request.amount, venue.receive_address)
        on_top = 0 if rules.fee_included else sent.fee
        assert sent.received == request.amount - (sent.fee if rules.fee_included else 0)
        assert await venue.sender.balance(venue.currency) == before - request.amount - on_top
        match = HistoryMatch(venue.currency, request.amount, since, venue.receive_address,
                             exchange_id=sent.exchange_id)
        found = await venue.sender.fetch_withdrawal("w-debit", match)
        assert found is not None and found.exchange_id == sent.exchange_id

    async def test_a_withdrawal_completes_with_a_txid_and_arrives_as_a_deposit_with_it(
        self, venue: Venue,
    ) -> None:
        since = await venue.now()
        before = await venue.receiver.balance(venue.currency)
        request = await self.withdrawal(venue, "w-arrive")
        sent = await venue.sender.withdraw(request)
        match = HistoryMatch(venue.currency, request.amount, since, venue.receive_address,
                             exchange_id=sent.exchange_id)

        async def completed() -> bool:
            found = await venue.sender.fetch_withdrawal("w-arrive", match)
            return found is not None and found.status == TransferStatus.OK

        await eventually(completed, timeout=venue.settle_timeout, interval=0.01,
                         what="the withdrawal completing")
        done = await venue.sender.fetch_withdrawal("w-arrive", match)
        assert done is not None and done.txid

        async def credited() -> bool:
            deposits = await venue.receiver.fetch_deposits(venue.currency, since)
            return [(d.txid, d.status) for d in deposits] == [(done.txid, TransferStatus.OK)]

        await eventually(credited, timeout=venue.settle_timeout, interval=0.01,
                         what="the deposit being credited")
        [deposit] = await venue.receiver.fetch_deposits(venue.currency, since)
        assert deposit.amount == done.received and deposit.currency == venue.currency
        assert await venue.receiver.balance(venue.currency) == before + done.received

    async def test_a_withdrawal_below_the_minimum_is_rejected_and_changes_nothing(
        self, venue: Venue,
    ) -> None:
        rules = await venue.sender.withdrawal_rules(venue.currency, venue.network)
        since = await venue.now()
        before = await venue.sender.balance(venue.currency)
        too_small = floor_to(rules.minimum / 2, rules.multiple)
        with pytest.raises(RejectedError):
            await venue.sender.withdraw(WithdrawRequest(
                "w-small", venue.currency, too_small, venue.receive_address, venue.network))
        assert await venue.sender.balance(venue.currency) == before
        match = HistoryMatch(venue.currency, too_small, since)
        assert await venue.sender.fetch_withdrawal("w-small", match) is None

    async def test_a_withdrawal_to_an_address_not_allowlisted_is_rejected(
        self, venue: Venue,
    ) -> None:
        before = await venue.sender.balance(venue.currency)
        request = await self.withdrawal(venue, "w-foreign")
        with pytest.raises(RejectedError):
            await venue.sender.withdraw(WithdrawRequest(
                "w-foreign", venue.currency, request.amount, venue.foreign_address,
                venue.network))
        assert await venue.sender.balance(venue.currency) == before

    async def test_a_repeated_withdrawal_is_refused_by_client_id_or_leaves_history_ambiguous(
        self, venue: Venue,
    ) -> None:
        since = await venue.now()
        request = await self.withdrawal(venue, "w-twice")
        first = await venue.sender.withdraw(request)
        after_first = await venue.sender.balance(venue.currency)
        match = HistoryMatch(venue.currency, request.amount, since, venue.receive_address)
        if venue.withdraw_client_ids:
            with pytest.raises(UnknownOutcomeError):
                await venue.sender.withdraw(request)
            assert await venue.sender.balance(venue.currency) == after_first
            found = await venue.sender.fetch_withdrawal("w-twice", match)
            assert found is not None and found.exchange_id == first.exchange_id
        else:
            # Without client ids the venue executes it again, and history cannot tell them
            # apart: the lookup must say so rather than pick one.
            await venue.sender.withdraw(request)
            assert await venue.sender.balance(venue.currency) < after_first
            with pytest.raises(UnknownOutcomeError):
                await venue.sender.fetch_withdrawal("w-twice", match)
            known = HistoryMatch(venue.currency, request.amount, since, venue.receive_address,
                                 exchange_id=first.exchange_id)
            found = await venue.sender.fetch_withdrawal("w-twice", known)
            assert found is not None and found.exchange_id == first.exchange_id

    async def test_nothing_sent_is_found_as_no_withdrawal_and_no_deposit(
        self, venue: Venue,
    ) -> None:
        since = await venue.now()
        match = HistoryMatch(venue.currency, Decimal("0.123"), since, venue.receive_address)
        assert await venue.sender.fetch_withdrawal("w-never-sent", match) is None
        assert await venue.receiver.fetch_deposits(venue.currency, since) == []

    # -- transfers between wallets -----------------------------------------------------------

    async def test_a_futures_transfer_moves_the_amount_between_wallets_and_is_in_history(
        self, venue: Venue,
    ) -> None:
        if venue.futures is None:
            with pytest.raises(RejectedError):
                await venue.trader.transfer(TransferRequest(
                    "t-none", venue.currency, Decimal(1), Wallet.SPOT, Wallet.FUTURES))
            return
        port, currency = venue.futures, venue.transfer_currency
        assert currency is not None
        since = await venue.now()
        spot = await port.balance(currency)
        futures = await port.balance(currency, Wallet.FUTURES)
        amount = floor_to(spot / 4, Decimal("0.01"))
        done = await port.transfer(
            TransferRequest("t-1", currency, amount, Wallet.SPOT, Wallet.FUTURES))
        assert done.status == TransferStatus.OK and done.amount == amount
        assert (done.from_wallet, done.to_wallet) == (Wallet.SPOT, Wallet.FUTURES)
        assert await port.balance(currency) == spot - amount
        assert await port.balance(currency, Wallet.FUTURES) == futures + amount
        found = await port.fetch_transfer("t-1", HistoryMatch(currency, amount, since))
        assert found == done
        back = await port.transfer(
            TransferRequest("t-2", currency, amount, Wallet.FUTURES, Wallet.SPOT))
        assert back.status == TransferStatus.OK
        assert await port.balance(currency) == spot

    async def test_a_transfer_needs_two_different_wallets_and_a_positive_amount(
        self, venue: Venue,
    ) -> None:
        port = venue.futures or venue.trader
        currency = venue.transfer_currency or venue.currency
        for request in (
            TransferRequest("t-same", currency, Decimal(1), Wallet.SPOT, Wallet.SPOT),
            TransferRequest("t-zero", currency, Decimal(0), Wallet.SPOT, Wallet.FUTURES),
        ):
            with pytest.raises(RejectedError):
                await port.transfer(request)

    # -- master <-> sub transfers ------------------------------------------------------------

    async def test_a_master_moves_money_to_its_sub_found_later_by_client_id(
        self, venue: Venue,
    ) -> None:
        if venue.master is None or venue.sub is None:
            with pytest.raises(RejectedError):
                await venue.trader.master_transfer(MasterTransferRequest(
                    "m-none", venue.currency, Decimal(1), venue.trader.account, "nobody"))
            return
        since = await venue.now()
        held = await venue.master.balance(venue.currency)
        amount = floor_to(held / 4, Decimal("0.0001"))
        sub_before = await venue.sub.balance(venue.currency)
        request = MasterTransferRequest("m-1", venue.currency, amount, venue.master.account,
                                        venue.sub.account)
        done = await venue.master.master_transfer(request)
        assert done.status == TransferStatus.OK
        assert (done.from_account, done.to_account) == (venue.master.account, venue.sub.account)
        assert await venue.master.balance(venue.currency) == held - amount
        assert await venue.sub.balance(venue.currency) == sub_before + amount
        match = HistoryMatch(venue.currency, amount, since)
        assert await venue.master.fetch_master_transfer("m-1", match) == done
        assert await venue.master.fetch_master_transfer("m-never-sent", match) is None
        # Sent again: not executed twice, and the caller is told to reconcile.
        with pytest.raises(UnknownOutcomeError):
            await venue.master.master_transfer(request)
        assert await venue.sub.balance(venue.currency) == sub_before + amount

    async def test_a_master_transfer_is_refused_without_the_masters_key(
        self, venue: Venue,
    ) -> None:
        if venue.master is None or venue.sub is None:
            pytest.skip("the venue has no master and sub accounts")
        before = await venue.master.balance(venue.currency)
        with pytest.raises(RejectedError):
            await venue.sub.master_transfer(MasterTransferRequest(
                "m-by-sub", venue.currency, Decimal("0.001"), venue.sub.account,
                venue.master.account))
        with pytest.raises(RejectedError):
            await venue.master.master_transfer(MasterTransferRequest(
                "m-too-much", venue.currency, 2 * before, venue.master.account,
                venue.sub.account))
        assert await venue.master.balance(venue.currency) == before

    # -- faults: errors sorted into retryable and unknown outcome ----------------------------

    async def test_a_rate_limited_call_is_retryable_and_changes_nothing(
        self, venue: Venue,
    ) -> None:
        if venue.rate_limited is None:
            pytest.skip("the venue cannot arrange a rate limit")
        rules = await venue.trader.market(venue.symbol)
        before = await holdings(venue.trader, rules)
        with pytest.raises(RetryableError):
            await venue.rate_limited.create_order(
                await buy_request(venue.trader, "f-limited", venue.symbol))
        with pytest.raises(RetryableError):
            await venue.rate_limited.balance(rules.quote)
        assert await holdings(venue.trader, rules) == before
        assert await venue.trader.fetch_order("f-limited", venue.symbol) is None

    async def test_a_timed_out_order_is_an_unknown_outcome_that_a_lookup_settles(
        self, venue: Venue,
    ) -> None:
        if venue.timing_out is None:
            pytest.skip("the venue cannot arrange a timeout")
        rules = await venue.trader.market(venue.symbol)
        before = await holdings(venue.trader, rules)
        with pytest.raises(UnknownOutcomeError):
            await venue.timing_out.create_order(
                await buy_request(venue.trader, "f-timeout", venue.symbol))
        # A read that times out is merely retryable.
        with pytest.raises(RetryableError):
            await venue.timing_out.fetch_order("f-timeout", venue.symbol)
        # This one never reached the exchange: the lookup says so and nothing moved.
        assert await venue.trader.fetch_order("f-timeout", venue.symbol) is None
        assert await holdings(venue.trader, rules) == before

    async def test_a_lost_answer_is_an_unknown_outcome_and_the_order_is_found_by_client_id(
        self, venue: Venue,
    ) -> None:
        if venue.losing_answers is None:
            pytest.skip("the venue cannot arrange a lost answer")
        rules = await venue.trader.market(venue.symbol)
        before = await holdings(venue.trader, rules)
        request = await buy_request(venue.trader, "f-lost", venue.symbol)
        with pytest.raises(UnknownOutcomeError):
            await venue.losing_answers.create_order(request)
        found = await venue.trader.fetch_order("f-lost", venue.symbol)
        assert found is not None and found.status == OrderStatus.CLOSED
        assert_settled_at_fill(found, rules, before, await holdings(venue.trader, rules))
        # Sending it again does not execute it again.
        with pytest.raises(UnknownOutcomeError):
            await venue.losing_answers.create_order(request)
        assert await venue.trader.fetch_order("f-lost", venue.symbol) == found
