"""Stopping safely (issue 13, part 3), as an operator does it: `rebalancer cancel` / `pause` /
`resume` from the command line against a real API over NATS and PostgreSQL, a worker driving
the workflow on the stateful simulated world, and `rebalancer sim check` at the end.

- cancel between TWAP slices (of a paused workflow): no further slice, the workflow
  `canceled`, the unspent KRW a remainder;
- cancel with a resting limit order: the order is canceled on the exchange, what filled is
  settled, nothing stays reserved;
- a paused workflow's resting order is still followed to done, and no next task starts;
- cancel from needs_attention is refused (exit 3) naming the `resolve` commands;
- a cancel interrupted by a crash, and one whose answer was lost, is finished after a restart
  by reading the order back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import Accounts
from rebalancer.commands import start_workflow
from rebalancer.specs.builders import task, twap_trade, workflow
from rebalancer.specs.models import WorkflowSpec
from rebalancer.workflow import Workflow
from tests.support import Worker, load, operations, write_world
from tests.support.command_line import api_on_nats, cli
from tests.support.waiting import eventually

D = Decimal
SCALE = 1000.0
ACCOUNT = "upbit-personal"
# Below the ask (4,001,000 KRW): a limit buy at this price rests in the book.
RESTING_PRICE = "3900000"


@pytest.fixture
async def env(store: EventStore, database_url: str, nats_url: str,
              tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """The command line's environment, with the API answering on NATS."""
    async with api_on_nats(store, database_url, nats_url, tmp_path / "home") as env:
        yield env


def world(directory: Path, limit_fill_seconds: float) -> Path:
    return write_world(directory, delays={"limit_fill_seconds": limit_fill_seconds})


def limit_buy(name: str = "buy", **extra: Any) -> Any:
    return task(name, "trade", account=ACCOUNT, side="buy", order_type="limit",
                base_currency="ETH", quote_currency="KRW", amount="0.1", price=RESTING_PRICE,
                **extra)


def market_buy(name: str, krw: str) -> Any:
    return task(name, "trade", account=ACCOUNT, side="buy", order_type="market",
                base_currency="ETH", quote_currency="KRW", quote_amount=krw)


async def started(store: EventStore, spec: WorkflowSpec, accounts: Accounts) -> str:
    workflow_id, _ = await start_workflow(store, spec, {}, accounts)
    return workflow_id


async def until(worker: Worker, workflow_id: str, done: Callable[[Workflow], bool],
                what: str, timeout: float = 20.0) -> Workflow:
    """Step the workflow until its stored events satisfy `done`."""

    async def stepped() -> Workflow:
        flow = await load(worker.store, workflow_id)
        if not done(flow):
            await worker.step(workflow_id)
            flow = await load(worker.store, workflow_id)
        return flow

    return await eventually(stepped, done, timeout=timeout, interval=0.01, what=what,
                            describe=lambda f: (f.state, [t.state for t in f.tasks]))


async def sim_rows(database_url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as conn:
        return await (await conn.execute(sql, args)).fetchall()


async def nothing_open_or_reserved(database_url: str) -> None:
    """No order rests on the simulated exchange and nothing of the account stays reserved."""
    assert await sim_rows(database_url, "select id from sim.operations"
                          " where kind = 'order' and status = 'open'") == []
    locked = await sim_rows(database_url, "select currency, locked from sim.balances"
                            " where account = %s and locked <> 0", ACCOUNT)
    assert locked == []


async def sim_check_holds(env: dict[str, str]) -> None:
    code, out, err = await cli(env, "sim", "check")
    assert code == 0, (out, err)


def remainders(flow: Workflow) -> list[dict[str, Any]]:
    return list(((flow.tasks[0].refresh_result or {}).get("extra") or {}).get("remainders"))


async def test_cancel_between_twap_slices_sends_no_further_slice(
    database_url: str, store: EventStore, env: dict[str, str], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with Worker(database_url, world=world(tmp_path, 10), time_scale=SCALE) as worker:
        # Four market slices an hour apart: after the first, the trade waits for the next.
        spec = workflow("twap_buy", {}, [twap_trade(
            "buy", slices=4, interval_seconds=3600, account=ACCOUNT, side="buy",
            order_type="market", base_currency="ETH", quote_currency="KRW",
            quote_amount="400000")], accounts=worker.accounts)
        workflow_id = await started(store, spec, worker.accounts)
        flow = await until(worker, workflow_id, lambda f: f.tasks[0].state == "requested",
                           "the first slice filled")
        assert await worker.step(workflow_id) == "idle"  # waiting for the next slice

        # Paused first (no next slice would go out either), then canceled.
        code, out, err = await cli(env, "pause", workflow_id[:8])
        assert code == 0, err
        code, out, err = await cli(env, "cancel", workflow_id[:8], "--reason", "market moved")
        assert code == 0, err
        assert out.strip() == f"{workflow_id}: paused (task buy: canceling)"

        flow = await until(worker, workflow_id, lambda f: f.state == "canceled", "canceled")
        trade = flow.tasks[0]
        assert trade.state == "canceled"
        assert trade.error is not None and trade.error["code"] == "canceled"
        assert trade.error["message"] == "market moved"
        moves = [(e.data.get("task_name", "_workflow"), e.data["source"], e.data["dest"])
                 for e in (await store.read_stream(f"workflow-{workflow_id}"))[-3:]]
        assert moves == [("buy", "requested", "canceling"), ("buy", "canceling", "canceled"),
                         ("_workflow", "paused", "canceled")]
        # The operator's command and each move are one log line each.
        short = workflow_id[:8]
        assert f"command cancel {short} buy: ok, paused, task canceling" in caplog.text
        assert f"workflow {short} buy: canceling -> canceled" in caplog.text
        assert f"workflow {short} _workflow: paused -> canceled" in caplog.text
        # One slice went out; none after the cancel.
        orders = await operations(database_url, "order")
        assert len(orders) == 1
        extra = (trade.refresh_result or {})["extra"]
        assert [s["status"] for s in extra["slices"]] == ["closed"]
        assert extra["slices_planned"] == 4
        # What the three slices never sent stays on the account as a remainder: the KRW the
        # spec gave less what the one slice took (its fee included).
        [left] = remainders(flow)
        assert (left["account"], left["currency"], left["reason"]) == (ACCOUNT, "KRW", "canceled")
        assert D(left["amount"]) == D(400000) - D(extra["cumulative_quote_spent"]) > D(290000)
        assert D(extra["filled_amount"]) == D(extra["cumulative_cost"])  # planned in KRW
        held = (await worker.world.balances())[ACCOUNT]
        assert held["KRW"] == D("10000000000") - D(extra["cumulative_quote_spent"])
        assert await worker.step(workflow_id) == "idle"
        assert len(await operations(database_url, "order")) == 1
        await nothing_open_or_reserved(database_url)
    await sim_check_holds(env)


async def test_cancel_with_a_resting_limit_order_cancels_it_and_settles_what_filled(
    database_url: str, store: EventStore, env: dict[str, str], tmp_path: Path
) -> None:
    # Half fills 8 s after the order, the rest 8 s later: the cancel comes in between.
    async with Worker(database_url, world=world(tmp_path, 8000), time_scale=SCALE) as worker:
        spec = workflow("limit_buy", {}, [limit_buy()], accounts=worker.accounts)
        workflow_id = await started(store, spec, worker.accounts)
        await until(worker, workflow_id, lambda f: f.tasks[0].state == "open", "order resting")
        [order] = await operations(database_url, "order")

        async def half_filled() -> Any:
            await worker.world.balances()  # a call settles what came due
            rows = await sim_rows(database_url, "select amount from sim.operations"
                                  " where id = %s", order["id"])
            return rows[0]["amount"]

        await eventually(half_filled, lambda filled: filled > 0, timeout=20, interval=0.2,
                         what="the first half filled")
        code, out, err = await cli(env, "cancel", workflow_id, "--reason", "price too low")
        assert code == 0, err
        assert "canceling" in out

        flow = await until(worker, workflow_id, lambda f: f.state == "canceled", "canceled")
        trade = flow.tasks[0]
        assert trade.state == "canceled"
        [after] = await operations(database_url, "order")
        assert (after["status"], after["amount"]) == ("canceled", D("0.05"))
        # The fills are recorded as the exchange reports them; the unbought half's KRW is the
        # remainder, and the account holds what it bought.
        result = (trade.refresh_result or {})["result"]
        assert D(result["filled"]) == D("0.05")
        assert D(result["cost"]) == D("0.05") * D(RESTING_PRICE)
        [slice_] = (trade.refresh_result or {})["extra"]["slices"]
        assert slice_["status"] == "canceled"
        [left] = remainders(flow)
        # A buy given in ETH: the KRW its unbought half would have cost at the limit.
        assert left == {"account": ACCOUNT, "currency": "KRW", "reason": "canceled",
                        "amount": left["amount"], "estimated": True}
        assert D(left["amount"]) == D("0.05") * D(RESTING_PRICE)
        extra = (trade.refresh_result or {})["extra"]
        assert (D(extra["planned_amount"]), D(extra["unfilled_amount"])) == (D("0.1"), D("0.05"))
        held = (await worker.world.balances())[ACCOUNT]
        assert held["ETH"] == D("0.05") - D(after["fee"])
        await nothing_open_or_reserved(database_url)
        # `status --json` shows the remainder left on the account.
        await ProjectionRunner(store, default_projections()).catch_up()
        code, out, err = await cli(env, "status", workflow_id, "--json")
        assert code == 0, err
        shown = json.loads(out)
        assert shown["state"] == "canceled"
        assert [(r["account"], r["currency"], D(r["amount"]), r["reason"], r["task"])
                for r in shown["remainders"]] == [
            (ACCOUNT, "KRW", D("0.05") * D(RESTING_PRICE), "canceled", "buy")]
    await sim_check_holds(env)


async def test_a_paused_workflow_follows_its_resting_order_to_done_and_starts_nothing(
    database_url: str, store: EventStore, env: dict[str, str], tmp_path: Path
) -> None:
    async with Worker(database_url, world=world(tmp_path, 3000), time_scale=SCALE) as worker:
        spec = workflow("two_buys", {}, [limit_buy(), market_buy("then_buy", "10000")],
                        accounts=worker.accounts)
        workflow_id = await started(store, spec, worker.accounts)
        await until(worker, workflow_id, lambda f: f.tasks[0].state == "open", "order resting")
        code, out, err = await cli(env, "pause", workflow_id, "--reason", "ops window")
        assert code == 0, err
        assert out.strip() == f"{workflow_id}: paused"

        # The worker's own loop (the schedule, not a hand-picked step) keeps refreshing it.
        async def passed() -> Workflow:
            await worker.engine.run_pass()
            return await load(store, workflow_id)

        flow = await eventually(passed, lambda f: f.tasks[0].state == "done", timeout=30,
                                interval=0.1, what="the resting order followed to done")
        assert flow.state == "paused"
        assert flow.tasks[1].state == "created"
        for _ in range(3):
            await worker.engine.run_pass()
        flow = await load(store, workflow_id)
        assert (flow.state, flow.tasks[1].state) == ("paused", "created")
        assert len(await operations(database_url, "order")) == 1  # no next task was sent

        code, _, err = await cli(env, "resume", workflow_id)
        assert code == 0, err
        flow = await worker.drive(workflow_id)
        assert flow.state == "done"
        assert len(await operations(database_url, "order")) == 2
        await nothing_open_or_reserved(database_url)
    await sim_check_holds(env)


async def test_cancel_from_needs_attention_is_refused_naming_the_resolve_commands(
    database_url: str, store: EventStore, env: dict[str, str], tmp_path: Path
) -> None:
    # The order rests for ever; its task passes a one-second deadline and goes to an operator.
    async with Worker(database_url, world=world(tmp_path, 10_000_000),
                      time_scale=SCALE) as worker:
        spec = workflow("limit_buy", {}, [limit_buy(deadline_seconds=1)],
                        accounts=worker.accounts)
        workflow_id = await started(store, spec, worker.accounts)
        await until(worker, workflow_id, lambda f: f.tasks[0].state == "open", "order resting")
        await until(worker, workflow_id, lambda f: f.state == "needs_attention",
                    "the deadline passed")
        before = await store.stream_version(f"workflow-{workflow_id}")

        code, out, err = await cli(env, "cancel", workflow_id)
        assert code == 3, (out, err)
        # The deadline's own commands (tasks/remedies.py): the resting order is settled, done
        # with what filled or failed once canceled on the exchange; never resent.
        commands = ((await load(store, workflow_id)).tasks[0].error or {})["commands"]
        where = f"rebalancer resolve {workflow_id} buy"
        assert [c.split(" --note")[0] for c in commands] == [
            f"{where} --outcome done", f"{where} --outcome failed"]
        for command in commands:
            assert command in err
        assert "money may have moved" in err
        assert await store.stream_version(f"workflow-{workflow_id}") == before
        assert (await load(store, workflow_id)).state == "needs_attention"


async def test_a_paused_workflow_whose_order_gets_stuck_goes_to_an_operator_at_once(
    database_url: str, store: EventStore, env: dict[str, str], tmp_path: Path
) -> None:
    # Paused while its order rests for ever: the task passes its deadline while paused, and
    # the workflow must say so now (the queue, the alert), not at some later resume.
    async with Worker(database_url, world=world(tmp_path, 10_000_000),
                      time_scale=SCALE) as worker:
        spec = workflow("limit_buy", {}, [limit_buy(deadline_seconds=1)],
                        accounts=worker.accounts)
        workflow_id = await started(store, spec, worker.accounts)
        await until(worker, workflow_id, lambda f: f.tasks[0].state == "open", "order resting")
        code, _, err = await cli(env, "pause", workflow_id, "--reason", "ops window")
        assert code == 0, err

        async def passed() -> Workflow:
            await worker.engine.run_pass()
            return await load(store, workflow_id)

        flow = await eventually(passed, lambda f: f.state == "needs_attention", timeout=30,
                                interval=0.1, what="the paused workflow escalated")
        assert flow.tasks[0].state == "needs_attention"
        assert (flow.tasks[0].error or {}).get("code") == "deadline"
        code, out, err = await cli(env, "status", workflow_id, "--json")
        assert code == 0, err
        assert json.loads(out)["state"] == "needs_attention"


async def test_a_cancel_interrupted_by_a_crash_or_a_lost_answer_is_finished_after_restart(
    database_url: str, store: EventStore, env: dict[str, str], tmp_path: Path
) -> None:
    path = world(tmp_path, 10_000_000)  # the order would rest for ever
    async with Worker(database_url, world=path, time_scale=SCALE, owner="first") as first:
        spec = workflow("limit_buy", {}, [limit_buy()], accounts=first.accounts)
        workflow_id = await started(store, spec, first.accounts)
        await until(first, workflow_id, lambda f: f.tasks[0].state == "open", "order resting")
        code, _, err = await cli(env, "cancel", workflow_id)
        assert code == 0, err
        # The service dies right after the cancel was recorded, before asking the exchange.
        await first.restart()
        assert (await load(store, workflow_id)).tasks[0].state == "canceling"
        [order] = await operations(database_url, "order")
        assert order["status"] == "open"

    # The restarted worker's cancel executes on the exchange but its answer is lost.
    async with Worker(database_url, world=path, time_scale=SCALE, owner="lossy",
                      faults="lost_response=1.0") as lossy:
        assert await lossy.step(workflow_id) == "retry"
    assert (await load(store, workflow_id)).tasks[0].state == "canceling"
    [order] = await operations(database_url, "order")
    assert order["status"] == "canceled"

    # The next one reads the order back (never cancels blind) and ends the task.
    async with Worker(database_url, world=path, time_scale=SCALE, owner="healthy") as healthy:
        flow = await until(healthy, workflow_id, lambda f: f.state == "canceled", "canceled")
        trade = flow.tasks[0]
        assert trade.state == "canceled"
        assert (trade.refresh_result or {})["extra"]["slices"][0]["status"] == "canceled"
        [left] = remainders(flow)
        assert (left["currency"], D(left["amount"])) == ("KRW", D("0.1") * D(RESTING_PRICE))
        await nothing_open_or_reserved(database_url)
    await sim_check_holds(env)


async def test_a_paused_twap_sends_no_next_slice_until_resumed(
    database_url: str, store: EventStore, env: dict[str, str], tmp_path: Path
) -> None:
    async with Worker(database_url, world=world(tmp_path, 10), time_scale=SCALE) as worker:
        # No interval: unpaused, each slice would go at the very next step.
        spec = workflow("twap_now", {}, [twap_trade(
            "buy", slices=3, interval_seconds=0, account=ACCOUNT, side="buy",
            order_type="market", base_currency="ETH", quote_currency="KRW",
            quote_amount="300000")], accounts=worker.accounts)
        workflow_id = await started(store, spec, worker.accounts)
        await until(worker, workflow_id, lambda f: f.tasks[0].state == "requested",
                    "the first slice filled")
        code, _, err = await cli(env, "pause", workflow_id)
        assert code == 0, err
        for _ in range(5):
            await worker.engine.run_pass()
        flow = await load(store, workflow_id)
        assert (flow.state, flow.tasks[0].state) == ("paused", "requested")
        assert len(await operations(database_url, "order")) == 1

        code, _, err = await cli(env, "resume", workflow_id)
        assert code == 0, err
        flow = await worker.drive(workflow_id)
        assert flow.state == "done"
        assert len(await operations(database_url, "order")) == 3
    await sim_check_holds(env)
