"""Command handlers: start, cancel, pause, resume, retry and resolve, idempotent by command id.

Every handler returns the reply of docs/contracts.md §3 as a dict: `{"ok": true, ...}` or
`{"ok": false, "error": {"code", "message", "details"}}`. A repeated command id returns the
first reply and appends nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from events.catalogue import TaskStateChanged, WorkflowCreated, WorkflowStateChanged
from events.errors import ConcurrencyError
from events.store import EventStore, RecordedEvent
from events.vocabulary import (
    RESOLUTIONS,
    Outcome,
    TaskKind,
    TaskState,
    TaskTrigger,
    WorkflowTrigger,
)
from rebalancer.accounts import Accounts
from rebalancer.errors import IllegalTransitionError, RebalancerError, RetryableError
from rebalancer.exchanges.base import Exchanges
from rebalancer.machines import task_machine, workflow_machine
from rebalancer.settling import (
    Found,
    SettlingError,
    look_up,
    look_up_deposit,
    parse_result,
    settled_fields,
)
from rebalancer.specs.models import WorkflowSpec
from rebalancer.specs.resolution import dump_params, resolve_params
from rebalancer.specs.validation import validate_spec
from rebalancer.tasks import partial
from rebalancer.tasks.remedies import commands_for
from rebalancer.workflow import TaskRecord, Workflow, fold

# Workflow ids are derived from command ids, so a repeated start command finds its workflow
# instead of starting a second one.
COMMAND_NAMESPACE = uuid.UUID("6f1c2a8e-3f5b-4d7e-9a41-52b8c0d7e913")


def workflow_id_for(command_id: str) -> str:
    return str(uuid.uuid5(COMMAND_NAMESPACE, command_id))


async def start_workflow(
    store: EventStore,
    spec: WorkflowSpec,
    params: Mapping[str, str | Decimal | int],
    accounts: Accounts,
    *,
    command_id: str | None = None,
    actor: str = "cli",
) -> tuple[str, bool]:
    """Validate the spec and parameters, then append WorkflowCreated.

    Returns (workflow id, created now). Raises SpecError before anything is appended when the
    spec or a parameter is bad; a repeated `command_id` returns the first workflow's id, and
    raises CommandError `conflict` when the id was bound to another command or body.
    """
    validate_spec(spec, accounts)
    resolved = resolve_params(spec, params, accounts)
    command_id = command_id or f"start-{uuid.uuid4()}"
    workflow_id = workflow_id_for(command_id)
    body = {"spec": spec.name, "params": {k: str(v) for k, v in params.items()}}
    digest = body_hash(body)
    bound, first_kind, first_hash, first_workflow, at = await store.bind_command(
        command_id, "start", digest, workflow_id)
    if not bound and (first_kind, first_hash) != ("start", digest):
        raise CommandError(
            "conflict",
            f"command id {command_id} was used by a {first_kind} on workflow {first_workflow}"
            f" at {at.isoformat()}; use a new id for another command",
            kind=first_kind, workflow_id=first_workflow, at=at.isoformat(),
        )
    event = WorkflowCreated(
        spec_name=spec.name,
        spec=spec.model_dump(mode="json"),
        params=dump_params(resolved),
        command_id=command_id,
    )
    try:
        await store.append(
            f"workflow-{workflow_id}",
            [event],
            0,
            metadata=command_metadata(command_id, workflow_id, actor),
        )
    except ConcurrencyError:
        return workflow_id, False
    return workflow_id, True


def command_metadata(command_id: str, workflow_id: str, actor: str) -> dict[str, str]:
    """The metadata of a command's events: caused by the command, correlated by workflow."""
    return {
        "command_id": command_id,
        "actor": actor,
        "correlation_id": workflow_id,
        "causation_id": command_id,
    }


# -- the operator's commands -------------------------------------------------------------------

CONTROL_TRIGGERS = {
    "cancel": WorkflowTrigger.CANCEL,
    "pause": WorkflowTrigger.PAUSE,
    "resume": WorkflowTrigger.RESUME,
    "retry": WorkflowTrigger.RETRY,
}
SAME_COMMAND_WAIT = 100  # polls of 50 ms for a concurrent duplicate's outcome
IN_FLIGHT = (TaskState.SUBMITTING, TaskState.REQUESTED, TaskState.OPEN, TaskState.PROCESSING)
Reply = dict[str, Any]


class CommandError(RebalancerError):
    """A command refused with one of docs/contracts.md §3's codes; nothing was appended."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.details = details

    def reply(self) -> Reply:
        return {
            "ok": False,
            "error": {"code": self.code, "message": str(self), "details": self.details},
        }


async def control_workflow(
    store: EventStore,
    kind: str,
    command_id: str,
    workflow_id: str,
    reason: str | None = None,
    *,
    actor: str = "operator",
) -> Reply:
    """cancel | pause | resume | retry a workflow; replies with its new state."""
    trigger = CONTROL_TRIGGERS[kind]

    async def run() -> Reply:
        workflow = await _load(store, workflow_id)
        source = workflow.state
        if not workflow_machine().may(source, trigger):
            allowed = ", ".join(workflow_machine().allowed(source)) or "none (it has ended)"
            raise CommandError(
                "illegal_transition",
                f"cannot {kind} a workflow that is {source}",
                state=source,
                allowed=allowed,
            )
        events: list[WorkflowStateChanged | TaskStateChanged] = []
        if trigger == WorkflowTrigger.RETRY:
            waiting = [t.name for t in workflow.tasks if t.state == TaskState.NEEDS_ATTENTION]
            if waiting:
                # The worker would escalate it again at once: the operator's answer is resolve.
                raise CommandError(
                    "conflict",
                    f"task {waiting[0]} still needs attention; resolve it (resend,"
                    " done or failed) and the workflow resumes",
                    tasks=waiting,
                )
        if trigger == WorkflowTrigger.CANCEL:
            moves, ends = _cancel_moves(workflow, reason or kind, actor)
            events.extend(moves)
            if not ends:
                # The worker carries the cancel out (a resting order is canceled on the
                # exchange first); the workflow ends `canceled` once the task has.
                task = workflow.current
                assert task is not None
                if moves:
                    await store.append(workflow.stream_id, events, workflow.version,
                                       metadata=command_metadata(command_id, workflow_id, actor))
                return {"ok": True, "workflow_id": workflow_id, "state": workflow.state,
                        "task": task.name, "task_state": TaskState.CANCELING}
        events.append(
            WorkflowStateChanged(
                trigger=trigger,
                source=source,
                dest=workflow_machine().next_state(source, trigger),
                reason=reason or f"{kind} by {actor}",
            )
        )
        await store.append(
            workflow.stream_id,
            events,
            workflow.version,
            metadata=command_metadata(command_id, workflow_id, actor),
        )
        return {"ok": True, "workflow_id": workflow_id, "state": events[-1].dest}

    body = {"workflow_id": workflow_id, "reason": reason}
    return await _idempotent(store, command_id, kind, body, workflow_id, run)


def _cancel_moves(workflow: Workflow, why: str, actor: str) -> tuple[list[TaskStateChanged], bool]:
    """The task moves a cancel appends, and whether the workflow ends `canceled` with them
    (False: the worker stops the task first). Raises CommandError `conflict` where canceling
    would only hide money that may be moving or may have moved."""
    task = workflow.current
    if task is None:
        return [], True
    machine = task_machine(task.kind)
    if task.state == TaskState.CANCELING:
        return [], False  # asked for before: the worker is carrying it out
    if task.state == TaskState.NEEDS_ATTENTION:
        if _may_have_moved(task):
            raise _settle_first(workflow, task)
        return [_task_move(task, TaskTrigger.CANCEL, error={"code": "canceled", "message": why,
                                                            "actor": actor})], True
    # A trade that sent an order (or slices of a TWAP): the worker cancels what rests on the
    # exchange and settles the fills. From `created` only once a slice was sent (a refused
    # slice sends a TWAP back there); a trade that never sent anything is simply canceled.
    if task.kind == TaskKind.TRADE and machine.may(task.state, TaskTrigger.REQUEST_CANCEL) and (
            task.state != TaskState.CREATED or task.request_params is not None):
        return [_task_move(task, TaskTrigger.REQUEST_CANCEL, error={
            "code": "cancel_requested", "message": why, "actor": actor,
            "from_state": task.state})], False
    if task.state in IN_FLIGHT:
        # Money has left (a withdrawal or transfer cannot be called back): canceling the
        # workflow would not stop it, only hide it. Paused, the task still settles.
        raise CommandError(
            "conflict",
            f"task {task.name} is in flight ({task.state}); pause the workflow"
            " and let it settle, or resolve the task, before canceling",
            task=task.name,
            state=task.state,
        )
    if machine.may(task.state, TaskTrigger.CANCEL):
        return [_task_move(task, TaskTrigger.CANCEL, error={"code": "canceled", "message": why})
                ], True
    return [], True


def _may_have_moved(task: TaskRecord) -> bool:
    """Whether a task in needs_attention may have moved money its record does not account for.

    Nothing can have moved where no intent was ever stored: every exchange call that moves
    money is preceded by its stored intent (request_params, counted in `intents`), so a task
    without one never reached the exchange (one parked by the worker's bulkhead before it sent
    anything, say). A trade parked for a partial fill has every order ended and recorded, its
    remainder too: what moved is known, and canceling leaves it as recorded. Anything else sent
    may have moved in ways only an operator can settle; a deposit sends nothing itself but
    waits for money an earlier task or someone else sent, and only an operator can say where
    that money is."""
    if task.kind == TaskKind.DEPOSIT:
        return True
    if task.intents == 0 and task.request_params is None:
        return False
    return not _partial_fill_settled(task)


def _partial_fill_settled(task: TaskRecord) -> bool:
    slices = ((task.refresh_result or {}).get("extra") or {}).get("slices") or []
    return (task.kind == TaskKind.TRADE and (task.error or {}).get("code") == partial.REASON
            and bool(slices) and all(s.get("status") in ("closed", "canceled", "rejected")
                                     for s in slices))


def _settle_first(workflow: Workflow, task: TaskRecord) -> CommandError:
    """The refusal of a cancel from needs_attention, naming the commands that settle it."""
    where = f"{workflow.workflow_id} {task.name}"
    error = task.error or {}
    commands = [str(c) for c in error.get("commands") or []] or [
        f"rebalancer resolve {where} --outcome done --note 'checked: it went through'",
        f"rebalancer resolve {where} --outcome failed --note 'checked: nothing moved'",
    ]
    why = error.get("message") or "needs attention"
    return CommandError(
        "conflict",
        f"task {task.name} needs attention and its money may have moved ({why}); canceling"
        " would only hide it. Settle it first with what the exchange shows: "
        + "; or ".join(commands),
        task=task.name, state=task.state, commands=commands,
    )


async def reopen_workflow(
    store: EventStore,
    command_id: str,
    workflow_id: str,
    from_task: str,
    reason: str | None = None,
    *,
    actor: str = "operator",
) -> Reply:
    """`retry --from TASK`: a failed workflow (money may be in transit) runs again from `TASK`.

    A failed TASK is sent again; a done one goes back to needs_attention, to be resolved with
    the facts it never recorded (resolve --result); failed tasks after it go back to created.
    Refused (conflict) once a task after it recorded a request: the money moved on from there.
    """

    async def run() -> Reply:
        workflow = await _load(store, workflow_id)
        if not workflow_machine().may(workflow.state, WorkflowTrigger.REOPEN):
            raise CommandError("illegal_transition", f"only a failed workflow is re-opened at a"
                               f" task; this one is {workflow.state}", state=workflow.state)
        task = _task_named(workflow, from_task)
        if not task_machine(task.kind).may(task.state, TaskTrigger.REOPEN):
            raise CommandError("illegal_transition", f"task {task.name} is {task.state}: only a"
                               " failed or done task is re-opened", state=task.state)
        later = [t for t in workflow.tasks if t.index > task.index]
        for moved in later:
            if moved.request_params is not None or moved.state not in (
                    TaskState.CREATED, TaskState.FAILED):
                raise CommandError(
                    "conflict",
                    f"task {moved.name} already recorded a request ({moved.state}): the money"
                    f" of {task.name} moved on from there; re-open at {moved.name} or later",
                    task=moved.name, state=moved.state)
        why = reason or f"re-opened by {actor}"
        events: list[WorkflowStateChanged | TaskStateChanged] = [_task_move(
            task, TaskTrigger.REOPEN,
            error={"code": "reopened", "message": f"{why}: resolve it with what happened"
                   " (resolve --outcome done --result ..., resend or failed)", "actor": actor,
                   "commands": commands_for(workflow_id, task)}
            if task.state == TaskState.DONE else None)]
        events += [_task_move(t, TaskTrigger.REOPEN) for t in later if t.state == TaskState.FAILED]
        events.append(WorkflowStateChanged(
            trigger=WorkflowTrigger.REOPEN, source=workflow.state,
            dest=workflow_machine().next_state(workflow.state, WorkflowTrigger.REOPEN),
            reason=f"{why}, from task {task.name}"))
        await store.append(workflow.stream_id, events, workflow.version,
                           metadata=command_metadata(command_id, workflow_id, actor))
        return {"ok": True, "workflow_id": workflow_id, "state": events[-1].dest,
                "task": task.name, "task_state": events[0].dest}

    body = {"workflow_id": workflow_id, "reason": reason, "from_task": from_task}
    return await _idempotent(store, command_id, "retry", body, workflow_id, run)


async def resolve_task(
    store: EventStore,
    command_id: str,
    workflow_id: str,
    task_name: str,
    outcome: Outcome,
    note: str,
    *,
    actor: str = "operator",
    result: Mapping[str, str] | None = None,
    exchanges: Exchanges | None = None,
) -> Reply:
    """An operator's decision on a task in needs_attention: resend it, or declare it done or
    failed. The workflow goes back to running on the worker's next pass.

    With `result` (done only), the stated fields are recorded where the task's kind records
    them (rebalancer/settling.py); with `exchanges`, the operation they name is looked up first
    and must agree, and its own record fills the fields left out. Like the pre-flight of a
    start, the look-up happens before the command id is bound: a refusal leaves it free."""
    given: dict[str, str] = {}
    found: Found | None = None
    if outcome == "done" and not result and exchanges is not None \
            and not await store.events_of_command(command_id):
        workflow = await _load(store, workflow_id)
        found = await _deposit_as_done(exchanges, _task_named(workflow, task_name))
    if result:
        if outcome != "done":
            raise CommandError("invalid_request", f"a result is stated only with outcome done,"
                                                  f" not {outcome}", field="result")
        workflow = await _load(store, workflow_id)
        task = _task_named(workflow, task_name)
        try:
            given = parse_result(task.kind, result)
            if exchanges is not None and not await store.events_of_command(command_id):
                found = await look_up(exchanges, task, given)
        except SettlingError as e:
            raise CommandError("invalid_request", str(e), field=f"result.{e.field}") from None
        except RetryableError as e:
            raise CommandError("internal", f"could not ask the exchange about the result ({e});"
                               " repeat the request", retryable=True,
                               cause="exchange_unavailable") from None

    async def run() -> Reply:
        workflow = await _load(store, workflow_id)
        task = _task_named(workflow, task_name)
        trigger = RESOLUTIONS[outcome]
        if not task_machine(task.kind).may(task.state, trigger):
            raise CommandError(
                "illegal_transition",
                f"task {task.name} is {task.state}, not needs_attention",
                state=task.state,
            )
        carried: dict[str, Any] = {
            "error": {"code": f"resolved_{outcome}", "message": note, "actor": actor}
        }
        if trigger == TaskTrigger.RESOLVE_DONE:
            # What later tasks reference: as last recorded, then the exchange's record, then
            # what the operator stated; the note says who decided.
            carried.update(settled_fields(task, given, found, note))
        event = _task_move(task, trigger, **carried)
        await store.append(
            workflow.stream_id,
            [event],
            workflow.version,
            metadata=command_metadata(command_id, workflow_id, actor),
        )
        return {"ok": True, "workflow_id": workflow_id, "task": task.name, "state": event.dest}

    body: dict[str, Any] = {"workflow_id": workflow_id, "task": task_name, "outcome": outcome,
                            "note": note}
    if result:
        body["result"] = dict(result)  # bound too: the same id with other facts is a conflict
    return await _idempotent(store, command_id, "resolve", body, workflow_id, run)


async def _deposit_as_done(exchanges: Exchanges, task: TaskRecord) -> Found | None:
    """A deposit declared done with no facts stated: the exchange must show it credited (its
    record then fills the result), or the money would be called arrived where nobody sees it.
    None for any other kind, or a deposit that never started watching."""
    params = task.request_params or {}
    if task.kind != TaskKind.DEPOSIT or task.state != TaskState.NEEDS_ATTENTION \
            or "account" not in params:
        return None
    try:
        found = await look_up_deposit(exchanges, params)
    except RetryableError as e:
        raise CommandError("internal", f"could not ask the exchange about the deposit ({e});"
                           " repeat the request", retryable=True,
                           cause="exchange_unavailable") from None
    if found is None:
        what = f"txid {params['txid']}" if params.get("txid") else f"{params.get('amount')}"
        raise CommandError(
            "invalid_request",
            f"{params['account']} shows no credited {params['currency']} deposit matching"
            f" task {task.name} ({what}): if it arrived under another txid, give it with"
            " --result txid=...; if it never arrived, resolve failed (or wait: the deposit"
            " history may lag)", field="outcome")
    return found


def _task_named(workflow: Workflow, name: str) -> TaskRecord:
    task = next((t for t in workflow.tasks if t.name == name.lower()), None)
    if task is None:
        raise CommandError(
            "not_found",
            f"workflow {workflow.workflow_id} has no task {name!r}",
            tasks=[t.name for t in workflow.tasks],
        )
    return task


def _task_move(task: TaskRecord, trigger: TaskTrigger, **carried: Any) -> TaskStateChanged:
    return TaskStateChanged(
        task_index=task.index,
        task_name=task.name,
        kind=task.kind,
        trigger=trigger,
        source=task.state,
        dest=task_machine(task.kind).next_state(task.state, trigger),
        **carried,
    )


async def _load(store: EventStore, workflow_id: str) -> Workflow:
    try:
        uuid.UUID(workflow_id)
    except ValueError:
        raise CommandError("invalid_request", f"{workflow_id!r} is not a workflow id") from None
    events = await store.read_stream(f"workflow-{workflow_id}")
    if not events:
        raise CommandError("not_found", f"no workflow {workflow_id}")
    return fold(events)


async def _idempotent(
    store: EventStore,
    command_id: str,
    kind: str,
    body: Mapping[str, Any],
    workflow_id: str | None,
    run: Callable[[], Awaitable[Reply]],
) -> Reply:
    """The first reply for `command_id` if it is the same command; a conflict naming the first
    command if it is another; else bind the id and run (retrying a lost race)."""
    reused = await _bind(store, command_id, kind, body, workflow_id)
    if reused is not None:
        return reused
    kept = await store.recall_outcome(command_id)
    if kept is not None:
        return kept
    prior = await store.events_of_command(command_id)
    if prior:
        return _reply_from(prior)  # appended, but the reply was not kept (a crash between)
    for _ in range(3):
        try:
            reply = await run()
        except CommandError as e:
            reply = e.reply()
        except IllegalTransitionError as e:
            reply = CommandError("illegal_transition", str(e)).reply()
        except ConcurrencyError:
            continue  # the worker moved it meanwhile: decide again on the new state
        await store.remember_outcome(command_id, kind, reply)
        return reply
    return CommandError("conflict", "the workflow kept moving; try again").reply()


def body_hash(body: Mapping[str, Any]) -> str:
    """The hash a command id is bound to: every validated field but the id, free text too."""
    canonical = json.dumps(dict(body), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _bind(
    store: EventStore, command_id: str, kind: str, body: Mapping[str, Any], workflow_id: str | None
) -> Reply | None:
    """None when this command holds the id now (bound here, or bound by its own earlier try);
    else the reply to a reuse: the first outcome for the same command, once it is there (a
    concurrent duplicate waits for it), or a conflict naming the first command."""
    digest = body_hash(body)
    bound, first_kind, first_hash, first_workflow, at = await store.bind_command(
        command_id, kind, digest, workflow_id)
    if bound:
        return None
    if (first_kind, first_hash) != (kind, digest):
        concerning = f" on workflow {first_workflow}" if first_workflow else ""
        return CommandError(
            "conflict",
            f"command id {command_id} was used by a {first_kind}{concerning} at"
            f" {at.isoformat()}; use a new id for another command",
            kind=first_kind, workflow_id=first_workflow, at=at.isoformat(),
        ).reply()
    for _ in range(SAME_COMMAND_WAIT):
        kept = await store.recall_outcome(command_id)
        if kept is not None:
            return kept
        prior = await store.events_of_command(command_id)
        if prior:
            return _reply_from(prior)
        await asyncio.sleep(0.05)
    return None  # the first try died between binding and outcome: this one carries it out


def _reply_from(events: list[RecordedEvent]) -> Reply:
    last = events[-1]
    reply: Reply = {"ok": True, "workflow_id": last.stream_id.removeprefix("workflow-")}
    if last.type == TaskStateChanged.type_name:
        reply.update(task=last.data["task_name"], state=last.data["dest"])
    elif last.type == WorkflowStateChanged.type_name:
        reply["state"] = last.data["dest"]
    return reply


__all__ = ["CommandError", "control_workflow", "reopen_workflow", "resolve_task",
           "start_workflow"]
