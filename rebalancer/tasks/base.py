"""What every task processor shares: the context it acts through and the intent-first send."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar, cast

from events.catalogue import TaskStateChanged
from events.vocabulary import TaskKind, TaskState, TaskTrigger, WorkflowState
from rebalancer.accounts import Accounts
from rebalancer.errors import (
    AmbiguousOutcomeError,
    RejectedError,
    RetryableError,
    SpecError,
    UnknownOutcomeError,
)
from rebalancer.exchanges.base import Exchange, Exchanges, HistoryMatch, WrappedPort
from rebalancer.machines import task_machine
from rebalancer.tasks import remedies
from rebalancer.workflow import TaskRecord, Workflow, client_id

T = TypeVar("T")

# How long a task may stay unfinished before it is parked in needs_attention (seconds).
DEFAULT_DEADLINES: dict[TaskKind, float] = {
    TaskKind.TRADE: 3600,
    TaskKind.WITHDRAW: 6 * 3600,
    TaskKind.DEPOSIT: 12 * 3600,
    TaskKind.TRANSFER: 600,
    TaskKind.MASTER_TRANSFER: 600,
}
# History lookups look back this far before the intent: exchange clocks and ours differ.
HISTORY_SLACK = timedelta(minutes=5)


@dataclass
class TaskContext:
    """One step of one task: the workflow as folded, the exchanges, and a way to record moves.

    `append` stores events with the workflow's expected version (raising ConcurrencyError
    when another worker moved first) and applies them to `workflow`.
    """

    workflow: Workflow
    task: TaskRecord
    exchanges: Exchanges
    accounts: Accounts
    now: datetime
    append: Callable[[list[TaskStateChanged]], Awaitable[None]]
    resolve: Callable[[Workflow, int], Any]
    # Exchange ids other workflows' tasks of a kind recorded since a time (see history_match).
    claimed: Callable[[str, datetime], Awaitable[frozenset[str]]] | None = None
    # The same claims in full ({id, workflow_id, amount, txid, at}), for an operator's attention.
    claims: Callable[[str, datetime], Awaitable[list[dict[str, Any]]]] | None = None
    deadlines: dict[TaskKind, float] = field(default_factory=lambda: dict(DEFAULT_DEADLINES))
    # A step that waits for a time it knows (a TWAP's next slice) says so: the worker looks
    # again then rather than at its next poll.
    wake_at: datetime | None = None
    # Awaited before every exchange call made through `exchange()`: the engine stores there
    # the moves it holds in memory, so the store has every answer before the next call goes.
    before_call: Callable[[], Awaitable[None]] | None = None

    async def move(self, trigger: TaskTrigger, **carried: Any) -> None:
        """Record one move of this task; refused before anything is stored if the table says no."""
        source = self.task.state
        dest = task_machine(self.task.kind).next_state(source, trigger)
        event = TaskStateChanged(
            task_index=self.task.index,
            task_name=self.task.name,
            kind=self.task.kind,
            trigger=trigger,
            source=source,
            dest=dest,
            **carried,
        )
        await self.append([event])

    def config(self, expected: type[T]) -> T:
        """The task's typed config, rendered from params and earlier results."""
        config = self.resolve(self.workflow, self.task.index)
        assert isinstance(config, expected), f"{self.task.name}: {type(config).__name__}"
        return config

    def next_client_id(self) -> str:
        return client_id(self.workflow.workflow_id, self.task.index, self.task.intents + 1)

    def exchange(self, account: str) -> Exchange:
        port = self.exchanges.for_account(account)
        return port if self.before_call is None else cast(
            Exchange, _AfterStored(port, self.before_call))

    async def history_match(
        self, currency: str, amount: Decimal, address: str | None = None
    ) -> HistoryMatch:
        """What identifies this task's operation in the history. Once the exchange acknowledged
        the current intent (past `submitting`), its id is known and narrows the match to that
        operation, so identical operations of other workflows do not make it ambiguous. While
        `submitting`, a request_result can only be an older intent's: it is not used; instead
        the operations other workflows already recorded as theirs are left out."""
        since = (self.task.intent_at or self.now) - HISTORY_SLACK
        acknowledged = self.task.state not in (TaskState.CREATED, TaskState.SUBMITTING)
        exchange_id = (self.task.request_result or {}).get("id") if acknowledged else None
        exclude: frozenset[str] = frozenset()
        if not acknowledged and self.claimed is not None:
            exclude = await self.claimed(self.task.kind.value, since)
        return HistoryMatch(
            currency=currency, amount=amount, since=since, address=address,
            exchange_id=exchange_id, exclude_ids=exclude,
        )

    @property
    def holding(self) -> bool:
        """Whether this step may only settle what is in flight, never store a new intent: the
        workflow is paused, or an operator asked for the task to be canceled."""
        return (self.workflow.state != WorkflowState.RUNNING
                or self.task.state == TaskState.CANCELING)

    @property
    def deadline_passed(self) -> bool:
        limit = self.deadlines.get(self.task.kind)
        spec_limit = self.workflow.spec.tasks[self.task.index].deadline_seconds
        limit = spec_limit if spec_limit is not None else limit
        # A cancel gets the kind's whole deadline from when it was asked for: a long TWAP
        # canceled late is not handed to an operator before its order was even canceled.
        started = (self.task.entered_at if self.task.state == TaskState.CANCELING
                   else self.task.started_at)
        return bool(limit and started and (self.now - started).total_seconds() > limit)


class _AfterStored(WrappedPort):
    """An account's port whose every call first awaits `before` (see TaskContext)."""

    def __init__(self, inner: Exchange, before: Callable[[], Awaitable[None]]) -> None:
        super().__init__(inner)
        self._before = before

    def wrap(self, name: str, target: Callable[..., Awaitable[Any]]
             ) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            await self._before()
            return await target(*args, **kwargs)

        return call


class Processor(ABC):
    """Advances one kind of task by one step; at most one money-moving exchange call per step."""

    kind: TaskKind

    async def step(self, ctx: TaskContext) -> None:
        state = ctx.task.state
        if state != TaskState.CREATED and ctx.deadline_passed:
            await ctx.move(TaskTrigger.ESCALATE, error={
                **deadline_error(ctx.task), **await deadline_attention(ctx)})
            return
        try:
            if state == TaskState.CREATED:
                await self.request(ctx)
            elif state == TaskState.SUBMITTING:
                await self.reconcile(ctx)
            elif state == TaskState.CANCELING:
                await self.cancel(ctx)
            else:
                await self.refresh(ctx)
        except SpecError as e:
            # A reference that cannot be rendered now will not render later either.
            await ctx.move(TaskTrigger.FAIL, error=error("spec", str(e)))
        except RejectedError as e:
            # The task's state now, not at the start: once an intent is stored in this step,
            # an operation may be in flight and is never failed on a guess.
            if ctx.task.state != TaskState.CREATED:
                raise
            # Refused before any intent (no such market, say): nothing moved, it will not
            # change by asking again.
            await ctx.move(TaskTrigger.FAIL, error=error("rejected", str(e)))

    @abstractmethod
    async def request(self, ctx: TaskContext) -> None:
        """From `created`: store the intent, then ask the exchange."""

    async def reconcile(self, ctx: TaskContext) -> None:
        """From `submitting` found at the start of a step: did the stored intent land?"""
        raise NotImplementedError(f"{self.kind} has no submitting state")

    @abstractmethod
    async def refresh(self, ctx: TaskContext) -> None:
        """After the exchange acknowledged: follow it until done."""

    async def cancel(self, ctx: TaskContext) -> None:
        """From `canceling`: stop what rests on the exchange, settle what filled, end canceled."""
        raise NotImplementedError(f"{self.kind} is never canceled in flight")


async def send(
    ctx: TaskContext, trigger: TaskTrigger, params: dict[str, Any], call: Callable[[], Awaitable[T]]
) -> T | None:
    """Store the intent (`trigger`, usually submit), then make the one exchange call.

    Returns the call's result; None when the exchange refused (the task is then failed with
    the reason). An unknown outcome or a retryable error propagates with the intent stored,
    so the next step reconciles by client id instead of resending blind.
    """
    await ctx.move(trigger, request_params=params)
    try:
        return await call()
    except RejectedError as e:
        await ctx.move(TaskTrigger.FAIL, error=error("rejected", str(e)))
        return None


async def reconcile_lookup(ctx: TaskContext, lookup: Callable[[], Awaitable[T | None]]) -> T | None:
    """Ask the exchange about the stored intent. Not there: `reset` (a new client id next time)
    and None. Ambiguous (UnknownOutcomeError): `escalate` to an operator and None."""
    try:
        found = await lookup()
    except AmbiguousOutcomeError as e:
        await ctx.move(TaskTrigger.ESCALATE, error=error(
            "unknown_outcome", str(e), **await attention(ctx, e.candidates)))
        return None
    except UnknownOutcomeError as e:
        await ctx.move(TaskTrigger.ESCALATE, error=error(
            "unknown_outcome", str(e), commands=remedies.commands_for(ctx.workflow.workflow_id,
                                                                     ctx.task)))
        return None
    if found is None:
        await ctx.move(TaskTrigger.RESET)
    return found


async def attention(ctx: TaskContext, seen: list[dict[str, str | None]]) -> dict[str, Any]:
    """What an operator needs to settle an ambiguous match: every candidate (those the exchange
    showed, and the identical ones other workflows recorded as theirs, with who claimed them)
    and the exact commands that would settle it, one per unclaimed candidate."""
    params = ctx.task.request_params or {}
    candidates = [{**c, "claimed_by_workflow": None} for c in seen]
    if ctx.claims is not None and params.get("amount") is not None:
        since = (ctx.task.intent_at or ctx.now) - HISTORY_SLACK
        for claim in await ctx.claims(ctx.task.kind.value, since):
            if claim["currency"] == params.get("currency") and claim["amount"] is not None and (
                    Decimal(claim["amount"]) == Decimal(params["amount"])):
                candidates.append({"id": claim["id"], "txid": claim["txid"],
                                   "amount": claim["amount"], "at": claim["at"],
                                   "claimed_by_workflow": claim["workflow_id"]})
    workflow_id, name = ctx.workflow.workflow_id, ctx.task.name
    commands = []
    for c in candidates:
        if c["claimed_by_workflow"] is None:
            facts = (("id", str(c["id"])),) + ((("txid", str(c["txid"])),) if c.get("txid")
                                                 else ())
            commands.append(remedies.command(workflow_id, name, "done",
                                           f"checked: {c['id']} is ours", facts))
    commands.append(remedies.command(workflow_id, name, "failed",
                                   "checked: none of them is ours, nothing was sent"))
    return {"candidates": candidates, "commands": commands}


async def deadline_attention(ctx: TaskContext) -> dict[str, Any]:
    """The commands that settle a task past its deadline; for a deposit also the deposits the
    account shows (`candidates`, with the workflows that claimed each), looked up once more:
    a deposit that arrived late, or under another txid, is then named with its command. An
    exchange that cannot answer now leaves the candidates empty rather than the task running
    past its deadline."""
    candidates: list[dict[str, Any]] | None = None
    params = ctx.task.request_params or {}
    if ctx.task.kind == TaskKind.DEPOSIT and params.get("account"):
        since = datetime.fromisoformat(params["since"])
        try:
            deposits = await ctx.exchange(params["account"]).fetch_deposits(
                params["currency"], since)
        except (RetryableError, UnknownOutcomeError):
            deposits = []
        candidates = await remedies.deposit_candidates(deposits, params, ctx.claims, since)
    found: dict[str, Any] = {"commands": remedies.commands_for(
        ctx.workflow.workflow_id, ctx.task, candidates)}
    if candidates is not None:
        found["candidates"] = candidates
    return found


def deadline_error(task: TaskRecord) -> dict[str, Any]:
    """Why a task is handed to an operator at its deadline, naming the exchange's last raw
    status, above all one the connector's table does not know (it was never guessed)."""
    last = last_reported(task)
    message = f"{task.name} passed its deadline"
    if last is None:
        return error("deadline", message)
    status, raw = last
    if status == "unknown":
        message += f"; the exchange reports status {raw!r}, which Rebalancer does not know"
    else:
        message += f"; the exchange last reported {raw!r}"
    return error("deadline", message, raw_status=raw, status=status)


def last_reported(task: TaskRecord) -> tuple[str, str] | None:
    """(our status, the exchange's raw status) as last recorded by the task, if any."""
    refresh = task.refresh_result or {}
    slices = (refresh.get("extra") or {}).get("slices") or []
    for record in (refresh.get("result") or {}, slices[-1] if slices else {},
                   task.request_result or {}):
        if record.get("raw_status"):
            return str(record.get("status", "")), str(record["raw_status"])
    return None


def error(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **details}


def money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)
