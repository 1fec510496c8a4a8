"""The worker: claims due workflows from the schedule and drives each until it has to wait."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from events.catalogue import TaskStateChanged, WorkflowStateChanged
from events.concurrency import first_of
from events.database import first_line
from events.errors import ConcurrencyError, StoreQueryError, StoreUnavailableError
from events.store import EventStore, RecordedEvent
from events.vocabulary import (
    INTENT_TRIGGERS,
    TaskKind,
    TaskState,
    TaskTrigger,
    WorkflowState,
    WorkflowTrigger,
)
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import Accounts
from rebalancer.budgets import BudgetedExchanges, Budgets
from rebalancer.errors import IllegalTransitionError, RetryableError, UnknownOutcomeError
from rebalancer.exchanges.base import Exchanges
from rebalancer.machines import task_machine, workflow_machine
from rebalancer.metrics import MeteredExchanges, Metrics
from rebalancer.polling import (
    DEFAULT_POLLS,
    FAILURE_BASE,
    FAILURE_CAP,
    RETRY_BASE,
    RETRY_CAP,
    SHORTEST,
    Poll,
    backoff,
    poll_delay,
)
from rebalancer.schedule import Claim, Schedule
from rebalancer.specs.resolution import resolve_config, resolve_params
from rebalancer.tasks.base import DEFAULT_DEADLINES, Processor, TaskContext
from rebalancer.tasks.deposit import DepositProcessor
from rebalancer.tasks.remedies import commands_for
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


# Steps one worker takes for one workflow before handing it back (fair to the others).
CHAIN_LIMIT = 100


class StepOutcome(StrEnum):
    """What one step of one workflow came to."""

    MOVED = "moved"
    IDLE = "idle"  # nothing to do yet (waiting on the exchange or on time)
    CONFLICT = "conflict"  # another driver moved it first; the next pass decides again
    RETRY = "retry"  # a retryable error: backing off
    BROKEN = "broken"  # its stream cannot be folded; skipped until someone looks


@dataclass
class Driven:
    """What driving one claimed workflow came to: its last outcome and the steps it moved."""

    outcome: StepOutcome
    moved: int = 0


class Engine:
    """Folds, decides and acts for workflows; safe to run in several processes on one database.

    Work is found in the schedule (rebalancer/schedule.py), never through a read model: a due
    workflow is claimed, folded once, and stepped in memory while a step is actionable; a wait
    hands it back due at its next poll. The expected stream version on every append is the
    guard against a second driver. One workflow's surprise (an unexpected exception, a stream
    that cannot be folded) is logged, backed off and after `max_failures` in a row handed to an
    operator; the database being away is waited out. Nothing here ends `run` but `stop`.
    """

    def __init__(
        self,
        store: EventStore,
        exchanges: Exchanges,
        accounts: Accounts,
        *,
        owner: str | None = None,
        concurrency: int = 256,
        lease_seconds: float = 3.0,
        budgets: Budgets | None = None,
        deadlines: Mapping[TaskKind, float] | None = None,
        clock: Callable[[], datetime] | None = None,
        follow_projections: bool = True,
        polls: Mapping[TaskKind, Poll] | None = None,
        poll_scale: float = 1.0,
        max_failures: int = 3,
        seed: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        # A registry of its own when none is given (tests, tools): counted, never shared.
        self.metrics = metrics or Metrics()
        # Every exchange call takes from its budget first: the budget, not the engine, is
        # what limits a worker's pace on a live exchange. Metered inside the budget, so the
        # call's duration is the exchange's, not the wait for a token.
        self.exchanges = BudgetedExchanges(MeteredExchanges(exchanges, self.metrics),
                                           budgets or Budgets("simulated"))
        self.accounts = accounts
        self.owner = owner or f"worker-{os.getpid()}-{random.getrandbits(32):08x}"
        self.concurrency = concurrency
        self.schedule = Schedule(store, self.owner, lease_seconds)
        self.deadlines = dict(deadlines or DEFAULT_DEADLINES)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.polls = dict(polls or DEFAULT_POLLS)
        self.poll_scale = poll_scale
        self.max_failures = max_failures
        self._rng = random.Random(seed)
        # Standalone (demo, tests) the engine keeps the read models current itself; under
        # `serve` a ProjectionRunner already follows every append, so it would only repeat it.
        self.runner = ProjectionRunner(store, default_projections()) if follow_projections else None
        self._inflight: dict[str, asyncio.Task[Driven]] = {}
        self._stopping = False

    # -- one step ------------------------------------------------------------------------------

    async def step(self, workflow_id: str) -> StepOutcome:
        """Advance one workflow by at most one step, outside the schedule (tests, preview).
        Unexpected exceptions propagate: the bulkhead is `run`'s."""
        try:
            workflow = await self._load(workflow_id)
        except IllegalTransitionError as e:
            log.error("workflow %s cannot be folded: %s", workflow_id, e)
            return StepOutcome.BROKEN
        action = decide(workflow)
        if action is None:
            return StepOutcome.IDLE
        try:
            try:
                _, moved = await self._act(workflow, action)
            finally:
                await self._flush(workflow)
        except ConcurrencyError:
            return StepOutcome.CONFLICT
        except (RetryableError, UnknownOutcomeError) as e:
            log.info("workflow %s: %s", workflow_id, e)
            return StepOutcome.RETRY
        return StepOutcome.MOVED if moved else StepOutcome.IDLE

    async def _load(self, workflow_id: str) -> Workflow:
        return fold(await self.store.read_stream(f"workflow-{workflow_id}"))

    async def _act(self, workflow: Workflow, action: MoveWorkflow | StepTask) -> tuple[
            TaskContext | None, bool]:
        """Carry out one decided action; (the task's context, whether anything was appended).
        Counted and timed by task kind ("workflow" for a move of the workflow itself)."""
        kind = "workflow" if isinstance(action, MoveWorkflow) else str(action.task.kind)
        outcome = "error"
        started = time.perf_counter()
        try:
            ctx, moved = await self._carry_out(workflow, action)
            outcome = StepOutcome.MOVED if moved else StepOutcome.IDLE
            return ctx, moved
        except ConcurrencyError:
            outcome = StepOutcome.CONFLICT
            raise
        except (RetryableError, UnknownOutcomeError):
            outcome = StepOutcome.RETRY
            raise
        finally:
            self.metrics.step(kind, outcome, time.perf_counter() - started)

    async def _carry_out(self, workflow: Workflow, action: MoveWorkflow | StepTask) -> tuple[
            TaskContext | None, bool]:
        before = workflow.version
        if isinstance(action, MoveWorkflow):
            source = workflow.state
            dest = workflow_machine().next_state(source, action.trigger)
            await self._append(
                workflow,
                [WorkflowStateChanged(trigger=action.trigger, source=source, dest=dest,
                                      reason=action.reason)],
                hold=True,
            )
            return None, True
        task = action.task
        ctx = TaskContext(
            workflow=workflow,
            task=task,
            exchanges=self.exchanges,
            accounts=self.accounts,
            now=self.clock(),
            append=lambda evs: self._append(workflow, list(evs), hold=True),
            resolve=self._resolve,
            claimed=lambda kind, since: self.store.claimed_exchange_ids(
                kind, since, workflow.stream_id
            ),
            claims=lambda kind, since: self.store.claims(kind, since, workflow.stream_id),
            deadlines=self.deadlines,
            before_call=lambda: self._flush(workflow),
        )
        await PROCESSORS[task.kind].step(ctx)
        return ctx, workflow.version > before

    async def _append(
        self, workflow: Workflow, events: list[TaskStateChanged] | list[WorkflowStateChanged],
        *, hold: bool = False,
    ) -> None:
        """Record moves of a workflow and apply them to its fold.

        An intent (submit, next slice) is stored before this returns, with every move held
        before it, in one transaction: the exchange call that follows it is never made before
        its intent is durable. A move that only records what already happened (an
        acknowledgement, a fill, a completion, a workflow move) may be held with `hold`: applied
        to the fold at once and stored with the next intent, before the next exchange call of
        any kind (TaskContext.before_call), or when the worker hands the workflow back
        (`_flush`), whichever comes first. So nothing held crosses an exchange call, and other
        workflows matching a history see every id this one has been answered with. A worker
        dying in between loses only facts the exchange still has: the task is found where its
        last stored move left it and reconciled by client id or refreshed, as after any crash.
        That saves a commit for nearly every move on the hot path.
        """
        metadata = step_metadata(workflow, self.owner)
        if hold and not any(getattr(e, "trigger", None) in INTENT_TRIGGERS for e in events):
            at = datetime.now(UTC)  # the store's clock stamps it for good when it is stored
            for event in events:
                workflow.move(event, at)
                workflow.held.append((event, metadata))
            return
        await self._store(workflow, events, metadata)

    async def _flush(self, workflow: Workflow) -> None:
        """Store the moves held in memory (see `_append`); ConcurrencyError when someone else
        appended since, and the fold is then not to be used any more."""
        if workflow.held:
            await self._store(workflow, [], {})

    async def _store(self, workflow: Workflow,
                     events: list[TaskStateChanged] | list[WorkflowStateChanged],
                     metadata: dict[str, str]) -> None:
        held = workflow.held
        workflow.held = []
        everything = [e for e, _ in held] + list(events)
        try:
            result = await self.store.append(
                workflow.stream_id,
                everything,
                workflow.version - len(held),
                event_metadata=[m for _, m in held] + [metadata] * len(events),
            )
        except (ConcurrencyError, StoreUnavailableError):
            raise  # the drive ends and the fold with it
        except Exception:
            # Refused (a payload the store will not take): the held moves stay for the
            # bulkhead to store the good ones alone (_store_until_refused).
            workflow.held = held
            raise
        # The store hands back the rows as stored: the fold goes on without reading them
        # (the held moves are in it already).
        for recorded in result.records[len(held):]:
            workflow.apply(recorded)
        _log_stored(workflow, result.records)

    async def _store_until_refused(self, workflow: Workflow) -> None:
        """Store the held moves one by one up to the one the store refuses, if any (the
        bulkhead's path, which is rare): what the exchange said before a refused move is not
        lost with it (nor a held `start`)."""
        held, workflow.held = workflow.held, []
        version = workflow.version - len(held)
        for event, metadata in held:
            try:
                result = await self.store.append(workflow.stream_id, [event], version,
                                                 event_metadata=[metadata])
            except (ConcurrencyError, StoreUnavailableError):
                raise
            except Exception as e:
                log.error("workflow %s: the store refused %s of %s: %s", workflow.workflow_id,
                          getattr(event, "trigger", "?"),
                          getattr(event, "task_name", "_workflow"), first_line(e))
                return
            _log_stored(workflow, result.records)
            version += 1

    def _resolve(self, workflow: Workflow, index: int) -> Any:
        params = workflow.resolved_params
        if params is None:
            params = workflow.resolved_params = resolve_params(workflow.spec, workflow.params,
                                                               self.accounts)
        return resolve_config(workflow.spec, index, params, workflow.results())

    # -- one claimed workflow --------------------------------------------------------------------

    async def drive(self, claim: Claim) -> Driven:
        """Step a claimed workflow while a step is actionable, then hand it back: due at its
        next poll when it waits on the exchange, dropped from the schedule when the worker has
        nothing more to do for it. Never raises but CancelledError."""
        workflow_id = claim.workflow_id
        try:
            return await self._drive(claim)
        except StoreUnavailableError as e:
            # Its claim runs out and it is anyone's again: nothing to hand back by hand.
            log.warning("workflow %s: database unavailable (%s); left to its claim's expiry",
                        workflow_id, e)
            return Driven(StepOutcome.RETRY)
        except Exception:
            # Handing it back failed (the schedule's own SQL): the claim's expiry frees it.
            log.exception("workflow %s: could not hand it back to the schedule", workflow_id)
            return Driven(StepOutcome.BROKEN)

    async def _drive(self, claim: Claim) -> Driven:
        workflow_id = claim.workflow_id
        try:
            workflow = await self._load(workflow_id)
        except IllegalTransitionError as e:
            log.error("workflow %s cannot be folded, parked until someone looks: %s",
                      workflow_id, e)
            await self.schedule.park(workflow_id, str(e))
            return Driven(StepOutcome.BROKEN)
        except StoreUnavailableError:
            raise
        except Exception as e:  # a stream the code cannot read is this workflow's problem
            return await self._failed(claim, None, e)
        moved = 0
        while True:
            if self._stopping or moved >= CHAIN_LIMIT:
                # Draining, or fair to the others: due again now, possibly elsewhere.
                return await self._hand_back(claim, workflow, Driven(StepOutcome.MOVED, moved),
                                             0)
            action = decide(workflow)
            if action is None:
                if (ended := await self._flushed(claim, workflow)) is not None:
                    return Driven(ended.outcome, moved)
                await self.schedule.finish(workflow_id, workflow.version)
                return Driven(StepOutcome.MOVED if moved else StepOutcome.IDLE, moved)
            try:
                ctx, stepped = await self._act(workflow, action)
            except ConcurrencyError:
                # Someone appended first (a command, another worker): hand it back due now.
                await self.schedule.release(workflow_id, -1, 0)
                return Driven(StepOutcome.CONFLICT, moved)
            except (RetryableError, UnknownOutcomeError) as e:
                retries = claim.retries + 1
                delay = backoff(retries, RETRY_BASE, RETRY_CAP, self._retry_scale, self._rng)
                # A lost response, or a money-moving call being made again (its intent is
                # stored): worth an operator's eye, unlike a status poll that timed out.
                current = workflow.current
                loud = isinstance(e, UnknownOutcomeError) or (
                    current is not None and current.state in (TaskState.SUBMITTING,
                                                              TaskState.CANCELING))
                log.log(logging.WARNING if loud else logging.INFO,
                        "workflow %s: %s; retrying in %.1f s", workflow_id, e, delay,
                        extra={"workflow_id": workflow_id,
                               "task": current.name if current else None})
                return await self._hand_back(claim, workflow, Driven(StepOutcome.RETRY, moved),
                                             delay, retries=retries, failures=claim.failures)
            except StoreUnavailableError:
                raise
            except Exception as e:
                return await self._failed(claim, workflow, e)
            if not stepped:
                return await self._hand_back(
                    claim, workflow,
                    Driven(StepOutcome.IDLE if not moved else StepOutcome.MOVED, moved),
                    self._wait(workflow, ctx))
            # The counters of the claim stay until the drive ends cleanly: a step that moves
            # and then blows up (an intent stored, the call raising) would otherwise reset them
            # for ever and never reach an operator.
            moved += 1

    async def _flushed(self, claim: Claim, workflow: Workflow) -> Driven | None:
        """Store the moves held in memory before the workflow leaves this worker's hands;
        None when stored, else how the drive ended: handed back due now when someone appended
        first, or through the bulkhead when the store refused them (counted, backed off and in
        the end escalated, as the same refusal would have been inside the step)."""
        try:
            await self._flush(workflow)
        except ConcurrencyError:
            await self.schedule.release(claim.workflow_id, -1, 0)
            return Driven(StepOutcome.CONFLICT)
        except StoreUnavailableError:
            raise
        except Exception as e:
            return await self._failed(claim, workflow, e)
        return None

    async def _hand_back(self, claim: Claim, workflow: Workflow, driven: Driven, due_in: float,
                         *, retries: int = 0, failures: int = 0) -> Driven:
        """Store what is held, then release the claim due in `due_in` seconds."""
        if (ended := await self._flushed(claim, workflow)) is not None:
            return Driven(ended.outcome, driven.moved)
        await self.schedule.release(claim.workflow_id, workflow.version, due_in,
                                    retries=retries, failures=failures)
        return driven

    def _wait(self, workflow: Workflow, ctx: TaskContext | None) -> float:
        """Seconds until a workflow that waits on the exchange (or on time) is looked at again."""
        now = self.clock()
        delay = poll_delay(workflow.current, now, self.polls, self.poll_scale, self._rng)
        if ctx is not None and ctx.wake_at is not None:
            delay = min(delay, max(SHORTEST, (ctx.wake_at - now).total_seconds()))
        return delay

    @property
    def _retry_scale(self) -> float:
        # Backoffs shrink with a fast simulated clock too, but far less than polls: a fault
        # the world injects is not over sooner because its confirmations are.
        return min(1.0, self.poll_scale * 100)

    async def _failed(self, claim: Claim, workflow: Workflow | None, error: Exception) -> Driven:
        """The bulkhead: an unexpected error stepping one workflow is logged and backed off;
        after `max_failures` in a row its task is handed to an operator."""
        workflow_id = claim.workflow_id
        failures = claim.failures + 1
        what = f"{type(error).__name__}: {first_line(error)}"
        if workflow is not None:
            # What was held is true (the exchange said so): stored first. A store that failed
            # mid-step leaves the fold ahead of the stream, and a command appending as many
            # events meanwhile would hide that from a version check: always folded again
            # before anything moves (a rare path; one read).
            try:
                await self._store_until_refused(workflow)
                workflow = await self._load(workflow_id)
            except ConcurrencyError:
                await self.schedule.release(workflow_id, -1, 0)
                return Driven(StepOutcome.CONFLICT)
            except StoreUnavailableError:
                raise
            except Exception:
                log.exception("workflow %s: could not store or fold it again", workflow_id)
                workflow = None  # nothing is moved from a fold the store may not have
        log.error("workflow %s: unexpected %s (%d of %d)", workflow_id, what, failures,
                  self.max_failures, exc_info=failures == 1)
        if failures >= self.max_failures:
            if workflow is None:  # not even folded: nothing to move, park it for a person
                await self.schedule.park(workflow_id, what[:500])
                return Driven(StepOutcome.BROKEN)
            try:
                if await self._escalate(workflow, what, failures):
                    await self.schedule.release(workflow_id, workflow.version, 0)
                    return Driven(StepOutcome.BROKEN)
            except ConcurrencyError:
                await self.schedule.release(workflow_id, -1, 0)
                return Driven(StepOutcome.CONFLICT)
        version = workflow.version if workflow is not None else claim.version
        delay = backoff(failures, FAILURE_BASE, FAILURE_CAP, self._retry_scale, self._rng)
        await self.schedule.release(workflow_id, version, delay, failures=failures,
                                    error=what[:500])
        return Driven(StepOutcome.BROKEN)

    async def _escalate(self, workflow: Workflow, what: str, failures: int) -> bool:
        """Park the workflow's current task (or the workflow) in needs_attention with the
        error; False when there is nothing it could be moved to."""
        message = f"{failures} unexpected errors in a row: {what}"
        task = workflow.current
        error: dict[str, Any] = {"code": "internal", "message": message, "attempts": failures}
        if task is not None:
            # Once the cause is fixed: resend where nothing is in flight, else settle by hand.
            error["commands"] = commands_for(workflow.workflow_id, task)
        if workflow.state in (WorkflowState.RUNNING, WorkflowState.PAUSED) and task is not None:
            machine = task_machine(task.kind)
            if machine.may(task.state, TaskTrigger.ESCALATE):
                dest = machine.next_state(task.state, TaskTrigger.ESCALATE)
                await self._append(workflow, [TaskStateChanged(
                    task_index=task.index, task_name=task.name, kind=task.kind,
                    trigger=TaskTrigger.ESCALATE, source=task.state, dest=dest, error=error)])
                return True
        if workflow_machine().may(workflow.state, WorkflowTrigger.ESCALATE):
            await self._append(workflow, [WorkflowStateChanged(
                trigger=WorkflowTrigger.ESCALATE, source=workflow.state,
                dest=workflow_machine().next_state(workflow.state, WorkflowTrigger.ESCALATE),
                reason=message)])
            return True
        return False

    # -- the loop --------------------------------------------------------------------------------

    async def run_pass(self) -> dict[str, int]:
        """Claim every due workflow (up to `concurrency`) and drive each until it waits; counts
        the outcomes. For tests and tools; `run` is the service's loop."""
        claims = await self.schedule.claim(self.concurrency)
        self.metrics.claims.inc(len(claims))
        driven = await asyncio.gather(*(self.drive(c) for c in claims))
        if self.runner is not None:
            await self.runner.catch_up()
        outcomes: dict[str, int] = {}
        for d in driven:
            key = StepOutcome.MOVED if d.moved else d.outcome
            outcomes[key] = outcomes.get(key, 0) + 1
        return outcomes

    async def run(self, stop: asyncio.Event, tick: float = 1.0) -> None:
        """Claim and drive due workflows until `stop`, waking on NOTIFY, on a driver finishing
        and at the next due time (at least every `tick` seconds, so an expired claim of a dead
        worker is taken over promptly). On `stop`, steps in flight finish, claims are handed
        back. Never raises for a database outage or for one workflow's failure."""
        self._stopping = False
        slot_freed = asyncio.Event()
        companions = [asyncio.create_task(self._renew(stop), name="claims")]
        if self.runner is not None:
            companions.append(asyncio.create_task(self.runner.run(stop), name="projections"))
        outage = 0
        try:
            while not stop.is_set():
                try:
                    async with self.store.listen() as notifications:
                        outage = 0
                        while not stop.is_set():
                            wait = await self._fill(slot_freed, tick)
                            await first_of(notifications.wait(wait), slot_freed.wait(),
                                           stop.wait())
                            slot_freed.clear()
                except StoreUnavailableError as e:
                    outage += 1
                    log.warning("worker %s: database unavailable (%s); retrying", self.owner, e)
                except StoreQueryError as e:
                    # The worker's own SQL refused (a migration missing?): loud, but it keeps
                    # trying rather than ending the service.
                    outage += 1
                    log.error("worker %s: PostgreSQL refused a statement (SQLSTATE %s): %s",
                              self.owner, e.sqlstate, e)
                if not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), min(5.0, 0.2 * 2 ** min(outage, 5)))
        finally:
            self._stopping = True
            if self._inflight:
                await asyncio.gather(*self._inflight.values(), return_exceptions=True)
            for companion in companions:
                companion.cancel()
            await asyncio.gather(*companions, return_exceptions=True)
            with contextlib.suppress(StoreUnavailableError, StoreQueryError):
                await self.schedule.release_all()

    async def _fill(self, slot_freed: asyncio.Event, tick: float) -> float:
        """Claim due workflows into the free driver slots; seconds to wait before looking again."""
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return tick
        claims = await self.schedule.claim(free)
        self.metrics.claims.inc(len(claims))
        for claim in claims:
            task = asyncio.create_task(self.drive(claim), name=f"workflow-{claim.workflow_id}")
            self._inflight[claim.workflow_id] = task
            task.add_done_callback(functools.partial(self._done, claim.workflow_id, slot_freed))
        if len(claims) == free:
            return 0.0  # there may be more due than slots: look again when one frees
        due = await self.schedule.next_due()
        return tick if due is None else max(0.0, min(tick, due))

    def _done(self, workflow_id: str, slot_freed: asyncio.Event, _: object) -> None:
        self._inflight.pop(workflow_id, None)
        slot_freed.set()

    async def _renew(self, stop: asyncio.Event) -> None:
        """Keep this worker's claims alive while it works (one statement for all of them)."""
        period = self.schedule.lease_seconds / 3
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            if self._inflight:
                try:
                    await self.schedule.renew()
                except (StoreUnavailableError, StoreQueryError) as e:
                    log.warning("worker %s could not renew its claims: %s", self.owner, e)


def _log_stored(workflow: Workflow, records: tuple[RecordedEvent, ...]) -> None:
    """One line per stored move, for the operator reading `serve`'s log."""
    for recorded in records:
        task = recorded.data.get("task_name") or "_workflow"
        log.info("workflow %s %s: %s -> %s", workflow.workflow_id[:8], task,
                 recorded.data.get("source"), recorded.data.get("dest"),
                 extra={"workflow_id": workflow.workflow_id, "task": task})


def step_metadata(workflow: Workflow, actor: str) -> dict[str, str]:
    """The metadata (docs/contracts.md §1) of a worker's events: every event of a workflow
    shares its correlation id; the cause of a step is the last event it was decided from."""
    return {
        "actor": actor,
        "correlation_id": workflow.workflow_id,
        "causation_id": f"{workflow.stream_id}:{workflow.version}",
    }
