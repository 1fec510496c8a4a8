"""The worker: each pass advances every active workflow by at most one step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from events.catalogue import TaskStateChanged, WorkflowStateChanged
from events.errors import ConcurrencyError, StoreQueryError, StoreUnavailableError
from events.store import EventStore
from events.vocabulary import WORKFLOW_DRIVEN, TaskKind
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import Accounts
from rebalancer.errors import IllegalTransitionError, RetryableError, UnknownOutcomeError
from rebalancer.exchanges.base import Exchange, Exchanges
from rebalancer.leases import Leases
from rebalancer.machines import workflow_machine
from rebalancer.specs.resolution import resolve_config, resolve_params
from rebalancer.tasks.base import DEFAULT_DEADLINES, Processor, TaskContext
from rebalancer.tasks.deposit import DepositProcessor
from rebalancer.tasks.trade import TradeProcessor
from rebalancer.tasks.transfer import MasterTransferProcessor, TransferProcessor
from rebalancer.tasks.withdraw import WithdrawProcessor
from rebalancer.workflow import MoveWorkflow, StepTask, Workflow, decide, fold

log = logging.getLogger(__name__)

PROCESSORS: Mapping[TaskKind, Processor] = {
    p.kind: p
    for p in (
        TradeProcessor(),
        WithdrawProcessor(),
        DepositProcessor(),
        TransferProcessor(),
        MasterTransferProcessor(),
    )
}


class StepOutcome(StrEnum):
    """What one step of one workflow came to."""

    MOVED = "moved"
    IDLE = "idle"  # nothing to do yet (waiting on the exchange or on time)
    CONFLICT = "conflict"  # another driver moved it first; the next pass decides again
    RETRY = "retry"  # a retryable error: backing off
    BROKEN = "broken"  # its stream cannot be folded; skipped until someone looks
    LEASED = "leased"  # another worker holds it


class RateLimiter:
    """A token bucket per exchange: at most `rate` calls a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int = 5) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._rate)


class _Throttled:
    """Wraps one exchange port so that every call first takes a token from its bucket."""

    def __init__(self, inner: Exchange, limiter: RateLimiter) -> None:
        self._inner = inner
        self._limiter = limiter
        self.exchange = inner.exchange
        self.account = inner.account

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            await self._limiter.acquire()
            return await target(*args, **kwargs)

        return call


class ThrottledExchanges:
    """Exchanges seen through per-exchange rate limits."""

    def __init__(self, inner: Exchanges, rate_per_exchange: float) -> None:
        self._inner = inner
        self._rate = rate_per_exchange
        self._limiters: dict[str, RateLimiter] = {}

    def for_account(self, account: str) -> Exchange:
        exchange = self._inner.for_account(account)
        limiter = self._limiters.setdefault(exchange.exchange, RateLimiter(self._rate))
        return _Throttled(exchange, limiter)


@dataclass
class Backoff:
    """Exponential backoff with full jitter, per workflow, in memory (a restart retries at once)."""

    base: float = 0.5
    cap: float = 30.0
    failures: dict[str, int] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)

    def failed(self, key: str) -> float:
        n = self.failures.get(key, 0) + 1
        self.failures[key] = n
        delay = random.uniform(0, min(self.cap, self.base * 2 ** (n - 1)))
        self.until[key] = time.monotonic() + delay
        return delay

    def succeeded(self, key: str) -> None:
        self.failures.pop(key, None)
        self.until.pop(key, None)

    def ready(self, key: str) -> bool:
        return time.monotonic() >= self.until.get(key, 0.0)


class Engine:
    """Folds, decides and acts for workflows; safe to run in several processes on one database.

    A lease per workflow (short, taken per step) keeps each workflow to one driver at a time;
    the expected stream version on every append is the last guard. The database being away
    is waited out; a statement it refuses (StoreQueryError) stops `run`, as any other bug does.
    """

    def __init__(
        self,
        store: EventStore,
        exchanges: Exchanges,
        accounts: Accounts,
        *,
        owner: str | None = None,
        concurrency: int = 8,
        lease_seconds: float = 30.0,
        rate_per_exchange: float = 20.0,
        deadlines: Mapping[TaskKind, float] | None = None,
        clock: Callable[[], datetime] | None = None,
        follow_projections: bool = True,
    ) -> None:
        self.store = store
        self.exchanges = ThrottledExchanges(exchanges, rate_per_exchange)
        self.accounts = accounts
        self.owner = owner or f"worker-{os.getpid()}-{random.getrandbits(32):08x}"
        self.lease_seconds = lease_seconds
        self.leases = Leases(store, self.owner, lease_seconds)
        self.deadlines = dict(deadlines or DEFAULT_DEADLINES)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.backoff = Backoff()
        # Standalone (demo, tests) the engine keeps the read models current itself; under
        # `serve` a ProjectionRunner already follows every append, so it would only repeat it.
        self.runner = ProjectionRunner(store, default_projections()) if follow_projections else None
        self._semaphore = asyncio.Semaphore(concurrency)
        self.broken: dict[str, str] = {}  # workflow id -> why its stream cannot be folded

    # -- one workflow ------------------------------------------------------------------------

    async def step(self, workflow_id: str) -> StepOutcome:
        """Advance one workflow by at most one step."""
        stream_id = f"workflow-{workflow_id}"
        events = await self.store.read_stream(stream_id)
        try:
            workflow = fold(events)
        except IllegalTransitionError as e:
            self.broken[workflow_id] = str(e)
            log.error("workflow %s cannot be folded, skipping it: %s", workflow_id, e)
            return StepOutcome.BROKEN
        before = workflow.version
        try:
            await self._act(workflow)
        except ConcurrencyError:
            return StepOutcome.CONFLICT
        except (RetryableError, UnknownOutcomeError) as e:
            delay = self.backoff.failed(workflow_id)
            log.info("workflow %s: %s; retrying in %.1f s", workflow_id, e, delay)
            return StepOutcome.RETRY
        self.backoff.succeeded(workflow_id)
        return StepOutcome.MOVED if workflow.version > before else StepOutcome.IDLE

    async def _act(self, workflow: Workflow) -> None:
        action = decide(workflow)
        if isinstance(action, MoveWorkflow):
            source = workflow.state
            dest = workflow_machine().next_state(source, action.trigger)
            await self._append(
                workflow,
                [
                    WorkflowStateChanged(
                        trigger=action.trigger, source=source, dest=dest, reason=action.reason
                    )
                ],
            )
        elif isinstance(action, StepTask):
            task = action.task
            ctx = TaskContext(
                workflow=workflow,
                task=task,
                exchanges=self.exchanges,
                accounts=self.accounts,
                now=self.clock(),
                append=lambda evs: self._append(workflow, list(evs)),
                resolve=self._resolve,
                claimed=lambda kind, since: self.store.claimed_exchange_ids(
                    kind, since, workflow.stream_id
                ),
                deadlines=self.deadlines,
            )
            await PROCESSORS[task.kind].step(ctx)

    async def _append(
        self, workflow: Workflow, events: list[TaskStateChanged] | list[WorkflowStateChanged]
    ) -> None:
        result = await self.store.append(
            workflow.stream_id,
            events,
            workflow.version,
            metadata=step_metadata(workflow, self.owner),
        )
        for recorded in await self.store.read_stream(
            workflow.stream_id, after_version=workflow.version, up_to_version=result.version
        ):
            workflow.apply(recorded)

    def _resolve(self, workflow: Workflow, index: int) -> Any:
        params = resolve_params(workflow.spec, workflow.params, self.accounts)
        return resolve_config(workflow.spec, index, params, workflow.results())

    # -- passes ------------------------------------------------------------------------------

    async def active(self) -> list[str]:
        """Workflows that may need a step, from the `workflows` read model."""
        if self.runner is not None:
            await self.runner.catch_up()
        async with self.store.connection() as conn:
            cur = await conn.execute(
                "select workflow_id::text from workflows where state = any(%s) order by updated_at",
                (sorted(WORKFLOW_DRIVEN),),
            )
            return [row[0] for row in await cur.fetchall() if row[0] not in self.broken]

    async def run_pass(self) -> dict[str, int]:
        """One step for every active workflow that is not backing off; counts outcomes."""
        outcomes: dict[str, int] = {}

        async def one(workflow_id: str) -> None:
            async with self._semaphore:
                if not await self.leases.acquire(workflow_id):
                    outcome = StepOutcome.LEASED
                else:
                    try:
                        outcome = await self.step(workflow_id)
                    finally:
                        await self.leases.release(workflow_id)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        ready = [w for w in await self.active() if self.backoff.ready(w)]
        await asyncio.gather(*(one(w) for w in ready))
        return outcomes

    async def run(self, stop: asyncio.Event, tick: float = 0.5) -> None:
        """Pass after pass until `stop`; a pass in flight finishes first (SIGTERM drains)."""
        while not stop.is_set():
            try:
                outcomes = await self.run_pass()
            except StoreUnavailableError as e:
                log.warning("database unavailable (%s); retrying", e)
                outcomes = {}
            except StoreQueryError as e:
                log.error("engine %s: PostgreSQL refused a statement (SQLSTATE %s), stopping: %s",
                          self.owner, e.sqlstate, e)
                raise
            # Idle: wait for a tick (or stop); busy: go again at once.
            if not outcomes.get(StepOutcome.MOVED):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=tick)


def step_metadata(workflow: Workflow, actor: str) -> dict[str, str]:
    """The metadata (docs/contracts.md §1) of a worker's events: every event of a workflow
    shares its correlation id; the cause of a step is the last event it was decided from."""
    return {
        "actor": actor,
        "correlation_id": workflow.workflow_id,
        "causation_id": f"{workflow.stream_id}:{workflow.version}",
    }
