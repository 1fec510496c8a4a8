"""What the worker learns from an answer rides with its next intent: every intent is stored
before its own exchange call, every answer before the next call, and a command landing while
an answer is held costs a reconcile, never a resend."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest

from events.store import EventStore
from events.vocabulary import TaskKind, TaskTrigger
from rebalancer import engine as engine_module
from rebalancer.budgets import Budgets
from rebalancer.commands import control_workflow, start_workflow
from rebalancer.engine import Engine
from rebalancer.exchanges.base import Exchange, Exchanges
from rebalancer.specs.builders import task, workflow
from rebalancer.tasks.base import TaskContext
from rebalancer.tasks.transfer import TransferProcessor
from tests.support import (
    Worker,
    engine_running,
    eventually,
    load,
    operations,
    withdraw_once,
    write_world,
)

AMOUNTS = {"first": "0.021", "second": "0.034"}
MONEY_CALLS = ("transfer", "withdraw")


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"),
                       balances={"binance-corp-sub": {"ETH": "10"},
                                 "upbit-personal": {"ETH": "1"}})


def two_transfers(worker: Worker) -> Any:
    return workflow(
        "two_transfers",
        {"first": "amount", "second": "amount"},
        [task(name, "transfer", account="binance-corp-sub", currency="ETH",
              amount="{" + name + "}", from_wallet="spot", to_wallet="futures")
         for name in AMOUNTS],
        accounts=worker.accounts,
    )


class Watching:
    """The simulated world, with a look at the stored stream at every exchange call (and a
    hook run on every transfer's answer before the engine sees it)."""

    def __init__(self, world: Exchanges, store: EventStore) -> None:
        self.world = world
        self.store = store
        self.stream = ""
        self.seen: list[tuple[str, list[tuple[str, str]]]] = []  # (method, stored moves)
        self.on_answer: Callable[[], Any] | None = None

    def for_account(self, account: str) -> Exchange:
        inner = self.world.for_account(account)
        outer = self

        class Port:
            def __getattr__(self, name: str) -> Any:
                target = getattr(inner, name)
                if not inspect.iscoroutinefunction(target):
                    return target

                async def call(*args: Any, **kwargs: Any) -> Any:
                    stored = await outer.store.read_stream(outer.stream)
                    outer.seen.append((name, [(e.data.get("task_name", "_workflow"),
                                               e.data["trigger"]) for e in stored[1:]]))
                    answer = await target(*args, **kwargs)
                    if name in MONEY_CALLS and outer.on_answer is not None:
                        hook, outer.on_answer = outer.on_answer, None
                        await hook()
                    return answer

                return call

        return cast(Exchange, Port())


@contextlib.asynccontextmanager
async def watched(database_url: str, store: EventStore, world_file: Path,
                  spec: Callable[[Worker], Any], params: dict[str, str]
                  ) -> AsyncIterator[tuple[Watching, Engine, str]]:
    """A workflow started on the watched world, with an engine (not yet running) to drive it."""
    async with Worker(database_url, world=world_file) as worker:
        exchanges = Watching(worker.world, store)
        engine = Engine(store, exchanges, worker.accounts, owner="held",
                        budgets=Budgets.lifted(), poll_scale=1 / worker.time_scale)
        workflow_id, _ = await start_workflow(store, spec(worker), params, worker.accounts)
        exchanges.stream = f"workflow-{workflow_id}"
        yield exchanges, engine, workflow_id


async def test_every_intent_is_stored_before_its_call_and_every_answer_before_the_next(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with watched(database_url, store, world_file, two_transfers, AMOUNTS) as (
            exchanges, engine, workflow_id):
        async with engine_running(engine):
            flow = await eventually(lambda: load(store, workflow_id),
                                    lambda f: f.state == "done", timeout=20,
                                    what="the workflow ending")
        events = await store.read_stream(flow.stream_id)
    sends = [stored for method, stored in exchanges.seen if method == "transfer"]
    assert len(sends) == 2
    # Each transfer went out with its own intent as the last stored move, and the second
    # only once the first's answer (accept, complete) was stored.
    assert sends[0] == [("_workflow", "start"), ("first", "submit")]
    assert sends[1] == [("_workflow", "start"), ("first", "submit"), ("first", "accept"),
                        ("first", "complete"), ("second", "submit")]
    assert_answers_stored_before_each_call(exchanges.seen)
    # Fewer transactions than moves: the start rode with the first intent, the first's answer
    # with the second intent, the second's answer with the workflow's end.
    by_transaction: dict[int, list[str]] = {}
    for e in events[1:]:
        by_transaction.setdefault(e.transaction_id, []).append(
            f"{e.data.get('task_name', '_workflow')}:{e.data['trigger']}")
    assert list(by_transaction.values()) == [
        ["_workflow:start", "first:submit"],
        ["first:accept", "first:complete", "second:submit"],
        ["second:accept", "second:complete", "_workflow:complete"],
    ]
    # Every intent is the last move of its transaction: its call follows its commit.
    for moves in by_transaction.values():
        assert all(not m.endswith(":submit") for m in moves[:-1]), moves
    moved = await operations(database_url, "transfer")
    assert sorted(Decimal(op["amount"]) for op in moved) == sorted(
        Decimal(a) for a in AMOUNTS.values())


async def test_a_command_landing_while_an_answer_is_held_costs_a_reconcile_not_a_resend(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with watched(database_url, store, world_file, two_transfers, AMOUNTS) as (
            exchanges, engine, workflow_id):

        async def operator_pauses() -> None:
            # The first transfer has been made; its answer is on its way to the engine.
            await control_workflow(store, "pause", "pause-while-held", workflow_id)

        exchanges.on_answer = operator_pauses
        async with engine_running(engine):
            # The engine's store of the held answer meets the pause: it folds again, finds the
            # first task still `submitting`, asks the exchange and settles it, then starts
            # nothing new while paused.
            flow = await eventually(
                lambda: load(store, workflow_id),
                lambda f: f.state == "paused" and f.tasks[0].state == "done", timeout=20,
                what="the first transfer settled while paused",
                describe=lambda f: (f.state, [t.state for t in f.tasks]))
            assert flow.tasks[1].state == "created"
            assert len(await operations(database_url, "transfer")) == 1
            await control_workflow(store, "resume", "resume-after-held", workflow_id)
            flow = await eventually(lambda: load(store, workflow_id),
                                    lambda f: f.state == "done", timeout=20,
                                    what="the workflow ending")
        moves = [(e.data.get("task_name"), e.data["trigger"], e.data["source"])
                 for e in await store.read_stream(flow.stream_id)
                 if e.type == "TaskStateChanged"]
    # The first task's answer was learned again from the exchange (accept from submitting
    # after the pause), never by a second transfer.
    assert moves[:3] == [("first", "submit", "created"), ("first", "accept", "submitting"),
                         ("first", "complete", "requested")]
    assert [m for m in moves if m[1] in ("reset", "submit")] == [
        ("first", "submit", "created"), ("second", "submit", "created")]
    moved = await operations(database_url, "transfer")
    assert sorted(Decimal(op["amount"]) for op in moved) == sorted(
        Decimal(a) for a in AMOUNTS.values())
    stored = [e.type for e in await store.read_stream(flow.stream_id)]
    assert stored.count("WorkflowStateChanged") >= 4  # start, pause, resume, complete


def assert_answers_stored_before_each_call(seen: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """At every call of any kind, each money call answered before it is stored as accepted."""
    answered = 0
    for method, stored in seen:
        assert sum(trigger == "accept" for _, trigger in stored) == answered, (method, stored)
        answered += method in MONEY_CALLS


async def test_a_look_up_after_a_held_answer_goes_only_once_the_answer_is_stored(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    params = {"from_account": "upbit-personal", "to_account": "binance-personal",
              "amount": "0.2"}
    async with watched(database_url, store, world_file,
                       lambda worker: withdraw_once(worker.accounts), params) as (
            exchanges, engine, workflow_id), engine_running(engine):
        await eventually(lambda: load(store, workflow_id), lambda f: f.state == "done",
                         timeout=20, what="the withdrawal ending")
    methods = [method for method, _ in exchanges.seen]
    # The withdrawal is followed by look-ups of its status: each found `accept` stored.
    assert "withdraw" in methods and methods.index("withdraw") < len(methods) - 1, methods
    assert_answers_stored_before_each_call(exchanges.seen)


class Refused(TransferProcessor):
    """A transfer processor with a bug in its second task: its first move carries a payload
    the store refuses (a secret-looking key), and the step ends there, so the move is only
    stored, and refused, when the workflow is handed back."""

    async def request(self, ctx: TaskContext) -> None:
        if ctx.task.index == 0:
            await super().request(ctx)
            return
        await ctx.move(TaskTrigger.FAIL, error={"code": "bug", "api_secret": "not stored"})


async def test_a_held_move_the_store_refuses_at_the_hand_back_reaches_an_operator(
    database_url: str, store: EventStore, world_file: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.TRANSFER,  # type: ignore[index]
                        Refused())
    async with Worker(database_url, world=world_file) as worker:
        workflow_id, _ = await start_workflow(store, two_transfers(worker), AMOUNTS,
                                              worker.accounts)
        async with engine_running(worker.engine):
            # Counted by the bulkhead like any refusal inside a step, and escalated at its
            # third: not left to a claim's expiry over and over, unseen.
            stuck = await eventually(lambda: load(store, workflow_id),
                                     lambda w: any(t.state == "needs_attention"
                                                   for t in w.tasks), timeout=30,
                                     what="the refused move handed to an operator",
                                     describe=lambda w: (w.state, [t.state for t in w.tasks]))
    attention = next(t for t in stuck.tasks if t.state == "needs_attention")
    assert "InvalidEventError" in (attention.error or {})["message"]
    # The moves held before the refused one were stored alone: the first transfer's answer is
    # not lost with the bug in the second task, which is the one handed over.
    assert [t.state for t in stuck.tasks] == ["done", "needs_attention"]
    # The first transfer was sent once: every refold found it by its client id.
    assert [Decimal(op["amount"]) for op in await operations(database_url, "transfer")] == [
        Decimal(AMOUNTS["first"])]
