"""The aggregate and the `workflows` read model fold any legal stream to the same state."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.catalogue import Event, TaskStateChanged, WorkflowCreated, WorkflowStateChanged
from events.store import RecordedEvent
from events.vocabulary import TASK_TERMINAL, TaskTrigger, WorkflowState
from projections import workflows as read_model
from rebalancer import workflow as aggregate
from rebalancer.machines import task_machine, workflow_machine
from rebalancer.specs.loading import builtin_specs

SPEC = builtin_specs()["upbit_to_binance_sub_futures"]
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PAYLOADS = st.one_of(st.none(), st.fixed_dictionaries({"n": st.integers(0, 9)}))
ERRORS = st.one_of(st.none(), st.fixed_dictionaries({"code": st.sampled_from(["a", "b"]),
                                                     "message": st.text(max_size=5)}))


def _recorded(stream_id: str, events: list[Event]) -> list[RecordedEvent]:
    return [
        RecordedEvent(position=v, transaction_id=v, stream_id=stream_id, version=v,
                      type=e.type_name, schema_version=e.schema_version,
                      data=e.model_dump(mode="json"), metadata={},
                      recorded_at=T0 + timedelta(seconds=v), hash=b"")
        for v, e in enumerate(events, start=1)
    ]


@st.composite
def legal_streams(draw: st.DrawFn) -> list[Event]:
    """A WorkflowCreated, then up to 60 moves, each one the tables allow from where it stands."""
    events: list[Event] = [WorkflowCreated(spec_name=SPEC.name, spec=SPEC.model_dump(mode="json"),
                                           params={"from_amount": "1"}, command_id="c")]
    state = workflow_machine().initial
    tasks = [task_machine(t.kind).initial for t in SPEC.tasks]
    for _ in range(draw(st.integers(0, 60))):
        index = draw(st.integers(-1, len(tasks) - 1))  # -1: a move of the workflow itself
        if index < 0:
            allowed = workflow_machine().allowed(state)
            if not allowed:
                continue
            trigger = draw(st.sampled_from(allowed))
            dest = workflow_machine().next_state(state, trigger)
            events.append(WorkflowStateChanged(trigger=trigger, source=state, dest=dest,
                                               reason=draw(st.none() | st.text(max_size=5))))
            state = dest
            continue
        kind = SPEC.tasks[index].kind
        allowed = task_machine(kind).allowed(tasks[index])
        if not allowed:
            continue
        trigger = TaskTrigger(draw(st.sampled_from(allowed)))
        dest = task_machine(kind).next_state(tasks[index], trigger)
        events.append(TaskStateChanged(
            task_index=index, task_name=SPEC.tasks[index].name, kind=kind, trigger=trigger,
            source=tasks[index], dest=dest, request_params=draw(PAYLOADS),
            request_result=draw(PAYLOADS), refresh_result=draw(PAYLOADS), error=draw(ERRORS),
        ))
        tasks[index] = dest
    return events


SHARED_TASK_FIELDS = ("state", "request_params", "request_result", "refresh_result", "error")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(legal_streams())
def test_the_aggregate_and_the_read_model_agree_on_every_shared_field(events: list[Event]) -> None:
    stored = _recorded(f"workflow-{uuid.uuid4()}", events)
    folded = aggregate.fold(stored)
    view = read_model.fold(stored)
    assert view is not None
    assert (view.state, view.reason, view.version) == (folded.state, folded.reason,
                                                       folded.version)
    assert (view.spec_name, view.params, view.command_id) == (folded.spec_name, folded.params,
                                                              folded.command_id)
    assert (view.created_at, view.updated_at) == (folded.created_at, folded.updated_at)
    assert len(view.tasks) == len(folded.tasks)
    for seen, record in zip(view.tasks, folded.tasks, strict=True):
        assert (seen.index, seen.name, seen.kind) == (record.index, record.name, record.kind)
        for name in SHARED_TASK_FIELDS:
            assert getattr(seen, name) == getattr(record, name), (record.name, name)
    current = view.current_task
    assert (current and current.index) == (folded.current and folded.current.index)


def test_a_reset_clears_the_last_error_in_both_folds() -> None:
    # The fix that made the two folds one: the aggregate used to keep a stale error here.
    trade = SPEC.tasks[0]
    moves: list[tuple[str, str, str, dict[str, Any] | None]] = [
        ("submit", "created", "submitting", None),
        ("reset", "submitting", "created", None),
    ]
    events: list[Event] = [
        WorkflowCreated(spec_name=SPEC.name, spec=SPEC.model_dump(mode="json"), params={},
                        command_id="c"),
        WorkflowStateChanged(trigger="start", source="created", dest="running"),
        TaskStateChanged(task_index=0, task_name=trade.name, kind=trade.kind, trigger="submit",
                         source="created", dest="submitting",
                         error={"code": "timeout", "message": "no answer"}),
    ]
    events += [TaskStateChanged(task_index=0, task_name=trade.name, kind=trade.kind,
                                trigger=t, source=s, dest=d, error=e) for t, s, d, e in moves[1:]]
    stored = _recorded(f"workflow-{uuid.uuid4()}", events)
    folded, view = aggregate.fold(stored), read_model.fold(stored)
    assert view is not None
    assert folded.tasks[0].error is None and view.tasks[0].error is None
    assert folded.state == view.state == WorkflowState.RUNNING
    assert folded.tasks[0].state not in TASK_TERMINAL
