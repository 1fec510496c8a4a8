"""Per-exchange request budgets: token buckets keyed the way each exchange counts requests."""

# Longer than most modules (~400 lines): the bucket, the published limits it defaults to, the
# per-call cost tables and the wrapper that charges them are one contract and read together.

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from pydantic import BaseModel, ConfigDict, field_validator

from rebalancer.exchanges.base import Exchange, Exchanges, WrappedPort

if TYPE_CHECKING:
    from rebalancer.accounts import Accounts
    from rebalancer.exchanges.live import ExchangeOptions
    from rebalancer.settings import Settings

Mode = Literal["simulated", "live"]

# Float refills make 0.9999999 of a token; a grant is not held back for that.
_EPSILON = 1e-9


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What a Budget needs of time: asyncio's event loop is one (`time`, `call_at`)."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer: ...


@dataclass(frozen=True)
class Rate:
    """`per_second` tokens a second (None: lifted, no limit), at most `burst` saved up."""

    per_second: float | None
    burst: float


UNLIMITED = Rate(None, math.inf)


class Budget:
    """An asyncio token bucket, first come first served.

    Waiters queue in arrival order and a single timer, armed for the head of the queue, wakes
    when its tokens will be there: thousands of waiters cost one timer, not one sleeper each.
    A lifted budget (rate None) grants at once and only counts. `acquire` raises ValueError for
    a cost the bucket can never hold (more than its burst).
    """

    def __init__(self, name: str, rate: Rate, *, clock: Clock | None = None) -> None:
        self.name = name
        self.per_second = rate.per_second
        self.burst = rate.burst
        self.lifted = rate.per_second is None
        self._clock = clock
        self._tokens = rate.burst
        self._stamp: float | None = None
        # (cost, future, queued at); a canceled waiter stays until it reaches the head.
        self._queue: deque[tuple[float, asyncio.Future[None], float]] = deque()
        self._queued = 0.0  # the cost of the live waiters
        self._timer: Timer | None = None
        # Counters for metrics: requests granted, tokens spent, seconds waited in total.
        self.granted = 0
        self.spent = 0.0
        self.waited = 0.0

    def __repr__(self) -> str:
        rate = "unlimited" if self.lifted else f"{self.per_second}/s burst {self.burst}"
        return f"Budget({self.name}: {rate})"

    @property
    def waiting(self) -> int:
        return sum(1 for _, f, _ in self._queue if not f.done())

    def try_take(self, cost: float = 1) -> bool:
        """Take `cost` tokens now if they are there and nobody queues before us."""
        if self.lifted:
            self.granted += 1
            self.spent += cost
            return True
        if cost > self.burst:
            raise ValueError(f"budget {self.name}: a cost of {cost} exceeds its burst")
        if self._queue:
            return False  # first come first served: no overtaking the queue
        self._refill(self._now())
        if self._tokens >= cost - _EPSILON:
            self._tokens -= cost
            self.granted += 1
            self.spent += cost
            return True
        return False

    async def acquire(self, cost: float = 1) -> None:
        """Wait until `cost` tokens are ours, behind every earlier waiter."""
        if self.try_take(cost):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((cost, future, self._now()))
        self._queued += cost
        if self._timer is None:
            self._pump()
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():  # canceled while queued: its place goes to the next
                self._queued -= cost
            else:  # granted, then canceled before the call was made: the tokens come back
                self._tokens = min(self.burst, self._tokens + cost)
                self.granted -= 1
                self.spent -= cost
            self._rearm()
            raise

    def next_free(self, cost: float = 1) -> float:
        """Seconds until a request of `cost` asked for now would be granted (0: at once),
        counting everyone already queued: what a scheduler paces its polls by."""
        if self.lifted:
            return 0.0
        self._refill(self._now())
        deficit = self._queued + cost - self._tokens
        return max(0.0, deficit / cast(float, self.per_second))

    # -- internals ------------------------------------------------------------------------

    def _time_source(self) -> Clock:
        # The running loop, looked up each time: a budget may outlive one loop (tests).
        return self._clock if self._clock is not None else cast(Clock, asyncio.get_running_loop())

    def _now(self) -> float:
        return self._time_source().time()

    def _refill(self, now: float) -> None:
        if self._stamp is not None and now > self._stamp:
            self._tokens = min(self.burst,
                               self._tokens + (now - self._stamp) * cast(float, self.per_second))
        self._stamp = now if self._stamp is None or now > self._stamp else self._stamp

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pump()

    def _pump(self) -> None:
        """Grant every waiter at the head whose tokens are there, then arm for the next."""
        self._timer = None
        now = self._now()
        self._refill(now)
        queue = self._queue
        while queue:
            cost, future, since = queue[0]
            if future.done():  # canceled: skipped, its cost already given back
                queue.popleft()
                continue
            if self._tokens < cost - _EPSILON:
                break
            queue.popleft()
            self._tokens -= cost
            self._queued -= cost
            self.granted += 1
            self.spent += cost
            self.waited += now - since
            future.set_result(None)
        if queue:
            delay = (queue[0][0] - self._tokens) / cast(float, self.per_second)
            self._timer = self._time_source().call_at(now + max(delay, 0.0), self._pump)


# -- what the exchanges publish, and what we keep of it ------------------------------------
#
# Margin: rate = 75% of the published limit, burst = 20% of it. A full burst followed by one
# window of steady rate is then 95% of the limit in any window of the exchange's length
# (burst + rate * window <= limit), whichever way the exchange's fixed windows fall on our
# clock; the rest, and 25% in steady state, is left for requests we do not see (another tool
# on the same key or IP, ccxt's own retries).
#
# Upbit (docs.upbit.com, "요청 수 제한"): counted per pocket, i.e. per API key set of one of our
# accounts, by group: exchange.default 30/s; exchange.order (POST /v1/orders) 12/s since
# 2026-08-21 (8/s before); quotation (ticker, markets) 10/s per IP and group.
# Binance (developers.binance.com, spot "LIMITS"): /api/* request weight 6,000 a minute per IP,
# shared by every account this process drives; ORDERS 100 per 10 s per account; /sapi/* (wallet:
# withdrawals, deposits, transfers) per endpoint, the tightest we call being the withdrawal
# history at 10 requests a second.
DEFAULT_RATES: Mapping[str, Mapping[str, Rate]] = {
    "upbit": {"default": Rate(22.5, 6), "order": Rate(9, 2), "quotation": Rate(7.5, 2)},
    "binance": {"weight": Rate(75, 1200), "orders": Rate(7.5, 20), "wallet": Rate(7.5, 2)},
    # The simulated world answers in milliseconds from PostgreSQL: generous, configurable.
    "simulated": {"requests": Rate(1000, 1000)},
}

# Buckets shared by the whole process (one IP) rather than kept per account.
PROCESS_WIDE = {("upbit", "quotation"), ("binance", "weight"), ("simulated", "requests")}

Charges = tuple[tuple[str, int], ...]
_DEFAULT: Charges = (("default", 1),)
_WALLET: Charges = (("wallet", 1),)
_NONE: Charges = ()  # answered without a request (the exchange has no such operation)

# What each port call takes, by bucket: requests (Upbit) or request weight (Binance's /api/*).
COSTS: Mapping[str, Mapping[str, Charges]] = {
    "upbit": {
        "market": _DEFAULT,  # GET /v1/orders/chance; ccxt loads the markets once
        "ticker_price": (("quotation", 1),),
        "create_order": (("order", 1), ("default", 1)),  # then GET /v1/order to settle it
        "fetch_order": _DEFAULT, "withdrawal_rules": _DEFAULT, "withdraw": _DEFAULT,
        "cancel_order": _DEFAULT,  # DELETE /v1/order: the default group, not `order`
        "fetch_withdrawal": _DEFAULT, "fetch_deposits": _DEFAULT,
        "balance": _DEFAULT, "balances": _DEFAULT,
        "transfer": _NONE, "fetch_transfer": _NONE,
        "master_transfer": _NONE, "fetch_master_transfer": _NONE,
    },
    "binance": {
        "market": _NONE,  # ccxt's cached exchangeInfo (weight 20 once a process)
        "ticker_price": (("weight", 2),),  # GET /api/v3/ticker/24hr, one symbol
        "create_order": (("orders", 1), ("weight", 1)),  # POST /api/v3/order
        "fetch_order": (("weight", 9),),  # GET /api/v3/order 4, then its myTrades 5
        "cancel_order": (("weight", 1),),  # DELETE /api/v3/order
        # GET /api/v3/account 20; the futures wallet (/fapi) counted here too, to be safe.
        "balance": (("weight", 20),), "balances": (("weight", 20),),
        "withdrawal_rules": _WALLET, "withdraw": _WALLET, "fetch_withdrawal": _WALLET,
        "fetch_deposits": _WALLET, "transfer": _WALLET, "fetch_transfer": _WALLET,
        "master_transfer": _WALLET, "fetch_master_transfer": _WALLET,
    },
}
# An async port method no table lists (a new one) still pays: one of the main bucket.
FALLBACK: Mapping[str, Charges] = {
    "upbit": _DEFAULT, "binance": (("weight", 1),), "simulated": (("requests", 1),)}


class BucketOption(BaseModel):
    """One bucket in the configuration: `per_second` (a number or `unlimited`), `burst`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_second: float | None
    burst: float | None = None

    @field_validator("per_second", mode="before")
    @classmethod
    def _rate(cls, value: object) -> object:
        if value == "unlimited":
            return None
        return _positive(value, "a positive number or `unlimited`")

    @field_validator("burst", mode="before")
    @classmethod
    def _burst(cls, value: object) -> object:
        return None if value is None else _positive(value, "a positive number")


def _positive(value: object, what: str) -> float:
    # Messages never quote the value given: the configuration may sit next to secrets.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"must be {what}")
    return float(value)


def bucket_options(value: object) -> object:
    """`unlimited` for a whole exchange or one bucket, as BucketOption data."""
    if value == "unlimited":
        return {"*": {"per_second": "unlimited"}}
    if isinstance(value, dict):
        lifted = {"per_second": "unlimited"}
        return {k: (lifted if v == "unlimited" else v) for k, v in value.items()}
    return value


def budget_rates(venue: str, options: Mapping[str, BucketOption]) -> dict[str, Rate]:
    """The venue's buckets: its defaults with the configured ones over them; raises ValueError
    naming the bucket for an unknown one or a burst too small for the calls charged to it."""
    rates = dict(DEFAULT_RATES[venue])
    for bucket, option in options.items():
        targets = list(rates) if bucket == "*" else [bucket]
        if bucket not in rates and bucket != "*":
            raise ValueError(f"{bucket}: unknown budget (known: {', '.join(rates)})")
        for name in targets:
            if option.per_second is None:
                rates[name] = UNLIMITED
                continue
            burst = option.burst if option.burst is not None else rates[name].burst
            heaviest = max((c for costs in COSTS.get(venue, {}).values() for b, c in costs
                            if b == name), default=1)
            if burst < heaviest:
                raise ValueError(f"{name}.burst: must be at least {heaviest} (the heaviest"
                                 " call charged to it)")
            rates[name] = Rate(option.per_second, burst)
    return rates


# -- the budgets of one process ------------------------------------------------------------


class Budgets:
    """Every bucket of one process, made on first use, keyed as its exchange counts."""

    def __init__(self, mode: Mode, rates: Mapping[str, Mapping[str, Rate]] | None = None, *,
                 clock: Clock | None = None) -> None:
        self.mode = mode
        self._rates = {venue: dict(DEFAULT_RATES[venue]) for venue in DEFAULT_RATES}
        for venue, given in (rates or {}).items():
            self._rates[venue].update(given)
        self._clock = clock
        self._budgets: dict[str, Budget] = {}
        self._charges: dict[tuple[str, str, str], tuple[tuple[Budget, int], ...]] = {}

    @classmethod
    def from_options(cls, mode: Mode, options: Mapping[str, ExchangeOptions], *,
                     clock: Clock | None = None) -> Budgets:
        rates = {name: budget_rates(name, o.budgets) for name, o in options.items()}
        return cls(mode, rates, clock=clock)

    @classmethod
    def from_settings(cls, settings: Settings, accounts: Accounts | None = None) -> Budgets:
        """Mode and `exchanges:` budgets as `serve` reads them; raises SpecError."""
        from rebalancer.accounts import load_accounts
        from rebalancer.exchanges.live import exchange_mode, exchange_options

        accounts = accounts if accounts is not None else load_accounts(settings.config)
        return cls.from_options(exchange_mode(settings, accounts),
                                exchange_options(settings.config))

    @classmethod
    def lifted(cls, mode: Mode = "simulated") -> Budgets:
        """No limit anywhere (benchmarks); the counters still count."""
        return cls(mode, {venue: dict.fromkeys(DEFAULT_RATES[venue], UNLIMITED)
                          for venue in DEFAULT_RATES})

    def __iter__(self) -> Iterator[Budget]:
        return iter(list(self._budgets.values()))

    def counters(self) -> dict[str, dict[str, float]]:
        """Per budget: requests granted, tokens spent, seconds waited, waiting now (metrics)."""
        return {b.name: {"granted": b.granted, "spent": b.spent, "waited": b.waited,
                         "waiting": b.waiting} for b in self}

    def charges(self, exchange: str, account: str, method: str) -> tuple[tuple[Budget, int], ...]:
        """The (budget, cost) pairs one call of `method` on `account` takes."""
        key = (exchange, account, method)
        found = self._charges.get(key)
        if found is None:
            venue = "simulated" if self.mode == "simulated" else exchange
            table = COSTS.get(venue, {})
            costs = table[method] if method in table else FALLBACK[venue]
            found = self._charges[key] = tuple(
                (self.budget(venue, bucket, exchange, account), cost) for bucket, cost in costs)
        return found

    def budget(self, venue: str, bucket: str, exchange: str, account: str) -> Budget:
        if venue == "simulated":  # one bucket per simulated exchange
            name = f"simulated/{exchange}/{bucket}"
        elif (venue, bucket) in PROCESS_WIDE:
            name = f"{venue}/{bucket}"
        else:
            name = f"{venue}/{account}/{bucket}"
        found = self._budgets.get(name)
        if found is None:
            found = self._budgets[name] = Budget(name, self._rates[venue][bucket],
                                                 clock=self._clock)
        return found

    def next_free(self, exchange: str, account: str, method: str = "fetch_order") -> float:
        """Seconds until `method` on `account` could go without waiting (0: now)."""
        return max((b.next_free(c) for b, c in self.charges(exchange, account, method)),
                   default=0.0)


class _BudgetedPort(WrappedPort):
    """One account's port whose async calls first take from their buckets; results and
    exceptions pass through untouched."""

    def __init__(self, inner: Exchange, budgets: Budgets) -> None:
        super().__init__(inner)
        self._budgets = budgets

    def wrap(self, name: str, target: Callable[..., Awaitable[Any]]
             ) -> Callable[..., Awaitable[Any]]:
        charges = self._budgets.charges(self.exchange, self.account, name)
        return _charged(target, charges) if charges else target


def _charged(target: Callable[..., Awaitable[Any]],
             charges: tuple[tuple[Budget, int], ...]) -> Callable[..., Awaitable[Any]]:
    if len(charges) == 1:
        (budget, cost), = charges

        async def one(*args: Any, **kwargs: Any) -> Any:
            if not budget.try_take(cost):
                await budget.acquire(cost)
            return await target(*args, **kwargs)

        return one

    async def several(*args: Any, **kwargs: Any) -> Any:
        for budget, cost in charges:  # order bucket first: the scarcer one (table order)
            if not budget.try_take(cost):
                await budget.acquire(cost)
        return await target(*args, **kwargs)

    return several


class BudgetedExchanges:
    """Exchanges seen through the process's budgets; the port of each account is cached (the
    inner Exchanges keep one port per account too)."""

    def __init__(self, inner: Exchanges, budgets: Budgets) -> None:
        self.inner = inner
        self.budgets = budgets
        self._ports: dict[str, Exchange] = {}

    def for_account(self, account: str) -> Exchange:
        port = self._ports.get(account)
        if port is None:
            port = self._ports[account] = cast(
                Exchange, _BudgetedPort(self.inner.for_account(account), self.budgets))
        return port

    def next_free(self, account: str, method: str = "fetch_order") -> float:
        """Seconds until `method` on `account` could be sent without waiting."""
        return self.budgets.next_free(self.for_account(account).exchange, account, method)


__all__ = [
    "COSTS",
    "DEFAULT_RATES",
    "UNLIMITED",
    "BucketOption",
    "Budget",
    "BudgetedExchanges",
    "Budgets",
    "Clock",
    "Rate",
    "bucket_options",
    "budget_rates",
]
