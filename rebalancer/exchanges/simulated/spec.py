"""The world file: what the simulated exchanges know (markets, fees, rules, delays, balances)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rebalancer.accounts import Accounts
from rebalancer.errors import SpecError
from rebalancer.exchanges.base import MarketRules, WithdrawalRules

DEFAULT_WORLD = Path(__file__).resolve().parents[2] / "defaults" / "world.yaml"
# A futures wallet is held in the sim as its own account, "<account>:futures".
FUTURES_SUFFIX = ":futures"
ZERO = Decimal(0)

# What each exchange calls our unified states (connectors map these back; docs/exchanges.md).
RAW_STATUSES: dict[str, dict[str, str]] = {
    "upbit": {
        "order_open": "wait", "order_partial": "wait", "order_closed": "done",
        "order_refunded": "cancel",  # a market buy whose KRW leftover was refunded
        "order_canceled": "cancel",
        "withdraw_pending": "PROCESSING", "withdraw_ok": "DONE",
        "deposit_pending": "PROCESSING", "deposit_ok": "ACCEPTED", "transfer_ok": "DONE",
    },
    "binance": {
        "order_open": "NEW", "order_partial": "PARTIALLY_FILLED", "order_closed": "FILLED",
        "order_refunded": "FILLED", "order_canceled": "CANCELED",
        "withdraw_pending": "4", "withdraw_ok": "6",
        "deposit_pending": "0", "deposit_ok": "1", "transfer_ok": "CONFIRMED",
    },
}


def raw_status(exchange: str, key: str) -> str:
    """The exchange's own word for one of our states (an unknown exchange speaks Binance)."""
    return RAW_STATUSES.get(exchange, RAW_STATUSES["binance"])[key]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Delays(_Frozen):
    """Seconds of simulated time, divided by the time scale at run time."""

    withdrawal_seconds: float = Field(default=5, ge=0)
    confirmation_seconds: float = Field(default=60, ge=0)
    internal_seconds: float = Field(default=1, ge=0)
    limit_fill_seconds: float = Field(default=10, ge=0)


class MarketSpec(_Frozen):
    """One market: a fixed mid price with a spread, fees and the exchange's order rules."""

    mid: Decimal = Field(gt=0)
    spread: Decimal = Field(ge=0)
    taker_fee: Decimal = Field(ge=0, lt=1)
    min_notional: Decimal = Field(ge=0)
    amount_step: Decimal = Field(gt=0)
    market_buy_by_quote_only: bool = False
    # A third currency the taker fee is charged in (BNB at Binance), priced at this exchange's
    # `<fee_currency>/<quote>` mid. Charged only on orders that fill when placed, and only when
    # the account holds enough of it; otherwise (and when None) the fee comes out of what the
    # account receives, as usual.
    fee_currency: str | None = None
    price_ticks: tuple[tuple[Decimal, Decimal], ...] = ((ZERO, Decimal("0.00000001")),)

    @field_validator("price_ticks")
    @classmethod
    def _highest_first(
        cls, ticks: tuple[tuple[Decimal, Decimal], ...]
    ) -> tuple[tuple[Decimal, Decimal], ...]:
        if not ticks or any(tick <= 0 for _, tick in ticks):
            raise ValueError("price_ticks needs (floor, tick) rows with positive ticks")
        return tuple(sorted(ticks, key=lambda row: row[0], reverse=True))

    @property
    def bid(self) -> Decimal:
        return self.mid - self.spread / 2

    @property
    def ask(self) -> Decimal:
        return self.mid + self.spread / 2

    def rules(self, symbol: str) -> MarketRules:
        base, quote = symbol.split("/")
        return MarketRules(
            symbol=symbol, base=base, quote=quote, min_notional=self.min_notional,
            amount_step=self.amount_step, taker_fee=self.taker_fee,
            market_buy_by_quote_only=self.market_buy_by_quote_only,
            price_ticks=self.price_ticks,
        )


class WithdrawalSpec(_Frozen):
    currency: str
    network: str
    fee: Decimal = Field(ge=0)
    minimum: Decimal = Field(ge=0)
    multiple: Decimal = Field(gt=0)
    fee_included: bool

    def rules(self) -> WithdrawalRules:
        return WithdrawalRules(
            currency=self.currency, network=self.network, fee=self.fee, minimum=self.minimum,
            multiple=self.multiple, fee_included=self.fee_included,
        )


class ExchangeSpec(_Frozen):
    market_maker: str
    fee_account: str
    internal_transfers: bool = False  # withdrawals to the same exchange skip the chain
    withdraw_client_ids: bool = False  # the exchange de-duplicates withdrawals by client id
    futures: bool = False
    sub_accounts: bool = False
    markets: dict[str, MarketSpec] = Field(default_factory=dict)
    withdrawals: tuple[WithdrawalSpec, ...] = ()


class WorldSpec(_Frozen):
    """What the exchanges know: markets, fees, rules, delays and the starting balances."""

    delays: Delays = Delays()
    transit_account: str = "transit"
    external_account: str = "external"
    exchanges: dict[str, ExchangeSpec]
    balances: dict[str, dict[str, Decimal]] = Field(default_factory=dict)

    def currencies(self) -> set[str]:
        found = {c for held in self.balances.values() for c in held}
        for exchange in self.exchanges.values():
            for symbol in exchange.markets:
                found.update(symbol.split("/"))
            found.update(w.currency for w in exchange.withdrawals)
        return found


def load_world(path: Path | None = None) -> WorldSpec:
    """The world file (default: the demo world); raises SpecError when it is unreadable or bad."""
    path = path or DEFAULT_WORLD
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return WorldSpec.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise SpecError(f"bad simulated world {path}: {e}") from e


def validate_world(world: WorldSpec, accounts: Accounts) -> None:
    """The world must know every configured account's exchange and every seeded account.

    Raises SpecError naming the first thing that does not fit.
    """
    known = set(accounts.accounts) | {world.transit_account, world.external_account}
    for name, exchange in world.exchanges.items():
        for own in (exchange.market_maker, exchange.fee_account):
            if own in accounts:
                raise SpecError(f"world: {name}'s {own!r} is also a configured account")
            known.add(own)
        for symbol, market in exchange.markets.items():
            if symbol.count("/") != 1:
                raise SpecError(f"world: market {symbol!r} is not BASE/QUOTE")
            rules = market.rules(symbol)
            if market.fee_currency is not None:
                if market.fee_currency in (rules.base, rules.quote):
                    raise SpecError(f"world: {name} {symbol} fee_currency must be a third one")
                if f"{market.fee_currency}/{rules.quote}" not in exchange.markets:
                    raise SpecError(
                        f"world: {name} {symbol} charges fees in {market.fee_currency}: it needs"
                        f" a {market.fee_currency}/{rules.quote} market to price them")
            for side, price in (("bid", market.bid), ("ask", market.ask)):
                if price <= 0 or price % rules.price_tick(price) != 0:
                    raise SpecError(f"world: {name} {symbol} {side} {price} is not on a tick")
    for account in accounts.accounts.values():
        spec = world.exchanges.get(account.exchange)
        if spec is None:
            raise SpecError(f"world: no exchange {account.exchange!r} for account {account.id}")
        if spec.futures:
            known.add(account.id + FUTURES_SUFFIX)
    for holder in world.balances:
        if holder not in known:
            raise SpecError(f"world: balances for unknown account {holder!r}")
    for holder, held in world.balances.items():
        for currency, amount in held.items():
            if amount < 0:
                raise SpecError(f"world: negative {currency} balance for {holder}")
