"""Request budgets: rate, burst, FIFO order, weights and lifting, on a clock the test moves."""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
from collections.abc import Callable
from decimal import Decimal

import pytest

from rebalancer.budgets import (
    COSTS,
    DEFAULT_RATES,
    UNLIMITED,
    Budget,
    BudgetedExchanges,
    Budgets,
    Rate,
)
from rebalancer.errors import RejectedError
from rebalancer.exchanges.base import (
    Exchange,
    Order,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
)


class _Handle:
    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when, self.callback, self.canceled = when, callback, False

    def cancel(self) -> None:
        self.canceled = True


class FakeClock:
    """Time that moves only when the test says so; timers run in order as it passes them."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, _Handle]] = []
        self._seq = itertools.count()
        self.most_pending = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> _Handle:
        handle = _Handle(when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), handle))
        self.most_pending = max(self.most_pending, self.pending)
        return handle

    @property
    def pending(self) -> int:
        return sum(1 for _, _, h in self._heap if not h.canceled)

    async def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while self._heap and self._heap[0][0] <= target:
            when, _, handle = heapq.heappop(self._heap)
            if handle.canceled:
                continue
            self.now = max(self.now, when)
            handle.callback()
            await settle()
        self.now = target
        await settle()


async def settle() -> None:
    """Let every task that can run, run (granted waiters resume)."""
    for _ in range(10):
        await asyncio.sleep(0)


def waiters(budget: Budget, clock: FakeClock, costs: list[float],
            granted: list[tuple[int, float]]) -> list[asyncio.Task[None]]:
    async def one(i: int, cost: float) -> None:
        await budget.acquire(cost)
        granted.append((i, clock.now))

    return [asyncio.create_task(one(i, c)) for i, c in enumerate(costs)]


async def test_a_burst_goes_at_once_then_one_token_per_interval_in_arrival_order() -> None:
    clock = FakeClock()
    budget = Budget("b", Rate(10, 5), clock=clock)
    granted: list[tuple[int, float]] = []
    tasks = waiters(budget, clock, [1] * 25, granted)
    await settle()
    # The burst of 5 is granted before any time passes; the rest queue.
    assert [i for i, _ in granted] == [0, 1, 2, 3, 4] and budget.waiting == 20
    await clock.advance(2.0)
    assert [i for i, _ in granted] == list(range(25))
    assert [round(t, 9) for _, t in granted[5:]] == [round(0.1 * k, 9) for k in range(1, 21)]
    # In any one-second window, at most burst + rate * 1 grants.
    times = [t for _, t in granted]
    assert max(sum(1 for t in times if s <= t < s + 1) for s in times) <= 5 + 10
    assert budget.granted == 25 and budget.waiting == 0
    assert budget.waited == pytest.approx(sum(0.1 * k for k in range(1, 21)))
    await asyncio.gather(*tasks)


async def test_thousands_of_waiters_cost_one_timer_and_are_served_exactly() -> None:
    clock = FakeClock()
    budget = Budget("b", Rate(1000, 1), clock=clock)
    granted: list[tuple[int, float]] = []
    tasks = waiters(budget, clock, [1] * 3000, granted)
    await settle()
    await clock.advance(3.0)
    assert [i for i, _ in granted] == list(range(3000))
    assert granted[-1][1] == pytest.approx(2.999)
    assert clock.most_pending == 1  # one sleeper for the head of the queue, never one each
    await asyncio.gather(*tasks)


async def test_a_heavy_request_holds_its_place_and_lighter_ones_wait_behind_it() -> None:
    clock = FakeClock()
    budget = Budget("b", Rate(1, 3), clock=clock)
    assert budget.try_take(3)
    granted: list[tuple[int, float]] = []
    tasks = waiters(budget, clock, [3, 1], granted)
    await settle()
    await clock.advance(1.0)
    assert granted == []  # one token there, but the light request may not overtake
    assert not budget.try_take(1)  # nor may a newcomer
    await clock.advance(10.0)
    assert granted == [(0, 3.0), (1, 4.0)]
    assert budget.spent == 7
    await asyncio.gather(*tasks)


async def test_a_cost_above_the_burst_is_refused() -> None:
    budget = Budget("b", Rate(10, 2), clock=FakeClock())
    with pytest.raises(ValueError, match="exceeds its burst"):
        await budget.acquire(3)


async def test_a_canceled_waiter_gives_its_place_to_the_next() -> None:
    clock = FakeClock()
    budget = Budget("b", Rate(1, 1), clock=clock)
    assert budget.try_take()
    granted: list[tuple[int, float]] = []
    first, second = waiters(budget, clock, [1, 1], granted)
    await settle()
    assert budget.next_free() == pytest.approx(3.0)
    first.cancel()
    await settle()
    assert budget.next_free() == pytest.approx(2.0)
    await clock.advance(1.0)
    assert granted == [(1, 1.0)] and budget.granted == 2
    await second


async def test_next_free_counts_the_queue_so_a_scheduler_can_pace_to_the_budget() -> None:
    clock = FakeClock()
    budget = Budget("b", Rate(10, 2), clock=clock)
    assert budget.next_free() == 0
    assert budget.try_take(2)
    assert budget.next_free() == pytest.approx(0.1)
    assert budget.next_free(2) == pytest.approx(0.2)
    tasks = waiters(budget, clock, [1] * 4, [])
    await settle()
    assert budget.next_free() == pytest.approx(0.5)
    await clock.advance(0.25)
    assert budget.next_free() == pytest.approx(0.25)
    await clock.advance(1)
    await asyncio.gather(*tasks)
    assert budget.next_free() == 0  # refilled to the burst


async def test_a_lifted_budget_grants_at_once_and_only_counts() -> None:
    clock = FakeClock()
    budget = Budget("b", UNLIMITED, clock=clock)
    await asyncio.gather(*(budget.acquire(5) for _ in range(10_000)))
    assert budget.granted == 10_000 and budget.spent == 50_000
    assert budget.next_free(1e9) == 0 and clock.pending == 0 and budget.waited == 0


async def test_the_counters_report_each_budget() -> None:
    budgets = Budgets("live")
    budget = budgets.charges("upbit", "u1", "fetch_order")[0][0]
    await budget.acquire()
    assert budgets.counters() == {
        "upbit/u1/default": {"granted": 1, "spent": 1, "waited": 0, "waiting": 0}}


# -- the budgets of one process --------------------------------------------------------------


def test_every_port_method_has_a_cost_on_each_exchange() -> None:
    methods = {n for n, v in inspect.getmembers(Exchange) if inspect.iscoroutinefunction(v)}
    assert methods
    for exchange in ("upbit", "binance"):
        assert set(COSTS[exchange]) == methods, exchange
        for charges in COSTS[exchange].values():
            assert all(b in DEFAULT_RATES[exchange] for b, _ in charges)


def test_buckets_are_keyed_as_each_exchange_counts() -> None:
    budgets = Budgets("live")

    def names(exchange: str, account: str, method: str) -> list[str]:
        return [b.name for b, _ in budgets.charges(exchange, account, method)]

    # Upbit counts per account (pocket) and group; quotation per IP.
    assert names("upbit", "u1", "create_order") == ["upbit/u1/order", "upbit/u1/default"]
    assert names("upbit", "u2", "fetch_order") == ["upbit/u2/default"]
    assert names("upbit", "u1", "ticker_price") == names("upbit", "u2", "ticker_price") \
        == ["upbit/quotation"]
    # Binance: request weight per IP, shared by every account; orders per account.
    assert names("binance", "b1", "create_order") == ["binance/b1/orders", "binance/weight"]
    assert names("binance", "b2", "balance") == ["binance/weight"]
    assert names("binance", "b2", "withdraw") == ["binance/b2/wallet"]
    assert budgets.charges("binance", "b1", "fetch_order")[0][1] == 9
    # The same budget object each time: one bucket, not one per call.
    assert budgets.charges("binance", "b1", "balance")[0][0] is \
        budgets.charges("binance", "b2", "fetch_order")[0][0]


def test_the_simulated_world_has_one_generous_bucket_per_exchange() -> None:
    budgets = Budgets("simulated")
    (up, cost), = budgets.charges("upbit", "u1", "create_order")
    assert up.name == "simulated/upbit/requests" and cost == 1 and up.per_second == 1000
    assert budgets.charges("upbit", "u2", "withdraw")[0][0] is up
    assert budgets.charges("binance", "b1", "withdraw")[0][0] is not up


def test_lifted_budgets_lift_every_bucket() -> None:
    budgets = Budgets.lifted("live")
    for exchange, method in (("upbit", "create_order"), ("binance", "balance")):
        assert all(b.lifted for b, _ in budgets.charges(exchange, "a", method))


# -- the wrapper -----------------------------------------------------------------------------


class RecordingPort:
    """An in-memory port: records calls, answers one order, refuses one withdrawal."""

    def __init__(self, exchange: str, account: str) -> None:
        self.exchange, self.account = exchange, account
        self.calls: list[str] = []
        self.order = Order("c1", "x1", "ETH/KRW", Side.BUY, OrderType.MARKET, OrderStatus.CLOSED,
                           None, Decimal(1), Decimal(1), Decimal(0), "KRW", None, "done")
        self.refusal = RejectedError("insufficient funds")

    async def create_order(self, request: OrderRequest) -> Order:
        self.calls.append("create_order")
        return self.order

    async def withdraw(self, request: object) -> object:
        self.calls.append("withdraw")
        raise self.refusal

    async def market(self, symbol: str) -> str:
        self.calls.append("market")
        return symbol

    def describe(self) -> str:  # not a request: passes through uncharged
        return f"{self.exchange}:{self.account}"


class RecordingExchanges:
    def __init__(self) -> None:
        self.ports = {"u1": RecordingPort("upbit", "u1"), "b1": RecordingPort("binance", "b1")}

    def for_account(self, account: str) -> Exchange:
        return self.ports[account]  # type: ignore[return-value]


REQUEST = OrderRequest("c1", "ETH/KRW", Side.BUY, OrderType.MARKET, quote_amount=Decimal(5000))


async def test_calls_take_from_their_buckets_and_pass_results_and_errors_untouched() -> None:
    inner = RecordingExchanges()
    budgets = Budgets("live")
    exchanges = BudgetedExchanges(inner, budgets)
    port = exchanges.for_account("b1")
    assert exchanges.for_account("b1") is port  # cached: built once per account
    assert await port.create_order(REQUEST) is inner.ports["b1"].order
    with pytest.raises(RejectedError) as caught:
        await port.withdraw(REQUEST)  # type: ignore[arg-type]
    assert caught.value is inner.ports["b1"].refusal
    assert await port.market("ETH/USDT") == "ETH/USDT"  # Binance: cached markets, no charge
    assert port.describe() == "binance:b1"  # type: ignore[attr-defined]
    spent = {b.name: (b.granted, b.spent) for b in budgets}
    assert spent == {"binance/b1/orders": (1, 1), "binance/weight": (1, 1),
                     "binance/b1/wallet": (1, 1)}
    await exchanges.for_account("u1").create_order(REQUEST)
    assert {b.name: b.granted for b in budgets if b.name.startswith("upbit")} == {
        "upbit/u1/order": 1, "upbit/u1/default": 1}


async def test_a_call_waits_for_its_tokens_before_it_reaches_the_exchange() -> None:
    clock = FakeClock()
    inner = RecordingExchanges()
    budgets = Budgets("live", {"upbit": {"order": Rate(1, 1)}}, clock=clock)
    exchanges = BudgetedExchanges(inner, budgets)
    port = exchanges.for_account("u1")
    await port.create_order(REQUEST)
    second = asyncio.create_task(port.create_order(REQUEST))
    await settle()
    assert inner.ports["u1"].calls == ["create_order"]
    assert exchanges.next_free("u1", "create_order") == pytest.approx(2.0)
    await clock.advance(1.0)
    assert await second is inner.ports["u1"].order
    assert inner.ports["u1"].calls == ["create_order", "create_order"]
