"""Every task and workflow transition table, as data, and the builder that makes machines."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final, TypedDict

import transitions

from rebalancer.errors import IllegalTransitionError


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


TASK_TERMINAL: Final = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELED})
WORKFLOW_TERMINAL: Final = frozenset(
    {WorkflowState.DONE, WorkflowState.FAILED, WorkflowState.CANCELED}
)


class TransitionRow(TypedDict):
    """One row of a table, in the `transitions` library's dict format."""

    trigger: str
    source: str | list[str]
    dest: str


# --- task tables -------------------------------------------------------------------------------
# Built by plain list concatenation: rows shared by several kinds, then the kind's own rows. A
# trigger may appear in several rows with different sources; (source, trigger) has one dest.
# Leaving early is allowed from every state before the outcome is known: `fail` is a final
# rejection, `cancel` a user's decision, `escalate` means the outcome is unknown or a deadline
# passed, and parks the task in needs_attention until an operator resolves it.

# What an operator may do with a task in needs_attention.
_RESOLUTION: Final[list[TransitionRow]] = [
    {"trigger": "cancel", "source": "needs_attention", "dest": "canceled"},
    {"trigger": "resolve_resend", "source": "needs_attention", "dest": "created"},  # send again
    {"trigger": "resolve_done", "source": "needs_attention", "dest": "done"},  # it landed
    {"trigger": "resolve_failed", "source": "needs_attention", "dest": "failed"},  # it did not
]

# Kinds that send one request to an exchange: trade, withdraw, transfer, master_transfer.
_SUBMITTING: Final[list[TransitionRow]] = [
    {"trigger": "submit", "source": "created", "dest": "submitting"},  # stored before the call
    {"trigger": "accept", "source": "submitting", "dest": "requested"},
    {"trigger": "reset", "source": "submitting", "dest": "created"},  # never landed: new client id
    {"trigger": "complete", "source": "requested", "dest": "done"},
    {"trigger": "complete", "source": "submitting", "dest": "done"},  # found done on reconcile
    {"trigger": "fail", "source": ["created", "submitting", "requested"], "dest": "failed"},
    {"trigger": "cancel", "source": ["created", "submitting", "requested"], "dest": "canceled"},
    {
        "trigger": "escalate",
        "source": ["created", "submitting", "requested"],
        "dest": "needs_attention",
    },
    *_RESOLUTION,
]

# The ways out of `processing`, for every kind that has it.
_PROCESSING_EXITS: Final[list[TransitionRow]] = [
    {"trigger": "complete", "source": "processing", "dest": "done"},
    {"trigger": "fail", "source": "processing", "dest": "failed"},
    {"trigger": "cancel", "source": "processing", "dest": "canceled"},
    {"trigger": "escalate", "source": "processing", "dest": "needs_attention"},
]

TRADE: Final[list[TransitionRow]] = [
    *_SUBMITTING,
    {"trigger": "open", "source": "requested", "dest": "open"},
    {"trigger": "open", "source": "submitting", "dest": "open"},  # found open on reconcile
    {"trigger": "fill", "source": "open", "dest": "open"},  # partial fill: records new amounts
    # TWAP: the next slice's intent (new client id) once the previous slice has ended; from
    # submitting when that slice was refused or never landed, so one bad slice drops no others.
    {"trigger": "next_slice", "source": ["submitting", "requested", "open"], "dest": "submitting"},
    {"trigger": "complete", "source": "open", "dest": "done"},
    {"trigger": "fail", "source": "open", "dest": "failed"},
    {"trigger": "cancel", "source": "open", "dest": "canceled"},
    {"trigger": "escalate", "source": "open", "dest": "needs_attention"},
]

WITHDRAW: Final[list[TransitionRow]] = [
    *_SUBMITTING,
    {"trigger": "progress", "source": "requested", "dest": "processing"},
    {"trigger": "progress", "source": "submitting", "dest": "processing"},  # found on reconcile
    {"trigger": "update", "source": "processing", "dest": "processing"},  # txid/confirmations seen
    *_PROCESSING_EXITS,
]

TRANSFER: Final[list[TransitionRow]] = [
    *_SUBMITTING,
    {"trigger": "progress", "source": "requested", "dest": "processing"},
    *_PROCESSING_EXITS,
]

# Same moves as a spot<->futures transfer today; its own table so the two can diverge.
MASTER_TRANSFER: Final[list[TransitionRow]] = [*TRANSFER]

# A deposit sends nothing, so it has no submitting/submit/accept/reset: it only watches.
DEPOSIT: Final[list[TransitionRow]] = [
    {"trigger": "watch", "source": "created", "dest": "requested"},  # start awaiting the arrival
    {"trigger": "progress", "source": "requested", "dest": "processing"},  # seen, confirming
    {"trigger": "update", "source": "processing", "dest": "processing"},  # txid/confirmations seen
    {"trigger": "complete", "source": "requested", "dest": "done"},  # arrived already confirmed
    {"trigger": "fail", "source": ["created", "requested"], "dest": "failed"},
    {"trigger": "cancel", "source": ["created", "requested"], "dest": "canceled"},
    {"trigger": "escalate", "source": ["created", "requested"], "dest": "needs_attention"},
    *_PROCESSING_EXITS,
    *_RESOLUTION,
]

TASK_TABLES: Final[Mapping[TaskKind, list[TransitionRow]]] = MappingProxyType(
    {
        TaskKind.TRADE: TRADE,
        TaskKind.WITHDRAW: WITHDRAW,
        TaskKind.DEPOSIT: DEPOSIT,
        TaskKind.TRANSFER: TRANSFER,
        TaskKind.MASTER_TRANSFER: MASTER_TRANSFER,
    }
)

# --- workflow table ----------------------------------------------------------------------------

WORKFLOW: Final[list[TransitionRow]] = [
    {"trigger": "start", "source": "created", "dest": "running"},
    {"trigger": "complete", "source": "running", "dest": "done"},
    {"trigger": "fail", "source": ["created", "running", "needs_attention"], "dest": "failed"},
    {
        "trigger": "cancel",
        "source": ["created", "running", "paused", "needs_attention"],
        "dest": "canceled",
    },
    {"trigger": "pause", "source": "running", "dest": "paused"},
    {"trigger": "resume", "source": "paused", "dest": "running"},
    {"trigger": "escalate", "source": "running", "dest": "needs_attention"},  # a task is stuck
    {"trigger": "retry", "source": "needs_attention", "dest": "running"},  # operator resolved it
]


# --- the builder -------------------------------------------------------------------------------


def _sources(row: TransitionRow) -> list[str]:
    source = row["source"]
    return [source] if isinstance(source, str) else list(source)


@dataclass(frozen=True, slots=True, eq=False)
class StateMachine:
    """One table turned into a `transitions.Machine`, plus a flat (source, trigger) -> dest map.

    The Machine is the source of truth; `moves` is derived from it once, so that folding thousands
    of streams costs a dict lookup per event. Build it with `from_table`; moves the table does not
    allow raise `IllegalTransitionError`.
    """

    name: str
    states: frozenset[str]
    initial: str
    terminal: frozenset[str]
    triggers: frozenset[str]
    machine: transitions.Machine
    moves: Mapping[tuple[str, str], str]

    @classmethod
    def from_table(
        cls,
        name: str,
        table: Sequence[TransitionRow],
        *,
        vocabulary: type[StrEnum],
        initial: str,
        terminal: Collection[str],
    ) -> StateMachine:
        """Build a machine whose states are those `table` names, in `vocabulary` order.

        Raises ValueError when the table names a state outside `vocabulary`, leaves a terminal
        state, does not name `initial`, or maps one (source, trigger) to two different dests.
        """
        named = {state for row in table for state in (*_sources(row), row["dest"])}
        if enums := sorted(repr(state) for state in named if type(state) is not str):
            # transitions names an Enum state by its member name, not its value
            raise ValueError(f"{name}: table states must be plain strings, not {enums}")
        initial = str(initial)
        known = {member.value for member in vocabulary}
        if unknown := named - known:
            raise ValueError(f"{name}: table names unknown states {sorted(unknown)}")
        if initial not in named:
            raise ValueError(f"{name}: initial state {initial!r} is not in the table")
        ordered = [member.value for member in vocabulary if member.value in named]
        machine = transitions.Machine(
            model=None,
            states=ordered,
            transitions=table,
            initial=initial,
            auto_transitions=False,
            ignore_invalid_triggers=False,
            send_event=False,
            name=name,
        )
        moves: dict[tuple[str, str], str] = {}
        for trigger, event in machine.events.items():
            # .items(), not [source]: event.transitions is a defaultdict and a lookup would add keys
            for source, found in event.transitions.items():
                for transition in found:
                    dest = transition.dest
                    if dest is None:
                        raise ValueError(f"{name}: {trigger!r} from {source!r} has no dest")
                    seen = moves.setdefault((source, trigger), dest)
                    if seen != dest:
                        both = f"{seen!r} and {dest!r}"
                        raise ValueError(f"{name}: {trigger!r} from {source!r} goes to both {both}")
        final = frozenset(str(state) for state in terminal) & frozenset(ordered)
        if leaving := sorted(f"{s} --{t}-->" for (s, t) in moves if s in final):
            raise ValueError(f"{name}: terminal states have moves: {leaving}")
        return cls(
            name=name,
            states=frozenset(ordered),
            initial=initial,
            terminal=final,
            triggers=frozenset(machine.events),
            machine=machine,
            moves=MappingProxyType(moves),
        )

    def may(self, source: str, trigger: str) -> bool:
        """Whether the table has `trigger` from `source`."""
        return (source, trigger) in self.moves

    def allowed(self, source: str) -> tuple[str, ...]:
        """The triggers allowed from `source`, sorted; empty for a terminal or unknown state."""
        return tuple(sorted(t for (s, t) in self.moves if s == source))

    def next_state(self, source: str, trigger: str) -> str:
        """The dest of `trigger` from `source`; raises IllegalTransitionError if not allowed."""
        try:
            return self.moves[(source, trigger)]
        except KeyError:
            raise IllegalTransitionError(self._refusal(source, trigger)) from None

    def fold(self, moves: Iterable[tuple[str, str, str]], start: str | None = None) -> str:
        """Replay stored (source, trigger, dest) moves from `start`; return the state they end in.

        Raises IllegalTransitionError, naming the index of the bad move, when a move does not start
        where the previous one ended, is not in the table, or stored a dest the table does not give.
        """
        state = self.initial if start is None else start
        table = self.moves
        for index, (source, trigger, dest) in enumerate(moves):
            if source != state:
                raise IllegalTransitionError(
                    f"{self.name}: move #{index} ({source!r} --{trigger}--> {dest!r}) starts at"
                    f" {source!r} but the machine is in {state!r}"
                )
            expected = table.get((source, trigger))
            if expected is None:
                raise IllegalTransitionError(f"move #{index}: {self._refusal(source, trigger)}")
            if expected != dest:
                raise IllegalTransitionError(
                    f"{self.name}: move #{index} stored {source!r} --{trigger}--> {dest!r} but the"
                    f" table says {expected!r}"
                )
            state = dest
        return state

    def attach(self, model: object, state: str | None = None) -> None:
        """Register `model` at `state` (default initial): it gains `may_<trigger>()`, `trigger()`.

        The Machine is shared and keeps a reference to the model until `detach`. Raises ValueError
        for a state outside this machine or a model that is already attached.
        """
        at = self.initial if state is None else state
        if at not in self.states:
            raise ValueError(f"{self.name}: {at!r} is not a state of this machine")
        if any(attached is model for attached in self.machine.models):
            # transitions would silently keep the old state
            raise ValueError(f"{self.name}: model is already attached")
        self.machine.add_model(model, initial=at)

    def detach(self, model: object) -> None:
        """Unregister `model` from the Machine; raises ValueError if it is not attached."""
        self.machine.remove_model(model)

    def _refusal(self, source: str, trigger: str) -> str:
        if source not in self.states:
            return f"{self.name}: {source!r} is not a state of this machine (trigger {trigger!r})"
        allowed = ", ".join(self.allowed(source)) or "none (terminal)"
        return f"{self.name}: cannot {trigger!r} from {source!r}; allowed from there: {allowed}"


@functools.cache
def task_machine(kind: TaskKind) -> StateMachine:
    """The machine for one task kind, built once; raises ValueError for an unknown kind."""
    if type(kind) is not TaskKind:
        # the cache keys a plain "withdraw" apart from TaskKind.WITHDRAW: share one machine
        return task_machine(TaskKind(kind))
    return StateMachine.from_table(
        kind.value,
        TASK_TABLES[kind],
        vocabulary=TaskState,
        initial=TaskState.CREATED,
        terminal=TASK_TERMINAL,
    )


@functools.cache
def workflow_machine() -> StateMachine:
    """The workflow machine, built once."""
    return StateMachine.from_table(
        "workflow",
        WORKFLOW,
        vocabulary=WorkflowState,
        initial=WorkflowState.CREATED,
        terminal=WORKFLOW_TERMINAL,
    )


__all__ = [
    "DEPOSIT",
    "MASTER_TRANSFER",
    "TASK_TABLES",
    "TASK_TERMINAL",
    "TRADE",
    "TRANSFER",
    "WITHDRAW",
    "WORKFLOW",
    "WORKFLOW_TERMINAL",
    "StateMachine",
    "TaskKind",
    "TaskState",
    "TransitionRow",
    "WorkflowState",
    "task_machine",
    "workflow_machine",
]
