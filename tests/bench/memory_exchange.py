"""An in-memory exchange double behind the `Exchange` port, so a bench measures the engine alone.

Balances live in dicts; markets and withdrawal rules come from the demo world file, so orders
price and charge as on the simulated world. Every call first sleeps `latency` seconds (none
when 0), and an order, withdrawal or transfer completes `settle` seconds after it was made
(at once when 0): its status is worked out from the loop clock when asked, so waiting costs no
task per operation. A withdrawal's deposit shows at the receiving account once the withdrawal
completed. Operations are found by client id, which real Upbit withdrawals lack: the double
is about cost, not about the connectors' matching rules (the contract tests cover those).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal

from rebalancer.accounts import Accounts
from rebalancer.errors import RejectedError
from rebalancer.exchanges.base import (
    Deposit,
    HistoryMatch,
    MarketRules,
    MasterTransferRequest,
    Order,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
    Transfer,
    TransferRequest,
    TransferStatus,
    Wallet,
    Withdrawal,
    WithdrawalRules,
    WithdrawRequest,
    floor_to,
    normalise_txid,
)
from rebalancer.exchanges.simulated.spec import DEFAULT_WORLD, WorldSpec, load_world

Holder = tuple[str, Wallet]  # (account, wallet)


@dataclass
class _Withdrawal:
    made: Withdrawal
    due: float  # loop time it completes at
    to_account: str | None  # one of ours, or None (an external address)
    credited: bool = False  # its deposit was credited to the receiver


@dataclass
class MemoryBook:
    """Everything the double knows, shared by every account's port."""

    accounts: Accounts
    world: WorldSpec
    latency: float = 0.0
    settle: float = 0.0
    balances: dict[Holder, dict[str, Decimal]] = field(default_factory=dict)
    orders: dict[tuple[str, str], tuple[Order, float]] = field(default_factory=dict)
    withdrawals: dict[tuple[str, str], _Withdrawal] = field(default_factory=dict)
    transfers: dict[tuple[str, str], tuple[Transfer, float]] = field(default_factory=dict)
    deposits: dict[str, list[_Withdrawal]] = field(default_factory=dict)  # by receiving account
    calls: dict[str, int] = field(default_factory=dict)  # by exchange
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def owner_of(self, currency: str, address: str, network: str) -> str | None:
        for account in self.accounts.accounts.values():
            for a in account.addresses(currency):
                if a.address.lower() == address.lower() and a.network == network:
                    return account.id
        return None

    def move(self, currency: str, source: Holder | None, dest: Holder | None,
             amount: Decimal) -> None:
        """Debit `source` (None: the outside world) and credit `dest`; refused if short."""
        if source is not None:
            held = self.balances.setdefault(source, {})
            if held.get(currency, Decimal(0)) < amount:
                raise RejectedError(f"insufficient {currency} in {source[0]} {source[1]}")
            held[currency] -= amount
        if dest is not None:
            held = self.balances.setdefault(dest, {})
            held[currency] = held.get(currency, Decimal(0)) + amount


class MemoryExchange:
    """One account's port on the double."""

    def __init__(self, book: MemoryBook, account: str) -> None:
        self.book = book
        self.account = account
        self.exchange: str = book.accounts.get(account).exchange
        self._spec = book.world.exchanges[self.exchange]

    async def _call(self) -> float:
        self.book.calls[self.exchange] = self.book.calls.get(self.exchange, 0) + 1
        if self.book.latency > 0:
            await asyncio.sleep(self.book.latency)
        return asyncio.get_running_loop().time()

    def _id(self) -> str:
        return str(next(self.book.ids))

    def _market(self, symbol: str) -> MarketRules:
        market = self._spec.markets.get(symbol)
        if market is None:
            raise RejectedError(f"{self.exchange} has no market {symbol}")
        # Upbit charges a buy's fee on top of what the order spends (docs/exchanges.md).
        return replace(market.rules(symbol), buy_fee_on_top=self.exchange == "upbit")

    # -- markets and orders ------------------------------------------------------------------

    async def market(self, symbol: str) -> MarketRules:
        await self._call()
        return self._market(symbol)

    async def ticker_price(self, symbol: str) -> Decimal:
        await self._call()
        return self._spec.markets[symbol].mid

    async def create_order(self, request: OrderRequest) -> Order:
        now = await self._call()
        rules, spec = self._market(request.symbol), self._spec.markets[request.symbol]
        if request.type != OrderType.MARKET:
            raise RejectedError("the memory double fills market orders only")
        me = (self.account, Wallet.SPOT)
        maker = (self._spec.market_maker, Wallet.SPOT)
        if request.side == Side.BUY:
            if request.quote_amount is not None:
                spend = request.quote_amount
                fee = spend * rules.taker_fee
                filled = floor_to(spend / spec.ask, rules.amount_step)
            else:
                assert request.amount is not None
                filled = request.amount
                spend = filled * spec.ask
                fee = spend * rules.taker_fee
            self.book.move(rules.quote, me, maker, spend + fee)
            self.book.move(rules.base, None, me, filled)
            cost = spend
        else:
            assert request.amount is not None
            filled = request.amount
            cost = filled * spec.bid
            fee = cost * rules.taker_fee
            self.book.move(rules.base, me, maker, filled)
            self.book.move(rules.quote, None, me, cost - fee)
        order = Order(
            client_id=request.client_id, exchange_id=self._id(), symbol=request.symbol,
            side=request.side, type=request.type, status=OrderStatus.CLOSED,
            amount=request.amount, filled=filled, cost=cost, fee=fee, fee_currency=rules.quote,
            average_price=cost / filled if filled else None, raw_status="done",
        )
        self.book.orders[(self.account, request.client_id)] = (order, now + self.book.settle)
        return self._order_now(order, now + self.book.settle, now)

    async def fetch_order(self, client_id: str, symbol: str) -> Order | None:
        now = await self._call()
        found = self.book.orders.get((self.account, client_id))
        return None if found is None else self._order_now(*found, now)

    async def cancel_order(self, client_id: str, symbol: str) -> None:
        await self._call()
        # Market orders only: nothing ever rests here to be canceled.
        raise RejectedError(f"the memory double has no open order {client_id}")

    @staticmethod
    def _order_now(order: Order, due: float, now: float) -> Order:
        if now >= due:
            return order
        return replace(order, status=OrderStatus.OPEN, raw_status="wait")

    # -- withdrawals and deposits ------------------------------------------------------------

    async def withdrawal_rules(self, currency: str, network: str) -> WithdrawalRules:
        await self._call()
        for rule in self._spec.withdrawals:
            if rule.currency == currency and rule.network == network:
                return rule.rules()
        raise RejectedError(f"{self.exchange}: no {currency} withdrawals on {network}")

    async def withdraw(self, request: WithdrawRequest) -> Withdrawal:
        now = await self._call()
        key = (self.account, request.client_id)
        if key in self.book.withdrawals:
            return self._withdrawal_now(self.book.withdrawals[key], now)
        rule = next(r for r in self._spec.withdrawals
                    if r.currency == request.currency and r.network == request.network)
        debit = request.amount if rule.fee_included else request.amount + rule.fee
        received = request.amount - rule.fee if rule.fee_included else request.amount
        self.book.move(request.currency, (self.account, Wallet.SPOT), None, debit)
        dest = self.book.owner_of(request.currency, request.address, request.network)
        internal = (dest is not None and self._spec.internal_transfers
                    and self.book.accounts.get(dest).exchange == self.exchange)
        exchange_id = self._id()
        txid = f"Internal transfer {exchange_id}" if internal else f"0x{exchange_id:0>64}"
        made = Withdrawal(
            client_id=request.client_id, exchange_id=exchange_id, currency=request.currency,
            amount=request.amount, fee=Decimal(0) if internal else rule.fee,
            received=request.amount if internal else received, address=request.address,
            network=request.network, status=TransferStatus.OK, txid=normalise_txid(txid),
            internal=internal, created_at=datetime.now(UTC), raw_status="done",
        )
        record = _Withdrawal(made, now + self.book.settle, dest)
        self.book.withdrawals[key] = record
        if dest is not None:
            self.book.deposits.setdefault(dest, []).append(record)
        return self._withdrawal_now(record, now)

    async def fetch_withdrawal(self, client_id: str, match: HistoryMatch) -> Withdrawal | None:
        now = await self._call()
        record = self.book.withdrawals.get((self.account, client_id))
        return None if record is None else self._withdrawal_now(record, now)

    @staticmethod
    def _withdrawal_now(record: _Withdrawal, now: float) -> Withdrawal:
        if now >= record.due:
            return record.made
        return replace(record.made, status=TransferStatus.PENDING, txid=None,
                       raw_status="processing")

    async def fetch_deposits(self, currency: str, since: datetime) -> list[Deposit]:
        now = await self._call()
        found = []
        for record in self.book.deposits.get(self.account, []):
            w = record.made
            if now < record.due or w.currency != currency or w.created_at < since:
                continue
            if not record.credited:
                self.book.move(currency, None, (self.account, Wallet.SPOT), w.received)
                record.credited = True
            found.append(Deposit(
                exchange_id=f"d{w.exchange_id}", currency=currency, amount=w.received,
                address=w.address, network=w.network, status=TransferStatus.OK, txid=w.txid,
                internal=w.internal, created_at=w.created_at, raw_status="accepted",
            ))
        return found

    # -- transfers ---------------------------------------------------------------------------

    async def transfer(self, request: TransferRequest) -> Transfer:
        now = await self._call()
        if not self._spec.futures:
            raise RejectedError(f"{self.exchange} has no futures wallet")
        self.book.move(request.currency, (self.account, request.from_wallet),
                       (self.account, request.to_wallet), request.amount)
        return self._transfer(request.client_id, request.currency, request.amount,
                              self.account, self.account, request.from_wallet,
                              request.to_wallet, now)

    async def fetch_transfer(self, client_id: str, match: HistoryMatch) -> Transfer | None:
        return await self._fetch_transfer(client_id)

    async def master_transfer(self, request: MasterTransferRequest) -> Transfer:
        now = await self._call()
        self.book.move(request.currency, (request.from_account, request.from_wallet),
                       (request.to_account, request.to_wallet), request.amount)
        return self._transfer(request.client_id, request.currency, request.amount,
                              request.from_account, request.to_account, request.from_wallet,
                              request.to_wallet, now)

    async def fetch_master_transfer(self, client_id: str, match: HistoryMatch) -> Transfer | None:
        return await self._fetch_transfer(client_id)

    def _transfer(self, client_id: str, currency: str, amount: Decimal, from_account: str,
                  to_account: str, from_wallet: Wallet, to_wallet: Wallet,
                  now: float) -> Transfer:
        made = Transfer(
            client_id=client_id, exchange_id=self._id(), currency=currency, amount=amount,
            from_wallet=from_wallet, to_wallet=to_wallet, from_account=from_account,
            to_account=to_account, status=TransferStatus.OK, created_at=datetime.now(UTC),
            raw_status="CONFIRMED",
        )
        self.book.transfers[(self.account, client_id)] = (made, now + self.book.settle)
        return self._transfer_now(made, now + self.book.settle, now)

    async def _fetch_transfer(self, client_id: str) -> Transfer | None:
        now = await self._call()
        found = self.book.transfers.get((self.account, client_id))
        return None if found is None else self._transfer_now(*found, now)

    @staticmethod
    def _transfer_now(made: Transfer, due: float, now: float) -> Transfer:
        if now >= due:
            return made
        return replace(made, status=TransferStatus.PENDING, raw_status="PENDING")

    # -- balances ----------------------------------------------------------------------------

    async def balance(self, currency: str, wallet: Wallet = Wallet.SPOT) -> Decimal:
        await self._call()
        return self.book.balances.get((self.account, wallet), {}).get(currency, Decimal(0))

    async def balances(self, wallet: Wallet = Wallet.SPOT) -> dict[str, tuple[Decimal, Decimal]]:
        await self._call()
        held = self.book.balances.get((self.account, wallet), {})
        return {c: (v, v) for c, v in held.items() if v}


class MemoryExchanges:
    """The `Exchanges` of the double: one port per account over one shared book."""

    def __init__(
        self,
        accounts: Accounts,
        *,
        latency: float = 0.0,
        settle: float = 0.0,
        balances: Mapping[str, Mapping[str, Decimal | str]] | None = None,
        world: WorldSpec | None = None,
    ) -> None:
        """`balances` by account ("<account>:futures" for a futures wallet) and currency."""
        self.book = MemoryBook(accounts, world or load_world(DEFAULT_WORLD),
                               latency=latency, settle=settle)
        for holder, held in {**self.book.world.balances, **(balances or {})}.items():
            account, _, wallet = holder.partition(":")
            for currency, amount in held.items():
                self.book.move(currency, None, (account, Wallet(wallet or "spot")),
                               Decimal(amount))
        self._ports: dict[str, MemoryExchange] = {}

    def for_account(self, account: str) -> MemoryExchange:
        port = self._ports.get(account)
        if port is None:
            port = self._ports[account] = MemoryExchange(self.book, account)
        return port
