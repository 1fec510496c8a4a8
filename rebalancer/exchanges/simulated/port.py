"""One account's port on the simulated world: the `Exchange` protocol of exchanges/base.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, TypeVar

from rebalancer.accounts import Account
from rebalancer.errors import DuplicateClientIdError, NoSuchWalletError, RejectedError
from rebalancer.exchanges.base import (
    Deposit,
    HistoryMatch,
    MarketRules,
    MasterTransferRequest,
    Order,
    OrderRequest,
    OrderType,
    Side,
    Transfer,
    TransferRequest,
    Wallet,
    Withdrawal,
    WithdrawalRules,
    WithdrawRequest,
)
from rebalancer.exchanges.simulated.ledger import (
    Book,
    Conn,
    apply_book,
    book_fill,
    fetch_all,
    fetch_one,
    free_balance,
    third_currency_fee,
)
from rebalancer.exchanges.simulated.orders import price_order
from rebalancer.exchanges.simulated.rows import (
    deposit_of,
    order_of,
    single_match,
    transfer_of,
    withdrawal_of,
)
from rebalancer.exchanges.simulated.spec import (
    FUTURES_SUFFIX,
    ZERO,
    ExchangeSpec,
    MarketSpec,
    WithdrawalSpec,
    raw_status,
)

if TYPE_CHECKING:
    from rebalancer.exchanges.simulated.world import SimulatedWorld

T = TypeVar("T")


def _wallet_account(account: str, wallet: Wallet) -> str:
    return account + FUTURES_SUFFIX if wallet == Wallet.FUTURES else account


class SimulatedExchange:
    """One configured account on one simulated exchange; implements the `Exchange` port.

    Raises RetryableError (nothing happened), RejectedError (final, nothing happened),
    UnknownOutcomeError (may or may not have happened) and DuplicateClientIdError (a client id
    used before: nothing new happened; reconcile by it).
    """

    def __init__(self, world: SimulatedWorld, account: Account) -> None:
        self._world = world
        self._account = account
        self.exchange: str = account.exchange
        self.account: str = account.id

    def __repr__(self) -> str:
        return f"SimulatedExchange({self.exchange}, {self.account})"

    async def _spec(self) -> ExchangeSpec:
        world = await self._world.spec()
        spec = world.exchanges.get(self.exchange)
        if spec is None:
            raise RejectedError(f"the simulated world has no exchange {self.exchange!r}")
        return spec

    async def _market(self, symbol: str) -> MarketSpec:
        market = (await self._spec()).markets.get(symbol)
        if market is None:
            raise RejectedError(f"{self.exchange} has no market {symbol}")
        return market

    async def _read(self, what: str, run: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._world.call(f"{what} on {self.account}", run, moves_money=False)

    async def _move(self, what: str, run: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._world.call(f"{what} on {self.account}", run, moves_money=True)

    async def _claim(self, conn: Conn, kind: str, client_id: str | None) -> None:
        if client_id is None:
            return
        used = await fetch_one(
            conn, "select id from sim.operations where exchange = %s and kind = %s"
                  " and client_id = %s", (self.exchange, kind, client_id))
        if used is not None:
            raise DuplicateClientIdError(
                f"{self.exchange} {kind} client id {client_id!r} was used before"
                f" (operation {used['id']}): reconcile by it, do not resend")

    # -- market data -------------------------------------------------------------------------

    async def market(self, symbol: str) -> MarketRules:
        async def run(conn: Conn) -> MarketRules:
            return (await self._market(symbol)).rules(symbol)
        return await self._read("market", run)

    async def ticker_price(self, symbol: str) -> Decimal:
        async def run(conn: Conn) -> Decimal:
            return (await self._market(symbol)).mid
        return await self._read("ticker", run)

    async def balance(self, currency: str, wallet: Wallet = Wallet.SPOT) -> Decimal:
        """The free (unreserved) amount in one wallet."""
        if wallet == Wallet.FUTURES and not (await self._spec()).futures:
            raise NoSuchWalletError(f"{self.exchange} has no futures wallet")
        holder = _wallet_account(self.account, wallet)

        async def run(conn: Conn) -> Decimal:
            return await free_balance(conn, holder, currency)
        return await self._read("balance", run)

    async def balances(self, wallet: Wallet = Wallet.SPOT) -> dict[str, tuple[Decimal, Decimal]]:
        """Every currency held in one wallet: (free, total); zero balances left out."""
        if wallet == Wallet.FUTURES and not (await self._spec()).futures:
            raise NoSuchWalletError(f"{self.exchange} has no futures wallet")
        holder = _wallet_account(self.account, wallet)

        async def run(conn: Conn) -> dict[str, tuple[Decimal, Decimal]]:
            rows = await fetch_all(conn, "select currency, amount - locked as free, amount"
                                   " from sim.balances where account = %s and amount <> 0"
                                   " order by currency", (holder,))
            return {r["currency"]: (r["free"], r["amount"]) for r in rows}
        return await self._read("balances", run)

    # -- orders ------------------------------------------------------------------------------

    async def create_order(self, request: OrderRequest) -> Order:
        async def run(conn: Conn) -> Order:
            return await self._place(conn, request)
        return await self._move(f"order {request.client_id}", run)

    async def _place(self, conn: Conn, request: OrderRequest) -> Order:
        ex = await self._spec()
        market = await self._market(request.symbol)
        base, quote = request.symbol.split("/")
        side = Side(request.side)
        quote_amount = request.quote_amount
        taken = price_order(self.exchange, request, market)
        amount, price, resting = taken.amount, taken.price, taken.resting
        book = Book()
        if quote_amount is not None:
            book.require(self.account, quote, quote_amount)
        await self._claim(conn, "order", request.client_id)
        if resting:
            # Reserve what the order may spend; it fills in two halves after a delay.
            if side == Side.BUY:
                book.add(self.account, quote, ZERO, amount * price)
            else:
                book.add(self.account, base, ZERO, amount)
            delay = self._world.scaled((await self._world.spec()).delays.limit_fill_seconds)
            cost = fee = filled = ZERO
            fee_currency = base if side == Side.BUY else quote
            status, raw = "open", raw_status(self.exchange, "order_open")
        else:
            filled = amount
            third = third_currency_fee(ex, request.symbol, market, amount, price)
            if third is not None and await free_balance(conn, self.account, third[0]) < third[1]:
                third = None  # as at Binance: without enough BNB the usual fee applies
            cost, fee, fee_currency = book_fill(book, ex, self.account, request.symbol, market,
                                                side, amount, price, third_fee=third)
            delay = 0.0
            refunded = quote_amount is not None and cost < quote_amount
            status = "closed"
            raw = raw_status(self.exchange, "order_refunded" if refunded else "order_closed")
        row = await fetch_one(conn, """
            insert into sim.operations (exchange, account, kind, client_id, currency, amount,
                fee, fee_currency, status, raw_status, audit_ref, symbol, side, order_type,
                price, requested_amount, quote_amount, cost, next_fill_at, last_fill_at)
            values (%s, %s, 'order', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                case when %s then now() + make_interval(secs => %s) end,
                case when %s then now() + make_interval(secs => %s) end)
            returning *""", (
            self.exchange, self.account, request.client_id, base, filled, fee,
            fee_currency, status, raw, request.client_id, request.symbol,
            side.value, OrderType(request.type).value,
            request.price if request.type == OrderType.LIMIT else None,
            amount if quote_amount is None else None, quote_amount, cost,
            resting, delay, resting, 2 * delay))
        assert row is not None
        await apply_book(conn, book)
        return order_of(row)

    async def fetch_order(self, client_id: str, symbol: str) -> Order | None:
        async def run(conn: Conn) -> Order | None:
            row = await fetch_one(conn, """
                select * from sim.operations where exchange = %s and account = %s
                and kind = 'order' and client_id = %s and symbol = %s""",
                (self.exchange, self.account, client_id, symbol))
            return order_of(row) if row is not None else None
        return await self._read("fetch_order", run)

    async def cancel_order(self, client_id: str, symbol: str) -> None:
        """Cancel a resting order: what it still reserved is freed; its fills stay. Refused
        (RejectedError) for an order that is not open or that this account never sent."""
        async def run(conn: Conn) -> None:
            row = await fetch_one(conn, """
                select * from sim.operations where exchange = %s and account = %s
                and kind = 'order' and client_id = %s and symbol = %s for update""",
                (self.exchange, self.account, client_id, symbol))
            if row is None:
                raise RejectedError(f"{self.exchange}: no order {client_id} on {symbol}")
            if row["status"] != "open":
                raise RejectedError(f"{self.exchange}: order {client_id} is {row['status']}:"
                                    " nothing to cancel")
            base, quote = symbol.split("/")
            unfilled = row["requested_amount"] - row["amount"]
            book = Book()
            # Fills took their part of the reservation (book_fill, reserved): the rest is freed.
            if row["side"] == Side.BUY:
                book.add(self.account, quote, ZERO, -(unfilled * row["price"]))
            else:
                book.add(self.account, base, ZERO, -unfilled)
            await conn.execute(
                "update sim.operations set status = 'canceled', raw_status = %s,"
                " next_fill_at = null, updated_at = now() where id = %s",
                (raw_status(self.exchange, "order_canceled"), row["id"]))
            await apply_book(conn, book)
        await self._move(f"cancel order {client_id}", run)

    # -- withdrawals and deposits ------------------------------------------------------------

    async def withdrawal_rules(self, currency: str, network: str) -> WithdrawalRules:
        async def run(conn: Conn) -> WithdrawalRules:
            return (await self._withdrawal_spec(currency, network)).rules()
        return await self._read("withdrawal_rules", run)

    async def _withdrawal_spec(self, currency: str, network: str) -> WithdrawalSpec:
        if not network:
            raise RejectedError(f"{self.exchange}: a withdrawal needs a network")
        for rule in (await self._spec()).withdrawals:
            if rule.currency == currency and rule.network == network:
                return rule
        raise RejectedError(f"{self.exchange}: no {currency} withdrawals on network {network}")

    async def withdraw(self, request: WithdrawRequest) -> Withdrawal:
        async def run(conn: Conn) -> Withdrawal:
            return await self._withdraw(conn, request)
        return await self._move(f"withdraw {request.client_id}", run)

    async def _withdraw(self, conn: Conn, request: WithdrawRequest) -> Withdrawal:
        world = self._world
        spec = await world.spec()
        ex = await self._spec()
        rule = await self._withdrawal_spec(request.currency, request.network)
        # First: a tagged address of ours refuses a withdrawal without its tag (memo).
        dest = world.owner_of(request.currency, request.address, request.network, request.tag)
        if not self._account.allows(request.currency, request.address, request.network,
                                    request.tag):
            raise RejectedError(
                f"{self.exchange}: {request.address} ({request.network}) is not a registered"
                f" {request.currency} withdrawal address of {self.account}")
        amount = request.amount
        if amount <= 0 or amount < rule.minimum:
            raise RejectedError(
                f"{amount.normalize():f} {request.currency} is below the withdrawal minimum"
                f" {rule.minimum.normalize():f}")
        if amount % rule.multiple != 0:
            raise RejectedError(
                f"{amount.normalize():f} {request.currency} is not a multiple of"
                f" {rule.multiple.normalize():f}")
        dest_exchange = (world.accounts.get(dest).exchange if dest is not None
                         else spec.external_account)
        internal = ex.internal_transfers and dest_exchange == self.exchange
        fee = ZERO if internal else rule.fee
        # Binance counts the fee inside the amount; Upbit charges it on top.
        debit, received = (amount, amount - fee) if rule.fee_included else (amount + fee, amount)
        if received <= 0:
            raise RejectedError(f"{amount.normalize():f} does not cover the fee {fee}")
        client_id = request.client_id if ex.withdraw_client_ids else None
        await self._claim(conn, "withdraw", client_id)
        delays = spec.delays
        if internal:
            sent = arrive = world.scaled(delays.internal_seconds)
        else:
            sent = world.scaled(delays.withdrawal_seconds)
            arrive = sent + world.scaled(delays.confirmation_seconds)
        row = await fetch_one(conn, """
            insert into sim.operations (exchange, account, kind, client_id, currency, amount, fee,
                fee_currency, status, raw_status, audit_ref, address, network, tag, received,
                internal, to_account, complete_at)
            values (%s, %s, 'withdraw', %s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s, %s, %s,
                %s, %s, now() + make_interval(secs => %s))
            returning *""", (
            self.exchange, self.account, client_id, request.currency, amount, fee,
            request.currency, raw_status(self.exchange, "withdraw_pending"), request.client_id,
            request.address, request.network, request.tag, received, internal,
            dest or spec.external_account, sent))
        assert row is not None
        await conn.execute("""
            insert into sim.deposits (withdrawal_id, exchange, account, currency, amount,
                address, network, tag, internal, sent_at, arrive_at)
            values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                now() + make_interval(secs => %s))""", (
            row["id"], dest_exchange, dest or spec.external_account, request.currency, received,
            request.address, request.network, request.tag, internal, row["complete_at"], arrive))
        book = Book()
        book.add(self.account, request.currency, -debit)
        book.add(ex.fee_account, request.currency, fee)
        book.add(spec.transit_account, request.currency, received)
        await apply_book(conn, book)
        return withdrawal_of(row)

    async def fetch_withdrawal(self, client_id: str, match: HistoryMatch) -> Withdrawal | None:
        ex = await self._spec()

        async def run(conn: Conn) -> Withdrawal | None:
            if ex.withdraw_client_ids:
                row = await fetch_one(conn, """
                    select * from sim.operations where exchange = %s and account = %s
                    and kind = 'withdraw' and client_id = %s""",
                    (self.exchange, self.account, client_id))
                return withdrawal_of(row) if row is not None else None
            # No client id at this exchange: the history is all there is.
            rows = await fetch_all(conn, """
                select * from sim.operations where account = %s and kind = 'withdraw'
                and currency = %s and amount = %s and created_at >= %s
                and (%s::text is null or address = %s)
                and (%s::text is null or id::text = %s)
                and id::text <> all(%s::text[]) order by id""",
                (self.account, match.currency, match.amount, match.since, match.address,
                 match.address, match.exchange_id, match.exchange_id, sorted(match.exclude_ids)))
            return withdrawal_of(single_match(rows, "withdrawal", match)) if rows else None
        return await self._read("fetch_withdrawal", run)

    async def fetch_deposits(self, currency: str, since: datetime) -> list[Deposit]:
        async def run(conn: Conn) -> list[Deposit]:
            rows = await fetch_all(conn, """
                select * from sim.deposits where account = %s and currency = %s
                and sent_at <= now() and sent_at >= %s order by id""",
                (self.account, currency, since))
            return [deposit_of(r) for r in rows]
        return await self._read("fetch_deposits", run)

    # -- transfers ---------------------------------------------------------------------------

    async def transfer(self, request: TransferRequest) -> Transfer:
        async def run(conn: Conn) -> Transfer:
            if not (await self._spec()).futures:
                raise NoSuchWalletError(f"{self.exchange} has no futures wallet")
            if request.from_wallet == request.to_wallet:
                raise RejectedError("a transfer needs two different wallets")
            if request.amount <= 0:
                raise RejectedError("a transfer needs a positive amount")
            book = Book()
            book.move(request.currency, _wallet_account(self.account, request.from_wallet),
                      _wallet_account(self.account, request.to_wallet), request.amount)
            # The exchange takes no client id here: the caller's id is kept for audits only.
            row = await fetch_one(conn, """
                insert into sim.operations (exchange, account, kind, client_id, currency, amount,
                    status, raw_status, audit_ref, from_account, to_account, from_wallet,
                    to_wallet)
                values (%s, %s, 'transfer', null, %s, %s, 'ok', %s, %s, %s, %s, %s, %s)
                returning *""", (
                self.exchange, self.account, request.currency, request.amount,
                raw_status(self.exchange, "transfer_ok"), request.client_id, self.account,
                self.account, Wallet(request.from_wallet).value,
                Wallet(request.to_wallet).value))
            assert row is not None
            await apply_book(conn, book)
            return transfer_of(row)
        return await self._move(f"transfer {request.client_id}", run)

    async def fetch_transfer(self, client_id: str, match: HistoryMatch) -> Transfer | None:
        async def run(conn: Conn) -> Transfer | None:
            rows = await fetch_all(conn, """
                select * from sim.operations where account = %s and kind = 'transfer'
                and currency = %s and amount = %s and created_at >= %s
                and (%s::text is null or id::text = %s)
                and id::text <> all(%s::text[]) order by id""",
                (self.account, match.currency, match.amount, match.since, match.exchange_id,
                 match.exchange_id, sorted(match.exclude_ids)))
            return transfer_of(single_match(rows, "transfer", match)) if rows else None
        return await self._read("fetch_transfer", run)

    async def master_transfer(self, request: MasterTransferRequest) -> Transfer:
        async def run(conn: Conn) -> Transfer:
            if not (await self._spec()).sub_accounts:
                raise RejectedError(f"{self.exchange} has no sub-accounts")
            if self._account.kind != "master":
                raise RejectedError(
                    f"{self.account} is not a master account: sub-account transfers need the"
                    " master's key")
            for side in (request.from_account, request.to_account):
                if side == self.account:
                    continue
                other = self._world.accounts.accounts.get(side)
                if other is None or other.kind != "sub" or other.master_account != self.account:
                    raise RejectedError(f"{side} is not a sub-account of {self.account}")
            source = _wallet_account(request.from_account, Wallet(request.from_wallet))
            dest = _wallet_account(request.to_account, Wallet(request.to_wallet))
            if source == dest:
                raise RejectedError("a transfer needs two different wallets")
            if request.amount <= 0:
                raise RejectedError("a transfer needs a positive amount")
            if Wallet.FUTURES in (request.from_wallet, request.to_wallet) and \
                    not (await self._spec()).futures:
                raise NoSuchWalletError(f"{self.exchange} has no futures wallet")
            await self._claim(conn, "master_transfer", request.client_id)
            book = Book()
            book.move(request.currency, source, dest, request.amount)
            row = await fetch_one(conn, """
                insert into sim.operations (exchange, account, kind, client_id, currency, amount,
                    status, raw_status, audit_ref, from_account, to_account, from_wallet,
                    to_wallet)
                values (%s, %s, 'master_transfer', %s, %s, %s, 'ok', %s, %s, %s, %s, %s, %s)
                returning *""", (
                self.exchange, self.account, request.client_id, request.currency,
                request.amount, raw_status(self.exchange, "transfer_ok"), request.client_id,
                request.from_account, request.to_account, Wallet(request.from_wallet).value,
                Wallet(request.to_wallet).value))
            assert row is not None
            await apply_book(conn, book)
            return transfer_of(row)
        return await self._move(f"master transfer {request.client_id}", run)

    async def fetch_master_transfer(self, client_id: str,
                                    match: HistoryMatch) -> Transfer | None:
        async def run(conn: Conn) -> Transfer | None:
            row = await fetch_one(conn, """
                select * from sim.operations where exchange = %s and account = %s
                and kind = 'master_transfer' and client_id = %s""",
                (self.exchange, self.account, client_id))
            return transfer_of(row) if row is not None else None
        return await self._read("fetch_master_transfer", run)
