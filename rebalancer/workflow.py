"""The workflow aggregate: fold(events) -> state via the machines; decide(state) -> next action."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from events.catalogue import TaskStateChanged, WorkflowCreated, WorkflowStateChanged
from events.store import RecordedEvent
from events.vocabulary import (
    INTENT_TRIGGERS,
    TaskKind,
    TaskState,
    WorkflowState,
    WorkflowTrigger,
)
from rebalancer.errors import IllegalTransitionError
from rebalancer.machines import StateMachine, task_machine, workflow_machine
from rebalancer.specs.models import WorkflowSpec

RESULT_KEYS = ("request_params", "request_result", "refresh_result")

# Where a fold in collect mode sends what it finds wrong; None: the fold raises instead.
Report = Callable[[str], None]


@dataclass
class TaskRecord:
    """One task as its events tell it."""

    index: int
    name: str
    kind: TaskKind
    state: TaskState = TaskState.CREATED
    intents: int = 0  # intents stored so far (submit/next_slice): numbers the client ids
    request_params: dict[str, Any] | None = None
    request_result: dict[str, Any] | None = None
    refresh_result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    started_at: datetime | None = None  # its first move: deadlines count from here
    entered_at: datetime | None = None  # when it entered `state`
    intent_at: datetime | None = None  # when the current intent was stored
    listed: bool = True  # its kind comes from the spec; else from its first event (audit only)

    @property
    def client_id(self) -> str | None:
        return None if self.request_params is None else self.request_params.get("client_id")

    @property
    def terminal(self) -> bool:
        return self.state in task_machine(self.kind).terminal

    def results(self) -> dict[str, Any]:
        return {key: getattr(self, key) or {} for key in RESULT_KEYS}


@dataclass(kw_only=True)
class StreamFold:
    """The machines' walk over one stream: the workflow's state and every task's.

    The one fold of a workflow's moves. Strict (no `report`), it raises IllegalTransitionError at
    the first move the tables refuse: that is the aggregate. In collect mode it reports every
    problem and goes on from the state the event stored, so one run names every bad event: that
    is the audit.
    """

    stream_id: str
    tasks: list[TaskRecord]
    spec_tasks: int | None  # how many tasks the spec lists; None when it lists none
    report: Report | None = None
    state: WorkflowState = WorkflowState.CREATED
    reason: str | None = None
    version: int = 0
    updated_at: datetime | None = None

    def move_workflow(self, moved: WorkflowStateChanged) -> None:
        """Follow one workflow move; raises IllegalTransitionError when strict."""
        self.state = self._check(workflow_machine(), "workflow", "workflow", self.state, moved)
        self.reason = moved.reason

    def move_task(self, moved: TaskStateChanged, at: datetime) -> None:
        """Follow one task move and merge what it carries; raises IllegalTransitionError."""
        task = self._task(moved)
        what = f"task {task.index} ({task.name})"
        self._check(task_machine(task.kind), what, "task", task.state, moved)
        if moved.trigger in INTENT_TRIGGERS:
            task.intents += 1
            task.intent_at = at
        task.started_at = task.started_at or at
        if task.state != moved.dest:
            task.entered_at = at
        moved.merge_into(task)

    def follow_raw(self, type_name: str, data: Mapping[str, Any]) -> None:
        """Collect mode: follow an event that does not decode to where its data says it went.

        Keeps one bad payload from turning every later move of the same machine into a finding.
        """
        dest = data.get("dest")
        if type_name == WorkflowStateChanged.type_name and dest in set(WorkflowState):
            self.state = WorkflowState(dest)
        elif type_name == TaskStateChanged.type_name and dest in set(TaskState):
            index, kind = data.get("task_index"), data.get("kind")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                return
            task = self._slot(index)
            if task.started_at is None and not task.listed:
                if kind not in set(TaskKind):
                    return
                task.kind, task.name = TaskKind(kind), str(data.get("task_name"))
            task.state = TaskState(dest)

    def _task(self, moved: TaskStateChanged) -> TaskRecord:
        index = moved.task_index
        if self.spec_tasks is not None and index >= self.spec_tasks:
            self._problem(f"task_index {index} is beyond the spec's {self.spec_tasks} tasks")
        task = self._slot(index)
        if task.started_at is None and not task.listed:
            # No kind from the spec: the task's first event names it.
            task.kind, task.name = moved.kind, moved.task_name
            return task
        if task.listed and moved.kind != task.kind:
            self._problem(f"task {index} is a {str(task.kind)!r} task in the spec, this event"
                          f" says {str(moved.kind)!r}")
        elif not task.name:
            task.name = moved.task_name  # the spec gave no name: the first event does
        elif moved.task_name != task.name or moved.kind != task.kind:
            where = "in the spec" if task.listed else "before"
            self._problem(f"task {index} was {task.kind} {task.name!r} {where}, this event says"
                          f" {moved.kind} {moved.task_name!r}")
        return task

    def _slot(self, index: int) -> TaskRecord:
        # Only collect mode gets here with an index past the list (strict raised beyond it).
        while len(self.tasks) <= index:
            self.tasks.append(TaskRecord(len(self.tasks), "", TaskKind.TRADE, listed=False))
        return self.tasks[index]

    def _check(
        self,
        machine: StateMachine[Any],
        what: str,
        noun: str,
        current: str,
        moved: WorkflowStateChanged | TaskStateChanged,
    ) -> Any:
        """Check one stored move against the state so far and the table; return its dest."""
        stored = f"{str(moved.source)!r} --{moved.trigger}--> {str(moved.dest)!r}"
        if moved.source != current:
            self._problem(f"{what}: {stored} but the {noun} is in {str(current)!r}")
        try:
            expected = machine.next_state(moved.source, moved.trigger)
        except IllegalTransitionError as e:
            self._problem(f"{what}: {stored} is not a move of the table ({e})")
        else:
            if expected != moved.dest:
                self._problem(f"{what}: stored {stored} but the table says {str(expected)!r}")
        return moved.dest

    def _problem(self, message: str) -> None:
        if self.report is None:
            raise IllegalTransitionError(f"{self.stream_id} v{self.version + 1}: {message}")
        self.report(message)


@dataclass(kw_only=True)
class Workflow(StreamFold):
    """A workflow folded from its stream; `version` is the expected version of the next append."""

    workflow_id: str
    spec: WorkflowSpec
    spec_name: str
    params: dict[str, Any]
    command_id: str
    created_at: datetime | None = None
    # The params typed and checked against the spec, kept by the engine for as long as it holds
    # this fold in memory: spec and params never change after creation, the check is not free.
    resolved_params: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    # Moves the engine has applied here but not stored yet, with their metadata: facts learned
    # after an exchange call, which ride in the transaction of the next intent or of the hand
    # back (rebalancer/engine.py). `version` counts them; the store is at version - len(held).
    held: list[tuple[WorkflowStateChanged | TaskStateChanged, dict[str, str]]] = field(
        default_factory=list, repr=False, compare=False)

    @property
    def current(self) -> TaskRecord | None:
        """The first task that is not done, None when all are."""
        return next((t for t in self.tasks if t.state != TaskState.DONE), None)

    def results(self) -> dict[str, dict[str, Any]]:
        """What `{$.task.path}` references see: every task's recorded results by name."""
        return {t.name: t.results() for t in self.tasks}

    def apply(self, event: RecordedEvent) -> None:
        """Move by one stored event; raises IllegalTransitionError on anything the tables refuse."""
        if event.version != self.version + 1:
            raise IllegalTransitionError(
                f"{self.stream_id}: version {event.version} follows {self.version}"
            )
        decoded = event.decode()
        if not isinstance(decoded, WorkflowStateChanged | TaskStateChanged):
            raise IllegalTransitionError(
                f"{self.stream_id} v{event.version}: unexpected {event.type}"
            )
        self.move(decoded, event.recorded_at)

    def move(self, moved: WorkflowStateChanged | TaskStateChanged, at: datetime) -> None:
        """Move by one event at `at`, stored or about to be; raises IllegalTransitionError."""
        if isinstance(moved, WorkflowStateChanged):
            self.move_workflow(moved)
        else:
            self.move_task(moved, at)
        self.version += 1
        self.updated_at = at


def fold(events: list[RecordedEvent]) -> Workflow:
    """Rebuild a workflow from its whole stream (the first event must be WorkflowCreated)."""
    if not events or events[0].type != WorkflowCreated.type_name:
        raise IllegalTransitionError("a workflow stream starts with WorkflowCreated")
    first = events[0]
    created = first.decode()
    assert isinstance(created, WorkflowCreated)
    # The snapshot was validated when the workflow started; only its shape is checked here.
    spec = WorkflowSpec.model_validate(created.spec)
    workflow = Workflow(
        workflow_id=first.stream_id.removeprefix("workflow-"),
        stream_id=first.stream_id,
        spec=spec,
        spec_name=created.spec_name,
        params=created.params,
        command_id=created.command_id,
        tasks=[TaskRecord(i, t.name, TaskKind(t.kind)) for i, t in enumerate(spec.tasks)],
        spec_tasks=len(spec.tasks),
        version=1,
        created_at=first.recorded_at,
        updated_at=first.recorded_at,
    )
    for event in events[1:]:
        workflow.apply(event)
    return workflow


def client_id(workflow_id: str, task_index: int, intent: int) -> str:
    """Deterministic and unique per intent; fits Binance's 36-character id alphabet."""
    digest = hashlib.sha256(f"{workflow_id}:{task_index}:{intent}".encode()).hexdigest()
    return f"rb{digest[:30]}"


# -- decide -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoveWorkflow:
    trigger: WorkflowTrigger
    reason: str


@dataclass(frozen=True)
class StepTask:
    task: TaskRecord


Action = MoveWorkflow | StepTask | None


def decide(workflow: Workflow) -> Action:
    """The next thing to do for this workflow, or None when it needs nothing from the worker."""
    state = workflow.state
    if state == WorkflowState.CREATED:
        return MoveWorkflow(WorkflowTrigger.START, "started")
    if state == WorkflowState.NEEDS_ATTENTION:
        if not any(t.state == TaskState.NEEDS_ATTENTION for t in workflow.tasks):
            return MoveWorkflow(WorkflowTrigger.RETRY, "every task needing attention was resolved")
        return None
    if state == WorkflowState.PAUSED:
        return _while_paused(workflow)
    if state != WorkflowState.RUNNING:
        return None  # finished
    task = workflow.current
    if task is None:
        return MoveWorkflow(WorkflowTrigger.COMPLETE, "every task is done")
    if task.state == TaskState.FAILED:
        message = (task.error or {}).get("message", "failed")
        return MoveWorkflow(WorkflowTrigger.FAIL, f"task {task.name} failed: {message}")
    if task.state == TaskState.CANCELED:
        return MoveWorkflow(WorkflowTrigger.CANCEL, f"task {task.name} was canceled")
    if task.state == TaskState.NEEDS_ATTENTION:
        message = (task.error or {}).get("message", "needs attention")
        return MoveWorkflow(WorkflowTrigger.ESCALATE, f"task {task.name}: {message}")
    return StepTask(task)


# What a paused workflow's current task may still be stepped in: what was sent settles (a
# resting order fills, a withdrawal confirms, a deposit arrives), a cancel is carried out.
SETTLING = frozenset({TaskState.SUBMITTING, TaskState.REQUESTED, TaskState.OPEN,
                      TaskState.PROCESSING, TaskState.CANCELING})


def _while_paused(workflow: Workflow) -> Action:
    """A paused workflow starts nothing new (no task, no intent, no TWAP slice); it is stepped
    only while its current task has something in flight to follow, and ends `canceled` once a
    cancel asked for meanwhile is carried out."""
    task = workflow.current
    if task is None:
        return None
    if task.state == TaskState.CANCELED:
        return MoveWorkflow(WorkflowTrigger.CANCEL, f"task {task.name} was canceled")
    # What it settled went wrong: the operator hears of it now (a resolve then runs it on).
    if task.state == TaskState.FAILED:
        message = (task.error or {}).get("message", "failed")
        return MoveWorkflow(WorkflowTrigger.FAIL, f"task {task.name} failed: {message}")
    if task.state == TaskState.NEEDS_ATTENTION:
        message = (task.error or {}).get("message", "needs attention")
        return MoveWorkflow(WorkflowTrigger.ESCALATE, f"task {task.name}: {message}")
    if task.state not in SETTLING or _between_slices(task):
        return None
    return StepTask(task)


def _between_slices(task: TaskRecord) -> bool:
    """A TWAP whose last sent slice is recorded as ended: nothing of it is in flight, and the
    next slice waits for resume (`canceling` is stepped all the same: it has to end)."""
    if task.kind != TaskKind.TRADE or task.state in (TaskState.SUBMITTING, TaskState.CANCELING):
        return False
    index = (task.request_params or {}).get("slice")
    slices = ((task.refresh_result or {}).get("extra") or {}).get("slices") or []
    return any(s.get("slice") == index and s.get("status") in ("closed", "canceled", "rejected")
               for s in slices)
