"""Every task and workflow table, checked against tables written out here and transitions."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from transitions.core import MachineError

from events.vocabulary import TaskKind, TaskState, TaskTrigger, WorkflowState, WorkflowTrigger
from rebalancer.errors import IllegalTransitionError
from rebalancer.machines import (
    TASK_TABLES,
    WORKFLOW,
    StateMachine,
    TransitionRow,
    task_machine,
    workflow_machine,
)

Moves = dict[tuple[str, str], str]


def _rows(trigger: str, sources: str, dest: str) -> Moves:
    """Expand `trigger` from each of the space-separated `sources` to `dest`."""
    return {(source, trigger): dest for source in sources.split()}


# --- the expected tables, written out independently of rebalancer.machines --------------------

_SUBMITTING_SKELETON: Moves = {
    **_rows("submit", "created", "submitting"),
    **_rows("accept", "submitting", "requested"),
    **_rows("reset", "submitting", "created"),
    **_rows("complete", "requested submitting", "done"),
    **_rows("fail", "created submitting requested", "failed"),
    **_rows("cancel", "created submitting requested needs_attention", "canceled"),
    **_rows("escalate", "created submitting requested", "needs_attention"),
    **_rows("resolve_resend", "needs_attention", "created"),
    **_rows("resolve_done", "needs_attention", "done"),
    **_rows("resolve_failed", "needs_attention", "failed"),
    # retry --from: the only moves out of terminal states
    **_rows("reopen", "failed", "created"),
    **_rows("reopen", "done", "needs_attention"),
}

_PROCESSING_EXITS: Moves = {
    **_rows("complete", "processing", "done"),
    **_rows("fail", "processing", "failed"),
    **_rows("cancel", "processing", "canceled"),
    **_rows("escalate", "processing", "needs_attention"),
}

EXPECTED: dict[str, Moves] = {
    "trade": {
        **_SUBMITTING_SKELETON,
        **_rows("open", "submitting requested", "open"),
        **_rows("fill", "open", "open"),
        **_rows("next_slice", "submitting requested open", "submitting"),
        **_rows("complete", "open", "done"),
        **_rows("fail", "open", "failed"),
        **_rows("cancel", "open", "canceled"),
        **_rows("escalate", "open", "needs_attention"),
        # an operator's cancel of a trade that sent an order: the worker stops it on the exchange
        **_rows("request_cancel", "created submitting requested open", "canceling"),
        **_rows("cancel", "canceling", "canceled"),
        **_rows("escalate", "canceling", "needs_attention"),
    },
    "withdraw": {
        **_SUBMITTING_SKELETON,
        **_rows("progress", "submitting requested", "processing"),
        **_rows("update", "processing", "processing"),
        **_PROCESSING_EXITS,
    },
    "transfer": {
        **_SUBMITTING_SKELETON,
        **_rows("progress", "requested", "processing"),
        **_PROCESSING_EXITS,
    },
    "master_transfer": {
        **_SUBMITTING_SKELETON,
        **_rows("progress", "requested", "processing"),
        **_PROCESSING_EXITS,
    },
    "deposit": {
        **_rows("watch", "created", "requested"),
        **_rows("progress", "requested", "processing"),
        **_rows("update", "processing", "processing"),
        **_rows("complete", "requested processing", "done"),
        **_rows("fail", "created requested processing", "failed"),
        **_rows("cancel", "created requested processing needs_attention", "canceled"),
        **_rows("escalate", "created requested processing", "needs_attention"),
        **_rows("resolve_resend", "needs_attention", "created"),
        **_rows("resolve_done", "needs_attention", "done"),
        **_rows("resolve_failed", "needs_attention", "failed"),
        **_rows("reopen", "failed", "created"),
        **_rows("reopen", "done", "needs_attention"),
    },
    "workflow": {
        **_rows("start", "created", "running"),
        **_rows("complete", "running", "done"),
        **_rows("fail", "created running paused needs_attention", "failed"),
        **_rows("cancel", "created running paused needs_attention", "canceled"),
        **_rows("pause", "running", "paused"),
        **_rows("resume", "paused", "running"),
        **_rows("escalate", "running paused", "needs_attention"),
        **_rows("retry", "needs_attention", "running"),
        **_rows("reopen", "failed", "running"),
    },
}

_TASK_STATES = "created submitting requested done failed canceled needs_attention"
EXPECTED_STATES: dict[str, frozenset[str]] = {
    "trade": frozenset(f"{_TASK_STATES} open canceling".split()),
    "withdraw": frozenset(f"{_TASK_STATES} processing".split()),
    "transfer": frozenset(f"{_TASK_STATES} processing".split()),
    "master_transfer": frozenset(f"{_TASK_STATES} processing".split()),
    "deposit": frozenset(
        {"created", "requested", "processing", "done", "failed", "canceled", "needs_attention"}
    ),
    "workflow": frozenset(
        {"created", "running", "paused", "needs_attention", "done", "failed", "canceled"}
    ),
}

TERMINAL = frozenset({"done", "failed", "canceled"})
MACHINE_NAMES = list(EXPECTED)


def _machine(name: str) -> StateMachine:
    return workflow_machine() if name == "workflow" else task_machine(TaskKind(name))


def _triggers(name: str) -> list[str]:
    return sorted({trigger for (_, trigger) in EXPECTED[name]})


class Model:
    """A plain object that holds `state`, as transitions expects; attach gives it the methods."""

    state: str
    trigger: Callable[[str], bool]


@contextmanager
def attached(machine: StateMachine, state: str) -> Iterator[Model]:
    """A fresh model attached at `state`, detached again whatever the test does."""
    model = Model()
    machine.attach(model, state)
    try:
        yield model
    finally:
        machine.detach(model)


# Every (state, trigger) pair of every machine, legal or not.
ALL_PAIRS = [
    pytest.param(name, state, trigger, id=f"{name}-{state}-{trigger}")
    for name in MACHINE_NAMES
    for state in sorted(EXPECTED_STATES[name])
    for trigger in _triggers(name)
]


# --- shape ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_machine_has_exactly_the_expected_states_triggers_and_moves(name: str) -> None:
    machine = _machine(name)
    assert machine.name == name
    assert machine.states == EXPECTED_STATES[name]
    assert machine.triggers == set(_triggers(name))
    assert dict(machine.moves) == EXPECTED[name]
    assert machine.initial == "created"
    assert machine.terminal == TERMINAL
    # the states the Machine knows are exactly those the table uses
    assert set(machine.machine.states) == EXPECTED_STATES[name]


def test_every_task_kind_has_a_table() -> None:
    assert set(TASK_TABLES) == set(TaskKind)
    assert {state.value for state in TaskState} == set().union(
        *(EXPECTED_STATES[kind] for kind in TaskKind)
    )
    assert {state.value for state in WorkflowState} == EXPECTED_STATES["workflow"]


# --- every (state, trigger) pair -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "state", "trigger"), ALL_PAIRS)
def test_every_pair_is_allowed_or_refused_by_the_table_and_the_machine_alike(
    name: str, state: str, trigger: str
) -> None:
    machine = _machine(name)
    expected = EXPECTED[name].get((state, trigger))
    with attached(machine, state) as model:
        may_trigger = getattr(model, f"may_{trigger}")
        if expected is not None:
            # legal: the flat table and the transitions Machine both land on the expected dest
            assert machine.may(state, trigger)
            assert machine.next_state(state, trigger) == expected
            assert may_trigger() is True
            assert model.trigger(trigger) is True
            assert model.state == expected
        else:
            # illegal: refused by the flat table and by the transitions Machine
            assert not machine.may(state, trigger)
            with pytest.raises(IllegalTransitionError):
                machine.next_state(state, trigger)
            assert may_trigger() is False
            with pytest.raises(MachineError):
                model.trigger(trigger)
            assert model.state == state
    assert model not in machine.machine.models


def test_withdraw_cannot_complete_from_created() -> None:
    withdraw = task_machine(TaskKind.WITHDRAW)
    with pytest.raises(IllegalTransitionError) as refused:
        withdraw.next_state("created", "complete")
    # the message names the machine, the state, the trigger and what is allowed instead
    message = str(refused.value)
    for part in ("withdraw", "'created'", "'complete'", "cancel, escalate, fail, submit"):
        assert part in message


def test_deposit_has_no_submitting_state_and_starts_by_watching() -> None:
    deposit = task_machine(TaskKind.DEPOSIT)
    assert "submitting" not in deposit.states
    assert not {"submit", "accept", "reset"} & deposit.triggers
    assert deposit.allowed("created") == ("cancel", "escalate", "fail", "watch")


def test_trade_records_a_partial_fill_as_a_self_loop_on_open() -> None:
    assert task_machine(TaskKind.TRADE).next_state("open", "fill") == "open"


def test_withdraw_found_processing_on_reconcile_moves_from_submitting() -> None:
    assert task_machine(TaskKind.WITHDRAW).next_state("submitting", "progress") == "processing"


def test_transfer_cannot_progress_from_submitting() -> None:
    assert not task_machine(TaskKind.TRANSFER).may("submitting", "progress")


def test_next_state_refuses_a_state_the_machine_does_not_have() -> None:
    with pytest.raises(IllegalTransitionError, match="'open' is not a state"):
        task_machine(TaskKind.WITHDRAW).next_state("open", "complete")


# --- graph properties ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_terminal_states_have_no_outgoing_moves_but_an_operators_reopen(name: str) -> None:
    machine = _machine(name)
    for state in machine.terminal:
        assert set(machine.allowed(state)) <= {"reopen"}
        assert set(machine.machine.get_triggers(state)) <= {"reopen"}
    assert machine.allowed("canceled") == ()


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_every_non_terminal_state_can_reach_done_or_needs_attention(name: str) -> None:
    machine = _machine(name)
    for state in machine.states - machine.terminal:
        # breadth-first over the table
        seen = {state}
        queue = deque([state])
        while queue:
            current = queue.popleft()
            for trigger in machine.allowed(current):
                dest = machine.next_state(current, trigger)
                if dest not in seen:
                    seen.add(dest)
                    queue.append(dest)
        assert "done" in seen or state == "needs_attention", state


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_no_auto_transitions_exist(name: str) -> None:
    machine = _machine(name)
    assert not [trigger for trigger in machine.machine.events if trigger.startswith("to_")]
    with attached(machine, machine.initial) as model:
        for state in machine.states:
            assert not hasattr(model, f"to_{state}")


# --- the builder ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_builder_returns_the_same_machine_twice(name: str) -> None:
    assert _machine(name) is _machine(name)


def test_task_machine_shares_one_machine_for_a_plain_string_kind() -> None:
    assert task_machine("withdraw") is task_machine(TaskKind.WITHDRAW)


@pytest.mark.parametrize("name", MACHINE_NAMES)
def test_moves_match_the_transitions_machine(name: str) -> None:
    machine = _machine(name)
    for state in machine.states:
        for trigger in machine.triggers:
            found = machine.machine.get_transitions(trigger=trigger, source=str(state))
            dests = {transition.dest for transition in found}
            if (state, trigger) in machine.moves:
                assert dests == {machine.moves[(state, trigger)]}
            else:
                assert dests == set()


def test_a_table_with_two_dests_for_one_pair_is_refused_at_build_time() -> None:
    table: list[TransitionRow] = [
        {"trigger": "start", "source": "created", "dest": "running"},
        {"trigger": "start", "source": "created", "dest": "paused"},
    ]
    with pytest.raises(ValueError, match="goes to both"):
        StateMachine.from_table(
            "bad", table, vocabulary=WorkflowState, trigger_vocabulary=WorkflowTrigger,
            initial="created", terminal=()
        )


def test_a_table_that_leaves_a_terminal_state_is_refused_at_build_time() -> None:
    table: list[TransitionRow] = [
        *WORKFLOW,
        {"trigger": "start", "source": "done", "dest": "running"},
    ]
    with pytest.raises(ValueError, match="terminal"):
        StateMachine.from_table(
            "bad", table, vocabulary=WorkflowState, trigger_vocabulary=WorkflowTrigger,
            initial="created", terminal=TERMINAL
        )


def test_a_table_naming_an_unknown_state_is_refused_at_build_time() -> None:
    table: list[TransitionRow] = [{"trigger": "start", "source": "created", "dest": "runing"}]
    with pytest.raises(ValueError, match="unknown states"):
        StateMachine.from_table(
            "bad", table, vocabulary=WorkflowState, trigger_vocabulary=WorkflowTrigger,
            initial="created", terminal=()
        )


def test_a_table_naming_an_unknown_trigger_is_refused_at_build_time() -> None:
    table: list[TransitionRow] = [{"trigger": "strat", "source": "created", "dest": "running"}]
    with pytest.raises(ValueError, match="unknown triggers"):
        StateMachine.from_table(
            "bad", table, vocabulary=WorkflowState, trigger_vocabulary=WorkflowTrigger,
            initial="created", terminal=()
        )


def test_a_table_of_enum_members_gives_the_stored_values_not_the_member_names() -> None:
    # transitions would name an Enum state by its member name (CREATED): the builder hands it
    # plain values, so a model's state is what events store.
    table: list[TransitionRow] = [
        {"trigger": WorkflowTrigger.START, "source": WorkflowState.CREATED,
         "dest": WorkflowState.RUNNING},
    ]
    machine = StateMachine.from_table(
        "plain", table, vocabulary=WorkflowState, trigger_vocabulary=WorkflowTrigger,
        initial=WorkflowState.CREATED, terminal=(),
    )
    assert machine.moves == {("created", "start"): "running"}
    assert machine.machine.get_state("running").name == "running"  # transitions' own name
    model = Model()
    machine.attach(model)
    try:
        model.start()  # type: ignore[attr-defined]
        assert model.state == "running"
    finally:
        machine.detach(model)


def test_every_trigger_of_the_vocabulary_is_used_by_some_table() -> None:
    # A trigger no table names is dead vocabulary: renaming one in a table must show up here.
    used = {row["trigger"] for table in TASK_TABLES.values() for row in table}
    assert used == set(TaskTrigger)
    assert {row["trigger"] for row in WORKFLOW} == set(WorkflowTrigger)


# --- attach / detach ------------------------------------------------------------------------


def test_attach_starts_a_model_in_the_initial_state() -> None:
    workflow = workflow_machine()
    model = Model()
    workflow.attach(model)
    try:
        assert model.state == "created"
        assert model.may_start() is True  # type: ignore[attr-defined]
    finally:
        workflow.detach(model)


def test_attaching_a_model_twice_is_refused() -> None:
    workflow = workflow_machine()
    with attached(workflow, "running") as model, pytest.raises(ValueError, match="already"):
        workflow.attach(model, "paused")


def test_attaching_at_a_state_the_machine_does_not_have_is_refused() -> None:
    with pytest.raises(ValueError, match="not a state"):
        task_machine(TaskKind.DEPOSIT).attach(Model(), "submitting")


# --- fold -----------------------------------------------------------------------------------

VALID_WITHDRAW = [
    ("created", "submit", "submitting"),
    ("submitting", "accept", "requested"),
    ("requested", "progress", "processing"),
    ("processing", "update", "processing"),
    ("processing", "complete", "done"),
]


def test_a_valid_withdraw_history_folds_to_done() -> None:
    assert task_machine(TaskKind.WITHDRAW).fold(VALID_WITHDRAW) == "done"


def test_an_empty_history_folds_to_the_start_state() -> None:
    withdraw = task_machine(TaskKind.WITHDRAW)
    assert withdraw.fold([]) == "created"
    assert withdraw.fold([], start="processing") == "processing"


def test_fold_resumes_from_a_given_start() -> None:
    assert task_machine(TaskKind.WITHDRAW).fold(VALID_WITHDRAW[3:], start="processing") == "done"


def test_a_history_with_a_skipped_state_does_not_fold() -> None:
    # accept is missing: the third move starts where the machine never got to
    history = [VALID_WITHDRAW[0], *VALID_WITHDRAW[2:]]
    with pytest.raises(IllegalTransitionError, match="#1"):
        task_machine(TaskKind.WITHDRAW).fold(history)


def test_a_history_with_a_wrong_stored_dest_does_not_fold() -> None:
    history = [*VALID_WITHDRAW[:2], ("requested", "progress", "done"), *VALID_WITHDRAW[3:]]
    with pytest.raises(IllegalTransitionError, match=r"#2.*'done'.*'processing'"):
        task_machine(TaskKind.WITHDRAW).fold(history)


def test_a_history_with_an_unknown_trigger_does_not_fold() -> None:
    history = [*VALID_WITHDRAW[:3], ("processing", "fill", "processing"), VALID_WITHDRAW[4]]
    with pytest.raises(IllegalTransitionError, match=r"#3.*'fill'"):
        task_machine(TaskKind.WITHDRAW).fold(history)


def test_a_history_that_leaves_a_terminal_state_does_not_fold() -> None:
    history = [*VALID_WITHDRAW, ("done", "fail", "failed")]
    with pytest.raises(IllegalTransitionError, match="#5"):
        task_machine(TaskKind.WITHDRAW).fold(history)
