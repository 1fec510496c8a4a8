"""What bench_engine needs of the engine, in one place: building it, running it with its
followers, starting workflows and telling when they are all settled.

Only this module knows how the engine is built (`make_engine`, its budgets), which followers
a worker needs (`running`) and how the bench sees a workflow finish (`settled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any

from events.store import EventStore
from events.vocabulary import WORKFLOW_TERMINAL, WorkflowState
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import Accounts
from rebalancer.budgets import Budgets
from rebalancer.commands import start_workflow
from rebalancer.engine import Engine
from rebalancer.exchanges.base import Exchanges
from rebalancer.specs.builders import task, workflow
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.models import WorkflowSpec
from tests import support
from tests.bench.memory_exchange import MemoryExchanges

# Budgets: LIFTED (no limit worth the name) or DEFAULT (the live exchanges' published limits,
# as `serve` keeps them against Upbit and Binance; the double answers as those exchanges).
LIFTED = "lifted"
DEFAULT = "default"
Budget = str

SEED_SPEC = "upbit_to_binance_sub_futures"
SEED_PARAMS = {**support.SEED_PARAMS, "from_amount": "1000000"}
# A workflow the bench counts as finished (needs_attention included: it would never finish,
# and the bench reports how many ended that way).
SETTLED = frozenset({*WORKFLOW_TERMINAL, WorkflowState.NEEDS_ATTENTION})
TRANSITIONS = ("TaskStateChanged", "WorkflowStateChanged")  # one event = one step


def make_engine(store: EventStore, exchanges: Exchanges, accounts: Accounts,
                budget: Budget = DEFAULT, **kwargs: Any) -> Engine:
    """An engine as `serve` builds it (its followers run beside it, see `running`)."""
    kwargs.setdefault("concurrency", int(os.environ.get("BENCH_WORKER_CONCURRENCY", "256")))
    return Engine(store, exchanges, accounts, owner="bench", follow_projections=False,
                  budgets=kwargs.pop("budgets", None) or budgets(budget), **kwargs)


def budgets(budget: Budget) -> Budgets:
    return Budgets.lifted() if budget == LIFTED else Budgets("live")


def budget_use(budgets: Budgets, before: dict[str, dict[str, float]], window: float
               ) -> dict[str, float]:
    """Per bucket with a rate: tokens spent per second in `window` / its rate (1.0 = fully
    used), from the counters taken `before` it."""
    use = {}
    for bucket in budgets:
        if bucket.per_second:
            spent = bucket.spent - before.get(bucket.name, {}).get("spent", 0.0)
            use[bucket.name] = spent / window / bucket.per_second
    return use


@contextlib.asynccontextmanager
async def running(engine: Engine, store: EventStore, *, relay_url: str | None = None
                  ) -> AsyncIterator[None]:
    """The engine and its followers (projections; the relay given a NATS URL) running, as
    under `serve`; stopped and awaited on the way out (an error in any of them is raised)."""
    stop = asyncio.Event()
    runner = ProjectionRunner(store, default_projections())
    jobs = [asyncio.create_task(engine.run(stop)), asyncio.create_task(runner.run(stop))]
    relay = None
    if relay_url is not None:
        from events.relay import Relay

        relay = Relay(store, relay_url)
        jobs.append(asyncio.create_task(relay.run(stop)))
    try:
        yield
    finally:
        stop.set()
        try:
            await asyncio.gather(*jobs)
        finally:
            if relay is not None:
                await relay.close()


async def settled(store: EventStore, workflow_ids: Sequence[str]) -> dict[str, int]:
    """How many of `workflow_ids` are in each settled state, from their streams (no read model,
    so the answer never waits on a follower). The alias marks the bench's own statement."""
    async with store.connection() as conn:
        cur = await conn.execute(
            "select data->>'dest' as bench_poll, count(distinct stream_id) from events"
            " where stream_id = any(%s) and type = 'WorkflowStateChanged'"
            " and data->>'dest' = any(%s) group by 1",
            ([f"workflow-{w}" for w in workflow_ids], sorted(SETTLED)),
        )
        return {str(state): int(n) for state, n in await cur.fetchall()}


async def poll_until(check: Callable[[], Awaitable[bool]], *, timeout: float,
                     interval: float = 0.05) -> bool:
    """Call `check` every `interval` until it holds (True) or `timeout` passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


async def wait_settled(store: EventStore, workflow_ids: Sequence[str], *, timeout: float,
                       interval: float = 0.01) -> tuple[dict[str, int], bool]:
    """Poll `settled` until all are or `timeout` passed: (states, all settled)."""
    deadline = time.monotonic() + timeout
    while True:
        states = await settled(store, workflow_ids)
        if sum(states.values()) >= len(workflow_ids):
            return states, True
        if time.monotonic() > deadline:
            return states, False
        await asyncio.sleep(interval)


async def start_many(store: EventStore, spec: WorkflowSpec, params: dict[str, str],
                     accounts: Accounts, n: int, *, parallel: int = 8) -> list[str]:
    """`n` workflows started through the command path, `parallel` appends at a time."""
    gate = asyncio.Semaphore(parallel)

    async def one() -> str:
        async with gate:
            workflow_id, _ = await start_workflow(store, spec, params, accounts, actor="bench")
            return workflow_id

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def transition_count(store: EventStore, workflow_ids: Sequence[str] | None = None) -> int:
    """Steps appended (task and workflow transitions), of `workflow_ids` or of all."""
    async with store.connection() as conn:
        cur = await conn.execute(
            "select count(*) as bench_poll from events where type = any(%s)"
            " and (%s::text[] is null or stream_id = any(%s))",
            (list(TRANSITIONS), *(2 * [None if workflow_ids is None
                                       else [f"workflow-{w}" for w in workflow_ids]])),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


# -- specs --------------------------------------------------------------------------------------

FIVE_TRANSFER_ACCOUNT = "binance-corp-sub"


def five_transfers(accounts: Accounts) -> WorkflowSpec:
    """Five spot <-> futures transfers of 10 USDT on one account: the DBOS comparison's shape."""
    wallets = ["spot", "futures"]
    return workflow(
        "bench_five_transfers",
        {},
        [
            task(f"transfer_{i}", "transfer", account=FIVE_TRANSFER_ACCOUNT, currency="USDT",
                 amount="10", from_wallet=wallets[i % 2], to_wallet=wallets[(i + 1) % 2])
            for i in range(5)
        ],
        accounts=accounts,
    )


def never_arriving_deposit(accounts: Accounts) -> WorkflowSpec:
    """One deposit that never comes: a workflow that waits from its first task on."""
    return workflow(
        "bench_waiting",
        {},
        [task("await_nothing", "deposit", account="binance-personal", currency="ETH",
              amount="123.456")],
        accounts=accounts,
    )


def seed_spec() -> WorkflowSpec:
    return builtin_specs()[SEED_SPEC]


# Starting balances that let thousands of bench workflows run without running dry.
MEMORY_BALANCES: dict[str, dict[str, Decimal | str]] = {
    FIVE_TRANSFER_ACCOUNT: {"USDT": "1000000000"},
    "upbit-personal": {"KRW": "100000000000000"},
}
WORLD_BALANCES = {FIVE_TRANSFER_ACCOUNT: {"USDT": "1000000000"}}


async def all_workflow_ids(store: EventStore) -> list[str]:
    async with store.connection() as conn:
        cur = await conn.execute("select substr(stream_id, 10) as bench_poll from events"
                                 " where type = 'WorkflowCreated'")
        return [str(row[0]) for row in await cur.fetchall()]


async def waiting_count(store: EventStore) -> int:
    """Workflows whose task has started waiting (a deposit task watching)."""
    async with store.connection() as conn:
        cur = await conn.execute("select count(distinct stream_id) as bench_poll from events"
                                 " where type = 'TaskStateChanged' and data->>'trigger' = 'watch'")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def followers_caught_up(store: EventStore) -> bool:
    """Every projection (and the relay, if it ran) has applied the last event."""
    async with store.connection() as conn:
        cur = await conn.execute(
            "select coalesce(max(position), 0) <= (select coalesce(min(position), 0) from"
            " (select position from projection_checkpoints union all"
            " select position from relay_checkpoints) c) as bench_poll from events")
        row = await cur.fetchone()
    return bool(row and row[0])


def seed_exchanges(accounts: Accounts) -> MemoryExchanges:
    """100 ms per call; every operation completes (and a deposit arrives) 100 ms after it."""
    return MemoryExchanges(accounts, latency=0.1, settle=0.1, balances=MEMORY_BALANCES)
