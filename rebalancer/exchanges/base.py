"""The narrow exchange port that tasks call, with our own models in and out (no ccxt dicts)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from typing import Any, Protocol

from rebalancer.errors import RejectedError, RetryableError, UnknownOutcomeError


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"


class OrderType(StrEnum):
    MARKET = "market"
    LIMIT = "limit"


class Wallet(StrEnum):
    """Where funds sit inside one account."""

    SPOT = "spot"
    FUTURES = "futures"  # USDⓈ-M futures ("swap"/"linear" in ccxt, USDT_FUTURE at Binance)


class OrderStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"  # fully filled (or a market order that ended with fills)
    CANCELED = "canceled"
    REJECTED = "rejected"
    # A raw status the connector's table does not list: never guessed; the task waits and,
    # past its deadline, goes to an operator naming the raw status.
    UNKNOWN = "unknown"


class TransferStatus(StrEnum):
    """Unified transaction statuses (withdrawals, deposits, transfers)."""

    PENDING = "pending"
    OK = "ok"
    FAILED = "failed"
    CANCELED = "canceled"
    UNKNOWN = "unknown"  # not in the connector's table: waited on, never guessed


def floor_to(value: Decimal, step: Decimal) -> Decimal:
    """`value` rounded down to a multiple of `step` (exchanges truncate, never round up)."""
    if step <= 0:
        return value
    return (value / step).to_integral_value(rounding=ROUND_DOWN) * step


def normalise_txid(txid: object) -> str | None:
    """Lower-case, no 0x, no "Internal transfer " prefix: how two exchanges' txids compare."""
    if txid is None or str(txid).strip() == "":
        return None
    text = str(txid).strip()
    if text.lower().startswith("internal transfer"):
        text = text[len("internal transfer"):].strip()
    text = text.lower()
    return text[2:] if text.startswith("0x") else text


# -- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderRequest:
    """An order; a market buy may give `quote_amount` (spend this much) instead of `amount`."""

    client_id: str
    symbol: str  # "ETH/KRW"
    side: Side
    type: OrderType
    amount: Decimal | None = None  # base currency
    quote_amount: Decimal | None = None
    price: Decimal | None = None  # limit orders only


@dataclass(frozen=True)
class WithdrawRequest:
    """A withdrawal of `amount` as the exchange counts it (see `withdrawal_fee_included`)."""

    client_id: str  # sent where the exchange takes one; otherwise kept for our own matching
    currency: str
    amount: Decimal
    address: str
    network: str
    tag: str | None = None


@dataclass(frozen=True)
class TransferRequest:
    """Spot <-> futures inside one account."""

    client_id: str
    currency: str
    amount: Decimal
    from_wallet: Wallet
    to_wallet: Wallet


@dataclass(frozen=True)
class MasterTransferRequest:
    """Master <-> sub account, called with the master's credentials."""

    client_id: str
    currency: str
    amount: Decimal
    from_account: str  # our account ids; the connector maps them to e-mails
    to_account: str
    from_wallet: Wallet = Wallet.SPOT
    to_wallet: Wallet = Wallet.SPOT


@dataclass(frozen=True)
class HistoryMatch:
    """How to find our operation in an exchange's history when it takes no client id.

    `exchange_id` is the exchange's own id once it acknowledged the request: it settles which
    of several identical operations (same amount, same address) is ours. Before that,
    `exclude_ids` names operations other tasks have already recorded as theirs, so that only
    unclaimed ones are candidates.
    """

    currency: str
    amount: Decimal
    since: datetime
    address: str | None = None
    exchange_id: str | None = None
    exclude_ids: frozenset[str] = frozenset()


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    client_id: str
    exchange_id: str
    symbol: str
    side: Side
    type: OrderType
    status: OrderStatus
    amount: Decimal | None  # requested base amount, when given
    filled: Decimal  # base filled so far
    cost: Decimal  # quote spent/received so far
    fee: Decimal
    fee_currency: str
    average_price: Decimal | None
    raw_status: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Withdrawal:
    client_id: str | None
    exchange_id: str
    currency: str
    amount: Decimal  # as requested
    fee: Decimal
    received: Decimal  # what the destination is credited
    address: str
    network: str
    status: TransferStatus
    txid: str | None  # normalised: lower-case, no 0x, no "Internal transfer " prefix
    internal: bool
    created_at: datetime
    raw_status: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Deposit:
    exchange_id: str
    currency: str
    amount: Decimal
    address: str | None
    network: str | None
    status: TransferStatus
    txid: str | None
    internal: bool
    created_at: datetime
    raw_status: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Transfer:
    client_id: str | None
    exchange_id: str
    currency: str
    amount: Decimal
    from_wallet: Wallet
    to_wallet: Wallet
    from_account: str
    to_account: str
    status: TransferStatus
    created_at: datetime
    raw_status: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class MarketRules:
    """What an order must respect; read from the exchange, never hard-coded by callers."""

    symbol: str
    base: str
    quote: str
    min_notional: Decimal  # in quote
    amount_step: Decimal
    taker_fee: Decimal  # rate, e.g. 0.0005
    market_buy_by_quote_only: bool  # Upbit: a market buy is given in KRW only
    # (lowest price, tick) rows, highest first: Upbit's KRW tick depends on the price.
    price_ticks: tuple[tuple[Decimal, Decimal], ...] = ((Decimal(0), Decimal("0.00000001")),)
    # Upbit: a buy's fee is charged in the quote on top of what the order spends, so an order
    # of X KRW takes X * (1 + fee) from the balance.
    buy_fee_on_top: bool = False

    def price_tick(self, price: Decimal) -> Decimal:
        for floor, tick in self.price_ticks:
            if price >= floor:
                return tick
        return self.price_ticks[-1][1]


@dataclass(frozen=True)
class WithdrawalRules:
    currency: str
    network: str
    fee: Decimal
    minimum: Decimal
    multiple: Decimal  # the amount must be a multiple of this
    fee_included: bool  # True (Binance): the fee comes out of `amount`; False (Upbit): on top


# -- the port ---------------------------------------------------------------------------------


class Exchange(Protocol):
    """One account on one exchange.

    Every call may raise RetryableError (nothing happened: network before sending, rate limit,
    exchange down), RejectedError (final: insufficient funds, address not allowed, below a
    minimum, permission) or, for calls that move money, UnknownOutcomeError (sent, no answer:
    reconcile by client id or history before anything else).
    """

    exchange: str  # "upbit", "binance"
    account: str  # our account id

    async def market(self, symbol: str) -> MarketRules: ...

    async def ticker_price(self, symbol: str) -> Decimal: ...

    async def create_order(self, request: OrderRequest) -> Order: ...

    async def fetch_order(self, client_id: str, symbol: str) -> Order | None:
        """The order sent with `client_id`, or None when the exchange has no such order."""
        ...

    async def cancel_order(self, client_id: str, symbol: str) -> None:
        """Ask the exchange to cancel the open order sent with `client_id`.

        Answers nothing about the order: fetch it to learn how it ended (the cancel may still
        be pending, or a fill may have come first). RejectedError when the exchange refuses
        (the order already ended, or it has none such); UnknownOutcomeError when the answer was
        lost (the order may or may not be canceled: fetch it, never repeat blind).
        """
        ...

    async def withdrawal_rules(self, currency: str, network: str) -> WithdrawalRules: ...

    async def withdraw(self, request: WithdrawRequest) -> Withdrawal: ...

    async def fetch_withdrawal(self, client_id: str, match: HistoryMatch) -> Withdrawal | None:
        """By client id where the exchange keeps one, else by history `match`; None: not there.

        Raises UnknownOutcomeError when the history holds several candidates.
        """
        ...

    async def fetch_deposits(self, currency: str, since: datetime) -> list[Deposit]: ...

    async def transfer(self, request: TransferRequest) -> Transfer: ...

    async def fetch_transfer(self, client_id: str, match: HistoryMatch) -> Transfer | None: ...

    async def master_transfer(self, request: MasterTransferRequest) -> Transfer: ...

    async def fetch_master_transfer(
        self, client_id: str, match: HistoryMatch
    ) -> Transfer | None: ...

    async def balance(self, currency: str, wallet: Wallet = Wallet.SPOT) -> Decimal:
        """What is free to use in `wallet` now; RejectedError for a wallet the account lacks."""
        ...

    async def balances(self, wallet: Wallet = Wallet.SPOT) -> dict[str, tuple[Decimal, Decimal]]:
        """Every currency held in `wallet`: (free, total), zero balances left out."""
        ...


class Exchanges(Protocol):
    """Looks up the port for one of our accounts."""

    def for_account(self, account: str) -> Exchange: ...


class WrappedPort:
    """One account's port whose async calls each go through `wrap` (a budget, a meter, the
    engine's store before a call); everything else passes through. Each method is wrapped
    once, on first use, then cached on the instance."""

    def __init__(self, inner: Exchange) -> None:
        self._inner = inner
        self.exchange = inner.exchange
        self.account = inner.account

    def __getattr__(self, name: str) -> Any:  # only reached once per name: then cached
        target = getattr(self._inner, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(target):
            return target
        wrapped = self.wrap(name, target)
        self.__dict__[name] = wrapped
        return wrapped

    def wrap(self, name: str, target: Callable[..., Awaitable[Any]]
             ) -> Callable[..., Awaitable[Any]]:
        raise NotImplementedError


__all__ = [
    "Deposit",
    "Exchange",
    "Exchanges",
    "HistoryMatch",
    "MarketRules",
    "MasterTransferRequest",
    "Order",
    "OrderRequest",
    "OrderStatus",
    "OrderType",
    "RejectedError",
    "RetryableError",
    "Side",
    "Transfer",
    "TransferRequest",
    "TransferStatus",
    "UnknownOutcomeError",
    "Wallet",
    "WithdrawRequest",
    "Withdrawal",
    "WithdrawalRules",
    "WrappedPort",
    "floor_to",
    "normalise_txid",
]
