"""The state vocabulary every package shares: task and workflow states, triggers, kinds, sets.

It lives beside the event catalogue because events are spelled in it and every package may import
`events`; the transition tables in `rebalancer/machines.py` are written with these members, so a
renamed state or trigger breaks the build (mypy, the tables' import), not a projection at run time.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal


class TaskState(StrEnum):
    """The states a task of any kind can be in; a kind's machine uses a subset."""

    CREATED = "created"
    SUBMITTING = "submitting"
    REQUESTED = "requested"
    OPEN = "open"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"
    NEEDS_ATTENTION = "needs_attention"
    # A trade an operator canceled while its order may rest on the exchange: stored before the
    # exchange is asked to cancel it, so a restarted worker carries the cancel on.
    CANCELING = "canceling"


class WorkflowState(StrEnum):
    """The states of a workflow."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    NEEDS_ATTENTION = "needs_attention"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"


class TaskKind(StrEnum):
    """The kinds of task; each has its own table."""

    TRADE = "trade"
    WITHDRAW = "withdraw"
    DEPOSIT = "deposit"
    TRANSFER = "transfer"
    MASTER_TRANSFER = "master_transfer"


class TaskTrigger(StrEnum):
    """Every trigger of the task tables; a kind's table uses a subset."""

    SUBMIT = "submit"  # the intent (client id) is stored before the exchange call
    ACCEPT = "accept"
    RESET = "reset"  # the request never landed: a new intent may follow
    OPEN = "open"
    FILL = "fill"
    NEXT_SLICE = "next_slice"
    PROGRESS = "progress"
    UPDATE = "update"
    WATCH = "watch"
    COMPLETE = "complete"
    FAIL = "fail"
    CANCEL = "cancel"
    ESCALATE = "escalate"
    RESOLVE_RESEND = "resolve_resend"
    RESOLVE_DONE = "resolve_done"
    RESOLVE_FAILED = "resolve_failed"
    # An operator's `retry --from`: a failed task goes back to be sent, a done one (whose facts
    # were never recorded) back to needs_attention to be resolved with them.
    REOPEN = "reopen"
    # An operator's `cancel` of a trade in flight: the worker cancels its order, settles the
    # fills and ends it `canceled`.
    REQUEST_CANCEL = "request_cancel"


class WorkflowTrigger(StrEnum):
    """Every trigger of the workflow table."""

    START = "start"
    COMPLETE = "complete"
    FAIL = "fail"
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    ESCALATE = "escalate"
    RETRY = "retry"
    REOPEN = "reopen"  # a failed workflow re-opened at a named task (`retry --from`)


TASK_TERMINAL: Final = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELED})
WORKFLOW_TERMINAL: Final = frozenset(
    {WorkflowState.DONE, WorkflowState.FAILED, WorkflowState.CANCELED}
)
# Workflows the worker still drives or an operator still has to act on.
WORKFLOW_ACTIVE: Final = frozenset(WorkflowState) - WORKFLOW_TERMINAL

# The workflows the worker steps: one needing attention so that it runs again once every task
# needing attention was resolved; a paused one while what it sent settles (it starts nothing).
WORKFLOW_DRIVEN: Final = WORKFLOW_ACTIVE

# Triggers that store a new intent, and so number the next client id.
INTENT_TRIGGERS: Final = frozenset({TaskTrigger.SUBMIT, TaskTrigger.NEXT_SLICE})
# Triggers after which the task's last error no longer holds: it goes back to be sent afresh.
ERROR_CLEARING_TRIGGERS: Final = frozenset(
    {TaskTrigger.RESET, TaskTrigger.RESOLVE_RESEND, TaskTrigger.REOPEN})
# The one way out of a terminal state: an operator re-opening a failed workflow.
REOPENING_TRIGGERS: Final = frozenset({TaskTrigger.REOPEN, WorkflowTrigger.REOPEN})
# What an operator may say of a task in needs_attention, as the trigger it becomes.
Outcome = Literal["resend", "done", "failed"]
RESOLUTIONS: Final[dict[Outcome, TaskTrigger]] = {
    "resend": TaskTrigger.RESOLVE_RESEND,
    "done": TaskTrigger.RESOLVE_DONE,
    "failed": TaskTrigger.RESOLVE_FAILED,
}

__all__ = [
    "ERROR_CLEARING_TRIGGERS",
    "INTENT_TRIGGERS",
    "REOPENING_TRIGGERS",
    "RESOLUTIONS",
    "TASK_TERMINAL",
    "WORKFLOW_ACTIVE",
    "WORKFLOW_DRIVEN",
    "WORKFLOW_TERMINAL",
    "Outcome",
    "TaskKind",
    "TaskState",
    "TaskTrigger",
    "WorkflowState",
    "WorkflowTrigger",
]
