"""The workflow aggregate: fold(events) -> state via the machines; decide(state) -> next action."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from events.catalogue import TaskStateChanged, WorkflowCreated, WorkflowStateChanged
from events.store import RecordedEvent
from rebalancer.errors import IllegalTransitionError
from rebalancer.machines import TaskKind, TaskState, WorkflowState, task_machine, workflow_machine
from rebalancer.specs.models import WorkflowSpec

RESULT_KEYS = ("request_params", "request_result", "refresh_result")


@dataclass
class TaskRecord:
    """One task as its events tell it."""

    index: int
    name: str
    kind: TaskKind
    state: str = TaskState.CREATED
    intents: int = 0  # intents stored so far (submit/next_slice): numbers the client ids
    request_params: dict[str, Any] | None = None
    request_result: dict[str, Any] | None = None
    refresh_result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    started_at: datetime | None = None  # its first move: deadlines count from here
    entered_at: datetime | None = None  # when it entered `state`
    intent_at: datetime | None = None  # when the current intent was stored

    @property
    def client_id(self) -> str | None:
        return None if self.request_params is None else self.request_params.get("client_id")

    @property
    def terminal(self) -> bool:
        return self.state in task_machine(self.kind).terminal

    def results(self) -> dict[str, Any]:
        return {key: getattr(self, key) or {} for key in RESULT_KEYS}


@dataclass
class Workflow:
    """A workflow folded from its stream; `version` is the expected version of the next append."""

    workflow_id: str
    stream_id: str
    spec: WorkflowSpec
    spec_name: str
    params: dict[str, Any]
    command_id: str
    state: str = WorkflowState.CREATED
    reason: str | None = None
    tasks: list[TaskRecord] = field(default_factory=list)
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

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
        if isinstance(decoded, WorkflowStateChanged):
            _check(workflow_machine().next_state(self.state, decoded.trigger), decoded, self.state)
            self.state = decoded.dest
            self.reason = decoded.reason
        elif isinstance(decoded, TaskStateChanged):
            self._apply_task(decoded, event.recorded_at)
        else:
            raise IllegalTransitionError(
                f"{self.stream_id} v{event.version}: unexpected {event.type}"
            )
        self.version = event.version
        self.updated_at = event.recorded_at

    def _apply_task(self, event: TaskStateChanged, at: datetime) -> None:
        if event.task_index >= len(self.tasks):
            raise IllegalTransitionError(f"{self.stream_id}: no task #{event.task_index}")
        task = self.tasks[event.task_index]
        if event.kind != task.kind or event.task_name != task.name:
            raise IllegalTransitionError(
                f"{self.stream_id}: task #{task.index} is {task.kind} {task.name}, "
                f"not {event.kind} {event.task_name}"
            )
        _check(task_machine(task.kind).next_state(task.state, event.trigger), event, task.state)
        if event.trigger in ("submit", "next_slice"):
            task.intents += 1
            task.intent_at = at
        if event.request_params is not None:
            task.request_params = event.request_params
        if event.request_result is not None:
            task.request_result = event.request_result
        if event.refresh_result is not None:
            task.refresh_result = event.refresh_result
        if event.error is not None:
            task.error = event.error
        task.started_at = task.started_at or at
        if task.state != event.dest:
            task.entered_at = at
        task.state = event.dest


def _check(dest: str, event: WorkflowStateChanged | TaskStateChanged, state: str) -> None:
    if event.source != state or event.dest != dest:
        raise IllegalTransitionError(
            f"stored {event.source} --{event.trigger}--> {event.dest}, but from {state} the "
            f"table gives {dest}"
        )


def fold(events: list[RecordedEvent]) -> Workflow:
    """Rebuild a workflow from its whole stream (the first event must be WorkflowCreated)."""
    if not events or events[0].type != "WorkflowCreated":
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
    trigger: str
    reason: str


@dataclass(frozen=True)
class StepTask:
    task: TaskRecord


Action = MoveWorkflow | StepTask | None


def decide(workflow: Workflow) -> Action:
    """The next thing to do for this workflow, or None when it needs nothing from the worker."""
    state = workflow.state
    if state == WorkflowState.CREATED:
        return MoveWorkflow("start", "started")
    if state == WorkflowState.NEEDS_ATTENTION:
        if not any(t.state == TaskState.NEEDS_ATTENTION for t in workflow.tasks):
            return MoveWorkflow("retry", "every task needing attention was resolved")
        return None
    if state != WorkflowState.RUNNING:
        return None  # paused or finished
    task = workflow.current
    if task is None:
        return MoveWorkflow("complete", "every task is done")
    if task.state == TaskState.FAILED:
        message = (task.error or {}).get("message", "failed")
        return MoveWorkflow("fail", f"task {task.name} failed: {message}")
    if task.state == TaskState.CANCELED:
        return MoveWorkflow("cancel", f"task {task.name} was canceled")
    if task.state == TaskState.NEEDS_ATTENTION:
        message = (task.error or {}).get("message", "needs attention")
        return MoveWorkflow("escalate", f"task {task.name}: {message}")
    return StepTask(task)
