"""Which resolve commands an escalation names, by what `resend` would do for the task as
recorded (rebalancer/tasks/remedies.py): every line parses as the command line's `resolve`, and
resend is never offered bare where an intent may be in flight."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from events.vocabulary import TaskKind, TaskState
from rebalancer.cli.parser import build_parser
from rebalancer.machines import task_machine
from rebalancer.tasks.remedies import commands_for
from rebalancer.workflow import TaskRecord

WF = "0b8a4f7e-5c1d-4e2a-9f3b-1a2b3c4d5e6f"
RESOLUTION = {"resend": "resolve_resend", "done": "resolve_done", "failed": "resolve_failed"}


def record(kind: TaskKind, state: TaskState, **fields: Any) -> TaskRecord:
    return TaskRecord(0, "step", kind, state, **fields)


def outcomes(task: TaskRecord, candidates: list[dict[str, Any]] | None = None) -> list[str]:
    """The outcomes of the commands, each parsed by the real parser and allowed from
    needs_attention by the task's table."""
    found = []
    for line in commands_for(WF, task, candidates):
        argv = shlex.split(line)
        assert argv[:4] == ["rebalancer", "resolve", WF, "step"]
        args = build_parser().parse_args(argv[1:])
        assert args.note
        assert task_machine(task.kind).may(TaskState.NEEDS_ATTENTION, RESOLUTION[args.outcome])
        found.append(args.outcome + "".join(f" {r}" for r in args.result or []))
    return found


SENT = {"client_id": "rb-1", "amount": "0.2", "currency": "ETH", "account": "a"}


@pytest.mark.parametrize("kind", [TaskKind.WITHDRAW, TaskKind.TRANSFER,
                                  TaskKind.MASTER_TRANSFER])
def test_an_acknowledged_operation_is_done_by_its_exchange_id_and_never_resent(
        kind: TaskKind) -> None:
    task = record(kind, TaskState.PROCESSING, intents=1, request_params=SENT,
                  request_result={"id": "77"})
    assert outcomes(task) == ["done id=77", "failed"]


@pytest.mark.parametrize("kind", [TaskKind.WITHDRAW, TaskKind.TRANSFER])
def test_one_found_submitting_is_resent_only_after_the_check_its_note_names(
        kind: TaskKind) -> None:
    task = record(kind, TaskState.SUBMITTING, intents=1, request_params=SENT)
    assert outcomes(task) == ["resend", "failed"]
    assert "checked: no" in commands_for(WF, task)[0] and "rb-1" in commands_for(WF, task)[0]


def test_nothing_sent_is_resent_once_fixed() -> None:
    assert outcomes(record(TaskKind.WITHDRAW, TaskState.CREATED)) == ["resend", "failed"]


@pytest.mark.parametrize("state", [TaskState.OPEN, TaskState.REQUESTED, TaskState.CANCELING])
def test_a_trade_with_an_order_on_the_exchange_is_settled_not_resent(state: TaskState) -> None:
    task = record(TaskKind.TRADE, state, intents=1, request_params=SENT,
                  request_result={"order_id": "o-9"})
    assert outcomes(task) == ["done", "failed"]
    assert "o-9" in commands_for(WF, task)[0]


def test_a_trade_found_submitting_may_be_resent_after_the_check() -> None:
    task = record(TaskKind.TRADE, TaskState.SUBMITTING, intents=1, request_params=SENT)
    assert outcomes(task) == ["done", "resend", "failed"]


def test_a_deposit_names_each_unclaimed_deposit_seen_and_waits_again() -> None:
    task = record(TaskKind.DEPOSIT, TaskState.REQUESTED, request_params=SENT)
    seen = [{"id": "1", "txid": "aa", "amount": "0.2", "at": "t", "claimed_by_workflow": None},
            {"id": "2", "txid": "bb", "amount": "0.2", "at": "t", "claimed_by_workflow": WF},
            {"id": "3", "txid": None, "amount": "0.2", "at": "t", "claimed_by_workflow": None}]
    assert outcomes(task, seen) == ["done txid=aa", "resend", "failed"]
    assert outcomes(task) == ["resend", "failed"]
