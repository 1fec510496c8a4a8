"""The worker's schedule: claims, hand-backs and due times, the bulkhead around one workflow's
surprise, and work found while a foreign transaction holds the followers back."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from events.store import EventStore
from events.vocabulary import TaskKind
from rebalancer import engine as engine_module
from rebalancer.accounts import load_accounts
from rebalancer.budgets import Budgets
from rebalancer.commands import start_workflow
from rebalancer.engine import Engine
from rebalancer.exchanges.base import (
    Exchange,
    Exchanges,
    HistoryMatch,
    Transfer,
    TransferRequest,
)
from rebalancer.schedule import Schedule
from rebalancer.specs.builders import task, workflow
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.validation import InvalidSpecError
from rebalancer.tasks.base import Processor, TaskContext
from tests.support import (
    SEED_PARAMS,
    SEED_SPEC,
    Worker,
    engine_running,
    eventually,
    load,
    operations,
    to_futures,
    write_world,
)

POISON = "0.013"  # the amount of the one workflow whose processor blows up


def ahead() -> datetime:
    """A clock past the built-in path's 2 s TWAP interval, so its slices go at once."""
    return datetime.now(UTC) + timedelta(seconds=2)


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"),
                       balances={"binance-corp-sub": {"ETH": "10"},
                                 "binance-personal": {"USDT": "1000"}})


async def start(store: EventStore, worker: Worker, amount: str) -> str:
    workflow_id, _ = await start_workflow(
        store, to_futures(worker.accounts), {"account": "binance-corp-sub", "amount": amount},
        worker.accounts,
    )
    return workflow_id


async def schedule_row(database_url: str, workflow_id: str) -> dict[str, object] | None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "select version, claimed_by, next_run_at > now() as later, failures, last_error"
            " from workflow_schedule where workflow_id = %s", (workflow_id,))
        row = await cur.fetchone()
    if row is None:
        return None
    return dict(zip(("version", "claimed_by", "later", "failures", "last_error"), row,
                    strict=True))


async def test_an_append_makes_a_workflow_due_and_a_claim_is_one_owners(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with Worker(database_url, world=world_file) as worker:
        workflow_id = await start(store, worker, "0.01")
        # Written by the append itself: no projection involved.
        assert await schedule_row(database_url, workflow_id) == {
            "version": 1, "claimed_by": None, "later": False, "failures": 0, "last_error": None}
        mine, theirs = Schedule(store, "a", 30), Schedule(store, "b", 30)
        assert [c.workflow_id for c in await mine.claim(10)] == [workflow_id]
        assert await theirs.claim(10) == []
        assert await mine.holders() == {workflow_id: "a"}
        # Handed back due later: nobody may take it before then...
        await mine.release(workflow_id, 1, 60)
        assert await theirs.claim(10) == []
        # ...unless an append (a command, say) makes it due now.
        await worker.step(workflow_id)
        assert [c.workflow_id for c in await theirs.claim(10)] == [workflow_id]
        # A hand-back with a stale version keeps it due now: the append is not lost.
        await theirs.release(workflow_id, 1, 60)
        assert [c.workflow_id for c in await mine.claim(10)] == [workflow_id]
        # Nothing more to do: the row goes; the version must be the stream's.
        await mine.finish(workflow_id, 1)
        assert await schedule_row(database_url, workflow_id) is not None
        assert [c.workflow_id for c in await mine.claim(10)] == [workflow_id]
        await mine.finish(workflow_id, 2)
        assert await schedule_row(database_url, workflow_id) is None


async def test_an_expired_claim_is_taken_over(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with Worker(database_url, world=world_file) as worker:
        workflow_id = await start(store, worker, "0.01")
        dead = Schedule(store, "dead", 0.1)
        assert len(await dead.claim(10)) == 1
        assert await Schedule(store, "alive", 30).claim(10) == []
        await asyncio.sleep(0.3)
        assert [c.workflow_id for c in await Schedule(store, "alive", 30).claim(10)] == [
            workflow_id]
        assert await dead.renew() == 0  # not ours any more


class Poisoned(Processor):
    """The transfer processor, except that it raises for one workflow's amount."""

    kind = TaskKind.TRANSFER

    def __init__(self, inner: Processor) -> None:
        self.inner = inner
        self.calls = 0

    async def step(self, ctx: TaskContext) -> None:
        if ctx.workflow.params.get("amount") == POISON:
            self.calls += 1
            raise ZeroDivisionError("a bug that only this workflow meets")
        await self.inner.step(ctx)

    async def request(self, ctx: TaskContext) -> None:
        raise AssertionError("not reached")

    async def refresh(self, ctx: TaskContext) -> None:
        raise AssertionError("not reached")


async def test_one_workflows_unexpected_error_goes_to_an_operator_and_the_others_finish(
    database_url: str, store: EventStore, world_file: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    poisoned = Poisoned(engine_module.PROCESSORS[TaskKind.TRANSFER])
    monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.TRANSFER, poisoned)  # type: ignore[index]
    async with Worker(database_url, world=world_file) as worker:
        healthy = [await start(store, worker, f"0.1{i:02d}") for i in range(20)]
        bad = await start(store, worker, POISON)
        async with engine_running(worker.engine) as service:
            flows = await eventually(
                lambda: asyncio.gather(*(load(store, w) for w in [*healthy, bad])),
                lambda fs: all(f.state == "done" for f in fs[:-1])
                and fs[-1].state == "needs_attention",
                timeout=30, what="20 done and the poisoned one handed to an operator",
                describe=lambda fs: [f.state for f in fs])
            assert not service.done()  # the worker is still up
        poisoned_task = flows[-1].tasks[0]
        assert poisoned_task.state == "needs_attention"
        assert poisoned_task.error is not None
        assert poisoned_task.error["code"] == "internal"
        assert poisoned_task.error["attempts"] == 3
        assert "ZeroDivisionError" in poisoned_task.error["message"]
        assert poisoned.calls == 3  # three attempts, then no more
        assert flows[-1].reason and "unexpected errors" in flows[-1].reason
        # It moved nothing; every healthy one moved exactly its amount once.
        moved = await operations(database_url, "transfer")
        assert sorted(Decimal(op["amount"]) for op in moved) == sorted(
            Decimal(f"0.1{i:02d}") for i in range(20))
        # Logged with its workflow id and the error's class.
        logged = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
        assert any("ZeroDivisionError" in m for m in logged), logged
        # Waiting on an operator: off the schedule until a command appends.
        assert await schedule_row(database_url, bad) is None


async def test_a_foreign_transaction_held_open_does_not_stop_the_worker(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with (
        Worker(database_url, world=world_file) as worker,
        await psycopg.AsyncConnection.connect(database_url) as psql,
    ):
        # A session with a transaction id, left open: it holds the snapshot barrier (and so
        # every follower of the global order) back for as long as it stays open.
        await psql.execute("select pg_current_xact_id()")
        held_since = time.monotonic()
        async with engine_running(worker.engine):
            await asyncio.sleep(2)  # the hold is well in place
            workflow_id = await start(store, worker, "0.02")
            started = time.monotonic()
            flow = await eventually(lambda: load(store, workflow_id),
                                    lambda f: f.version > 1, timeout=10, interval=0.01,
                                    what="the workflow's first move")
            first_move = time.monotonic() - started
            flow = await eventually(lambda: load(store, workflow_id),
                                    lambda f: f.state == "done", timeout=20,
                                    what="the workflow ending")
            # The followers really were held back all along.
            assert await store.head() < (await store.read_stream(flow.stream_id))[0].checkpoint
            await asyncio.sleep(max(0.0, 30 - (time.monotonic() - held_since)))
            assert time.monotonic() - held_since >= 30
        await psql.rollback()
    assert first_move < 1.0, f"first move after {first_move:.2f} s"


async def test_the_worker_outlives_its_own_sql_being_refused(
    database_url: str, owner_database_url: str, store: EventStore, world_file: Path
) -> None:
    async with Worker(database_url, world=world_file) as worker:
        async with await psycopg.AsyncConnection.connect(owner_database_url,
                                                         autocommit=True) as conn:
            # The claim query no longer matches the table: every claim is refused.
            await conn.execute("alter table workflow_schedule rename column claimed_by to held_by")
            workflow_id = await start(store, worker, "0.02")
            async with engine_running(worker.engine) as service:
                await asyncio.sleep(1.0)
                assert not service.done()
                assert (await load(store, workflow_id)).state == "created"
                await conn.execute(
                    "alter table workflow_schedule rename column held_by to claimed_by")
                flow = await eventually(lambda: load(store, workflow_id),
                                        lambda f: f.state == "done", timeout=20,
                                        what="the workflow ending once the table is back")
        assert flow.state == "done"



class PoisonedAmount:
    """The simulated world, except that a transfer of one amount raises an unexpected error
    in our own code every time, before and after the exchange could be asked (a parse bug
    on one odd value, say)."""

    def __init__(self, world: Exchanges, amount: Decimal) -> None:
        self.world = world
        self.amount = amount

    def for_account(self, account: str) -> Exchange:
        inner = self.world.for_account(account)
        poison = self.amount

        class Port:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            async def transfer(self, request: TransferRequest) -> Transfer:
                if request.amount == poison:
                    raise InvalidOperation([InvalidOperation])
                return await inner.transfer(request)

            async def fetch_transfer(self, client_id: str, match: HistoryMatch) -> Any:
                if match.amount == poison:
                    raise InvalidOperation([InvalidOperation])
                return await inner.fetch_transfer(client_id, match)

        return cast(Exchange, Port())


async def test_real_bad_input_that_blows_up_a_step_does_not_stop_the_worker(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    # `from_amount=1e999` used to crash `serve` on every restart; it is refused at start now.
    spec = builtin_specs()[SEED_SPEC]
    async with Worker(database_url, world=world_file, clock=ahead) as worker:
        with pytest.raises(InvalidSpecError, match="from_amount"):
            await start_workflow(store, spec, {**SEED_PARAMS, "from_amount": "1e999"},
                                 worker.accounts)
        exchanges = PoisonedAmount(worker.world, Decimal("0.0123"))
        engine = Engine(store, exchanges, worker.accounts, owner="bulkhead",
                        budgets=Budgets.lifted(), clock=ahead,
                        poll_scale=1 / worker.time_scale)
        poisoned = await start(store, worker, "0.0123")
        # No BTC/KRW market on Upbit: the step raises before any intent.
        no_market = (await start_workflow(
            store, spec, {**SEED_PARAMS, "from_amount": "200000", "interim_currency": "BTC"},
            worker.accounts))[0]
        healthy = await start(store, worker, "0.031")
        async with engine_running(engine) as service:
            flows = await eventually(
                lambda: asyncio.gather(*(load(store, w) for w in (poisoned, no_market, healthy))),
                lambda fs: all(f.state in ("done", "failed", "needs_attention") for f in fs),
                timeout=60, what="every workflow ending or handed to an operator",
                describe=lambda fs: [(f.state, f.reason) for f in fs])
            assert not service.done()
    huge, no_market_flow, healthy_flow = flows
    assert healthy_flow.state == "done"
    # The call blew up after its intent was stored: kept, for an operator, never resent.
    assert huge.state == "needs_attention", huge.reason
    assert huge.reason and "3 unexpected errors in a row: InvalidOperation" in huge.reason
    assert huge.tasks[0].state == "needs_attention" and huge.tasks[0].request_params
    # No such market, known before any intent: a plain failure, nothing moved.
    assert no_market_flow.state == "failed", no_market_flow.reason
    assert no_market_flow.reason and "no market BTC/KRW" in no_market_flow.reason


class AnswerLostInOurCode:
    """The simulated world, except that the first transfer it executes is followed by an
    unexpected exception in our own code (a parse bug, say): the exchange moved the money,
    the engine never saw the answer."""

    def __init__(self, world: Exchanges) -> None:
        self.world = world
        self.blown = 0

    def for_account(self, account: str) -> Exchange:
        inner = self.world.for_account(account)
        outer = self

        class Port:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            async def transfer(self, request: TransferRequest) -> Transfer:
                done = await inner.transfer(request)
                if outer.blown == 0:
                    outer.blown += 1
                    raise KeyError("a field our parser expected")
                return done

        return cast(Exchange, Port())


async def test_an_unexpected_error_after_the_exchange_moved_money_is_reconciled_not_resent(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with Worker(database_url, world=world_file) as worker:
        exchanges = AnswerLostInOurCode(worker.world)
        engine = Engine(store, exchanges, worker.accounts, owner="bulkhead",
                        budgets=Budgets.lifted(), poll_scale=1 / worker.time_scale)
        workflow_id = await start(store, worker, "0.031")
        async with engine_running(engine):
            flow = await eventually(lambda: load(store, workflow_id),
                                    lambda f: f.state == "done", timeout=20,
                                    what="the workflow ending",
                                    describe=lambda f: (f.state, f.reason))
    assert exchanges.blown == 1
    # The intent stayed (submitting, its client id); the next attempt asked the exchange by
    # that id, found the transfer and took it for ours: one transfer, not two.
    moved = await operations(database_url, "transfer")
    assert [Decimal(op["amount"]) for op in moved] == [Decimal("0.031")]
    moves = [(e.data["trigger"], e.data["source"]) for e in await store.read_stream(
        flow.stream_id) if e.type == "TaskStateChanged"]
    assert moves[0] == ("submit", "created")
    assert moves[1][1] == "submitting" and moves[1][0] in ("accept", "complete"), moves
    assert "reset" not in [trigger for trigger, _ in moves]  # never given up and resent
    assert flow.tasks[0].state == "done"


async def test_a_waiting_task_is_not_looked_at_before_its_next_poll(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    """A deposit that never comes: after its first look the worker hands it back due at the
    deposit poll (5 s by default, +-20%), and neither steps it nor asks the exchange before."""
    accounts = load_accounts()
    spec = workflow("wait_for_nothing", {}, [
        task("await_nothing", "deposit", account="binance-personal", currency="ETH",
             amount="123.456")], accounts=accounts)
    async with Worker(database_url, world=world_file) as worker:
        budgets = Budgets.lifted()
        engine = Engine(store, worker.world, accounts, owner="poller", budgets=budgets)
        workflow_id, _ = await start_workflow(store, spec, {}, accounts)
        async with engine_running(engine):
            await eventually(lambda: load(store, workflow_id),
                             lambda f: f.tasks[0].state == "requested", timeout=10,
                             what="the deposit task watching")
            await asyncio.sleep(0.5)
            calls = sum(b.granted for b in budgets)
            row = await schedule_row(database_url, workflow_id)
            assert row is not None and row["later"] is True and row["claimed_by"] is None
            await asyncio.sleep(3.0)  # below the poll's shortest (4 s)
            assert sum(b.granted for b in budgets) == calls
            version = (await load(store, workflow_id)).version
            # Then it is looked at again (and asks the exchange), without appending anything.
            await eventually(lambda: asyncio.sleep(0.1, sum(b.granted for b in budgets)),
                             lambda n: n > calls, timeout=10, what="the next poll")
            assert (await load(store, workflow_id)).version == version
