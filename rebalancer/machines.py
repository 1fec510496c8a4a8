"""Every task and workflow transition table, as data, and the builder that makes machines."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Generic, TypedDict, TypeVar

import transitions

from events.vocabulary import (
    REOPENING_TRIGGERS,
    TASK_TERMINAL,
    WORKFLOW_TERMINAL,
    TaskKind,
    TaskState,
    TaskTrigger,
    WorkflowState,
    WorkflowTrigger,
)
from rebalancer.errors import IllegalTransitionError

# Short names keep the tables readable as tables.
S, T = TaskState, TaskTrigger
W, WT = WorkflowState, WorkflowTrigger


class TransitionRow(TypedDict):
    """One row of a table, in the `transitions` library's dict format (members of one StrEnum)."""

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
    {"trigger": T.CANCEL, "source": S.NEEDS_ATTENTION, "dest": S.CANCELED},
    {"trigger": T.RESOLVE_RESEND, "source": S.NEEDS_ATTENTION, "dest": S.CREATED},  # send again
    {"trigger": T.RESOLVE_DONE, "source": S.NEEDS_ATTENTION, "dest": S.DONE},  # it landed
    {"trigger": T.RESOLVE_FAILED, "source": S.NEEDS_ATTENTION, "dest": S.FAILED},  # it did not
]

# `retry --from` (an operator re-opening a failed workflow at a task): the only moves out of a
# terminal state. A failed task is sent again; a done one goes back to needs_attention, to be
# resolved with the facts it never recorded. commands.py refuses it once a later task moved on.
_REOPENING: Final[list[TransitionRow]] = [
    {"trigger": T.REOPEN, "source": S.FAILED, "dest": S.CREATED},
    {"trigger": T.REOPEN, "source": S.DONE, "dest": S.NEEDS_ATTENTION},
]

# Kinds that send one request to an exchange: trade, withdraw, transfer, master_transfer.
_SUBMITTING: Final[list[TransitionRow]] = [
    {"trigger": T.SUBMIT, "source": S.CREATED, "dest": S.SUBMITTING},  # stored before the call
    {"trigger": T.ACCEPT, "source": S.SUBMITTING, "dest": S.REQUESTED},
    {"trigger": T.RESET, "source": S.SUBMITTING, "dest": S.CREATED},  # never landed: new client id
    {"trigger": T.COMPLETE, "source": S.REQUESTED, "dest": S.DONE},
    {"trigger": T.COMPLETE, "source": S.SUBMITTING, "dest": S.DONE},  # found done on reconcile
    {"trigger": T.FAIL, "source": [S.CREATED, S.SUBMITTING, S.REQUESTED], "dest": S.FAILED},
    {"trigger": T.CANCEL, "source": [S.CREATED, S.SUBMITTING, S.REQUESTED], "dest": S.CANCELED},
    {
        "trigger": T.ESCALATE,
        "source": [S.CREATED, S.SUBMITTING, S.REQUESTED],
        "dest": S.NEEDS_ATTENTION,
    },
    *_RESOLUTION,
    *_REOPENING,
]

# The ways out of `processing`, for every kind that has it.
_PROCESSING_EXITS: Final[list[TransitionRow]] = [
    {"trigger": T.COMPLETE, "source": S.PROCESSING, "dest": S.DONE},
    {"trigger": T.FAIL, "source": S.PROCESSING, "dest": S.FAILED},
    {"trigger": T.CANCEL, "source": S.PROCESSING, "dest": S.CANCELED},
    {"trigger": T.ESCALATE, "source": S.PROCESSING, "dest": S.NEEDS_ATTENTION},
]

# An operator's cancel of a trade that may have an order on the exchange (commands.py): stored
# before any exchange call; the worker then cancels the resting order, reads what filled and
# ends it `canceled` (a TWAP between slices sends no further slice). From `created` only once a
# slice was sent (a TWAP whose last slice was refused): its fills are settled the same way.
_CANCELING: Final[list[TransitionRow]] = [
    {
        "trigger": T.REQUEST_CANCEL,
        "source": [S.CREATED, S.SUBMITTING, S.REQUESTED, S.OPEN],
        "dest": S.CANCELING,
    },
    {"trigger": T.CANCEL, "source": S.CANCELING, "dest": S.CANCELED},
    # the exchange cannot say what became of the order, or the cancel passed its deadline
    {"trigger": T.ESCALATE, "source": S.CANCELING, "dest": S.NEEDS_ATTENTION},
]

TRADE: Final[list[TransitionRow]] = [
    *_SUBMITTING,
    {"trigger": T.OPEN, "source": S.REQUESTED, "dest": S.OPEN},
    {"trigger": T.OPEN, "source": S.SUBMITTING, "dest": S.OPEN},  # found open on reconcile
    {"trigger": T.FILL, "source": S.OPEN, "dest": S.OPEN},  # partial fill: records new amounts
    # TWAP: the next slice's intent (new client id) once the previous slice has ended; from
    # submitting when that slice was refused or never landed, so one bad slice drops no others.
    {"trigger": T.NEXT_SLICE, "source": [S.SUBMITTING, S.REQUESTED, S.OPEN], "dest": S.SUBMITTING},
    {"trigger": T.COMPLETE, "source": S.OPEN, "dest": S.DONE},
    {"trigger": T.FAIL, "source": S.OPEN, "dest": S.FAILED},
    {"trigger": T.CANCEL, "source": S.OPEN, "dest": S.CANCELED},
    {"trigger": T.ESCALATE, "source": S.OPEN, "dest": S.NEEDS_ATTENTION},
    *_CANCELING,
]

WITHDRAW: Final[list[TransitionRow]] = [
    *_SUBMITTING,
    {"trigger": T.PROGRESS, "source": S.REQUESTED, "dest": S.PROCESSING},
    {"trigger": T.PROGRESS, "source": S.SUBMITTING, "dest": S.PROCESSING},  # found on reconcile
    {"trigger": T.UPDATE, "source": S.PROCESSING, "dest": S.PROCESSING},  # txid/confirmations seen
    *_PROCESSING_EXITS,
]

TRANSFER: Final[list[TransitionRow]] = [
    *_SUBMITTING,
    {"trigger": T.PROGRESS, "source": S.REQUESTED, "dest": S.PROCESSING},
    *_PROCESSING_EXITS,
]

# Same moves as a spot<->futures transfer today; its own table so the two can diverge.
MASTER_TRANSFER: Final[list[TransitionRow]] = [*TRANSFER]

# A deposit sends nothing, so it has no submitting/submit/accept/reset: it only watches.
DEPOSIT: Final[list[TransitionRow]] = [
    {"trigger": T.WATCH, "source": S.CREATED, "dest": S.REQUESTED},  # start awaiting the arrival
    {"trigger": T.PROGRESS, "source": S.REQUESTED, "dest": S.PROCESSING},  # seen, confirming
    {"trigger": T.UPDATE, "source": S.PROCESSING, "dest": S.PROCESSING},  # txid/confirmations seen
    {"trigger": T.COMPLETE, "source": S.REQUESTED, "dest": S.DONE},  # arrived already confirmed
    {"trigger": T.FAIL, "source": [S.CREATED, S.REQUESTED], "dest": S.FAILED},
    {"trigger": T.CANCEL, "source": [S.CREATED, S.REQUESTED], "dest": S.CANCELED},
    {"trigger": T.ESCALATE, "source": [S.CREATED, S.REQUESTED], "dest": S.NEEDS_ATTENTION},
    *_PROCESSING_EXITS,
    *_RESOLUTION,
    *_REOPENING,
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
    {"trigger": WT.START, "source": W.CREATED, "dest": W.RUNNING},
    {"trigger": WT.COMPLETE, "source": W.RUNNING, "dest": W.DONE},
    # From paused too: what it still settles may fail or get stuck, and that must reach an
    # operator now, not at the next resume.
    {"trigger": WT.FAIL, "source": [W.CREATED, W.RUNNING, W.PAUSED, W.NEEDS_ATTENTION],
     "dest": W.FAILED},
    {
        "trigger": WT.CANCEL,
        "source": [W.CREATED, W.RUNNING, W.PAUSED, W.NEEDS_ATTENTION],
        "dest": W.CANCELED,
    },
    {"trigger": WT.PAUSE, "source": W.RUNNING, "dest": W.PAUSED},
    {"trigger": WT.RESUME, "source": W.PAUSED, "dest": W.RUNNING},
    {"trigger": WT.ESCALATE, "source": [W.RUNNING, W.PAUSED], "dest": W.NEEDS_ATTENTION},
    {"trigger": WT.RETRY, "source": W.NEEDS_ATTENTION, "dest": W.RUNNING},  # operator resolved it
    {"trigger": WT.REOPEN, "source": W.FAILED, "dest": W.RUNNING},  # retry --from: money in transit
]


# --- the builder -------------------------------------------------------------------------------


def _sources(row: TransitionRow) -> list[str]:
    source = row["source"]
    return [source] if isinstance(source, str) else list(source)


def _q(value: str) -> str:
    # A vocabulary member's repr is <TaskState.DONE: 'done'>; messages quote the stored value.
    return repr(str(value))


def _plain(row: TransitionRow) -> TransitionRow:
    # transitions names an Enum state by its member *name* (CREATED), not its value: hand it the
    # values as plain strings, so the states it reports are the ones events store.
    source = row["source"]
    return {
        "trigger": str(row["trigger"]),
        "source": str(source) if isinstance(source, str) else [str(s) for s in source],
        "dest": str(row["dest"]),
    }


State = TypeVar("State", bound=StrEnum)


@dataclass(frozen=True, slots=True, eq=False)
class StateMachine(Generic[State]):
    """One table turned into a `transitions.Machine`, plus a flat (source, trigger) -> dest map.

    The Machine is the source of truth; `moves` is derived from it once, so that folding thousands
    of streams costs a dict lookup per event. Build it with `from_table`; moves the table does not
    allow raise `IllegalTransitionError`.
    """

    name: str
    states: frozenset[State]
    initial: State
    terminal: frozenset[State]
    triggers: frozenset[str]
    machine: transitions.Machine
    moves: Mapping[tuple[str, str], State]  # (source, trigger) -> dest, a vocabulary member

    @classmethod
    def from_table(
        cls,
        name: str,
        table: Sequence[TransitionRow],
        *,
        vocabulary: type[State],
        trigger_vocabulary: type[StrEnum],
        initial: str,
        terminal: Collection[str],
    ) -> StateMachine[State]:
        """Build a machine whose states are those `table` names, in `vocabulary` order.

        Raises ValueError when the table names a state outside `vocabulary` or a trigger outside
        `trigger_vocabulary`, leaves a terminal state, does not name `initial`, or maps one
        (source, trigger) to two different dests.
        """
        table = [_plain(row) for row in table]
        named = {state for row in table for state in (*_sources(row), row["dest"])}
        initial = str(initial)
        known = {member.value for member in vocabulary}
        if unknown := named - known:
            raise ValueError(f"{name}: table names unknown states {sorted(unknown)}")
        triggers = {member.value for member in trigger_vocabulary}
        if unknown := {row["trigger"] for row in table} - triggers:
            raise ValueError(f"{name}: table names unknown triggers {sorted(unknown)}")
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
        moves: dict[tuple[str, str], State] = {}
        for trigger, event in machine.events.items():
            # .items(), not [source]: event.transitions is a defaultdict and a lookup would add keys
            for source, found in event.transitions.items():
                for transition in found:
                    dest = transition.dest
                    if dest is None:
                        raise ValueError(f"{name}: {trigger!r} from {source!r} has no dest")
                    seen = moves.setdefault((source, trigger), vocabulary(dest))
                    if seen != dest:
                        both = f"{str(seen)!r} and {dest!r}"
                        raise ValueError(f"{name}: {trigger!r} from {source!r} goes to both {both}")
        final = frozenset(vocabulary(state) for state in terminal if state in ordered)
        if leaving := sorted(f"{s} --{t}-->" for (s, t) in moves
                             if s in final and t not in REOPENING_TRIGGERS):
            raise ValueError(f"{name}: terminal states have moves: {leaving}")
        return cls(
            name=name,
            states=frozenset(vocabulary(state) for state in ordered),
            initial=vocabulary(initial),
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

    def next_state(self, source: str, trigger: str) -> State:
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
                    f"{self.name}: move #{index} ({_q(source)} --{trigger}--> {_q(dest)})"
                    f" starts at {_q(source)} but the machine is in {_q(state)}"
                )
            expected = table.get((source, trigger))
            if expected is None:
                raise IllegalTransitionError(f"move #{index}: {self._refusal(source, trigger)}")
            if expected != dest:
                raise IllegalTransitionError(
                    f"{self.name}: move #{index} stored {_q(source)} --{trigger}--> {_q(dest)}"
                    f" but the table says {_q(expected)}"
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
            raise ValueError(f"{self.name}: {_q(at)} is not a state of this machine")
        if any(attached is model for attached in self.machine.models):
            # transitions would silently keep the old state
            raise ValueError(f"{self.name}: model is already attached")
        self.machine.add_model(model, initial=str(at))  # its value, not its member name

    def detach(self, model: object) -> None:
        """Unregister `model` from the Machine; raises ValueError if it is not attached."""
        self.machine.remove_model(model)

    def _refusal(self, source: str, trigger: str) -> str:
        if source not in self.states:
            return (f"{self.name}: {_q(source)} is not a state of this machine"
                    f" (trigger {_q(trigger)})")
        allowed = ", ".join(self.allowed(source)) or "none (terminal)"
        return f"{self.name}: cannot {_q(trigger)} from {_q(source)}; allowed from there: {allowed}"


@functools.cache
def task_machine(kind: TaskKind) -> StateMachine[TaskState]:
    """The machine for one task kind, built once; raises ValueError for an unknown kind."""
    if type(kind) is not TaskKind:
        # the cache keys a plain "withdraw" apart from TaskKind.WITHDRAW: share one machine
        return task_machine(TaskKind(kind))
    return StateMachine.from_table(
        kind.value,
        TASK_TABLES[kind],
        vocabulary=TaskState,
        trigger_vocabulary=TaskTrigger,
        initial=TaskState.CREATED,
        terminal=TASK_TERMINAL,
    )


@functools.cache
def workflow_machine() -> StateMachine[WorkflowState]:
    """The workflow machine, built once."""
    return StateMachine.from_table(
        "workflow",
        WORKFLOW,
        vocabulary=WorkflowState,
        trigger_vocabulary=WorkflowTrigger,
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
    "TaskTrigger",
    "TransitionRow",
    "WorkflowState",
    "WorkflowTrigger",
    "task_machine",
    "workflow_machine",
]
