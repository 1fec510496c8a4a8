"""Every needs_attention is actionable (issue 13, part 4): a deposit past its deadline lists the
deposits the account shows with the workflows that claimed them, a task escalated by the
worker's bulkhead names the command that sends it once fixed, a lost answer the exchange
cannot settle names the checked resend; `status ID --json`, the table and the alert show the
same, and the printed command, run through the command line, is accepted. Real PostgreSQL,
NATS (the API the command line talks to), the simulated world."""

from __future__ import annotations

import dataclasses
import json
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from events.store import EventStore
from events.vocabulary import TaskKind
from projections.alerts import pending_alerts
from projections.runner import ProjectionRunner, default_projections
from rebalancer import engine as engine_module
from rebalancer.alerts import body_of
from rebalancer.commands import start_workflow
from rebalancer.errors import UnknownOutcomeError
from rebalancer.exchanges.base import (
    Deposit,
    Order,
    OrderRequest,
    OrderType,
    Side,
    Transfer,
    TransferStatus,
    WithdrawRequest,
)
from rebalancer.specs.builders import task, workflow
from rebalancer.tasks.base import Processor, TaskContext
from rebalancer.tasks.deposit import DepositProcessor
from rebalancer.tasks.trade import TradeProcessor
from rebalancer.tasks.transfer import TransferProcessor
from tests.support import (
    Worker,
    engine_running,
    eventually,
    load,
    operations,
    to_futures,
    write_world,
)
from tests.support.command_line import api_on_nats, cli, run_command

SCALE = 1000.0
SOURCE, DEST = "upbit-personal", "binance-personal"
FUNDING = OrderRequest("attn-funding-1", "ETH/KRW", Side.BUY, OrderType.MARKET,
                       quote_amount=Decimal(1_000_000))
NEVER = "ab" * 32  # a txid no deposit has


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"),
                       balances={"binance-corp-sub": {"ETH": "10"}})


def command_line(store: EventStore, worker: Worker, database_url: str, nats_url: str,
                 home: Path) -> AbstractAsyncContextManager[dict[str, str]]:
    """The command line's environment, with the API answering on NATS and asking the world."""
    return api_on_nats(store, database_url, nats_url, home, accounts=worker.accounts,
                       exchanges=worker.world)


async def shown_everywhere(store: EventStore, env: dict[str, str], workflow_id: str,
                           task_name: str, error: dict[str, Any], kind: str) -> None:
    """`status ID --json`, the table and the alert carry the error's candidates and commands."""
    await ProjectionRunner(store, default_projections()).catch_up()
    code, out, err = await cli(env, "status", workflow_id, "--json")
    assert code == 0, err
    [shown] = [t for t in json.loads(out)["tasks"] if t["name"] == task_name]
    assert shown["state"] == "needs_attention"
    assert shown["error"]["commands"] == error["commands"]
    assert shown["error"].get("candidates") == error.get("candidates")
    code, out, err = await cli(env, "status", workflow_id)
    assert code == 0, err
    assert f"attention {task_name}" in out and "  settle with one of:\n" in out
    for command in error["commands"]:
        assert f"    {command}\n" in out
    [alert] = [a for a in await pending_alerts(store)
               if a["workflow_id"] == workflow_id and a["task"] == task_name]
    assert alert["kind"] == kind
    body = json.loads(body_of(alert))
    assert body["commands"] == error["commands"]
    assert body.get("candidates") == (error.get("candidates") or None)


async def test_a_deposit_past_its_deadline_lists_the_deposits_seen_and_who_claimed_them(
    database_url: str, nats_url: str, store: EventStore, world_file: Path, tmp_path: Path
) -> None:
    async with Worker(database_url, world=world_file, time_scale=SCALE) as worker:
        port = worker.world.for_account(SOURCE)
        for n in (1, 2):
            await port.create_order(dataclasses.replace(FUNDING, client_id=f"attn-funding-{n}"))
        hop = workflow("attn_hop", {"amount": "amount"}, [
            task("withdraw_x", "withdraw", from_account=SOURCE, to_account=DEST,
                 currency="ETH", amount="{amount}", network="ETH"),
            task("deposit_x", "deposit", account=DEST, currency="ETH", from_account=SOURCE,
                 txid="{$.withdraw_x.refresh_result.result.txid}",
                 amount="{$.withdraw_x.refresh_result.result.received}"),
        ], accounts=worker.accounts)
        claimer, _ = await start_workflow(store, hop, {"amount": "0.2"}, worker.accounts)
        claimed = await worker.drive(claimer, until=("done",), timeout=30)
        claimed_txid = (claimed.tasks[1].refresh_result or {})["result"]["txid"]
        sent = claimed.tasks[0].request_params or {}
        # Somebody sends ETH by hand: a deposit no workflow recorded as its own.
        await port.withdraw(WithdrawRequest(
            client_id="attn-by-hand", currency="ETH", amount=Decimal("0.15"),
            address=sent["address"], network=sent["network"], tag=sent["tag"]))
        since = (claimed.created_at or claimed.tasks[0].started_at)
        assert since is not None
        binance = worker.world.for_account(DEST)
        deposits = await eventually(
            lambda: binance.fetch_deposits("ETH", since - timedelta(minutes=5)),
            lambda ds: len([d for d in ds if d.status == TransferStatus.OK]) == 2,
            timeout=30, what="both deposits credited")
        [by_hand] = [d for d in deposits if d.txid != claimed_txid]

        waits = workflow("attn_wait", {}, [
            task("await_x", "deposit", deadline_seconds=1, account=DEST, currency="ETH",
                 from_account=SOURCE, txid=NEVER)], accounts=worker.accounts)
        workflow_id, _ = await start_workflow(store, waits, {}, worker.accounts)
        stuck = await worker.drive(workflow_id, until=("needs_attention",), timeout=30)
        error = stuck.tasks[0].error or {}
        assert error["code"] == "deadline" and "await_x passed its deadline" in error["message"]
        owners = {c["txid"]: c["claimed_by_workflow"] for c in error["candidates"]}
        assert owners == {claimed_txid: claimer, by_hand.txid: None}
        for c in error["candidates"]:
            assert c["id"] and c["at"] and Decimal(c["amount"]) > 0
        where = f"rebalancer resolve {workflow_id} await_x"
        assert [c.split(" --note")[0] for c in error["commands"]] == [
            f"{where} --outcome done --result txid={by_hand.txid}",
            f"{where} --outcome resend", f"{where} --outcome failed"]

        async with command_line(store, worker, database_url, nats_url, tmp_path) as env:
            await shown_everywhere(store, env, workflow_id, "await_x", error, "task_stuck")
            before = await store.stream_version(f"workflow-{workflow_id}")
            # Declared done with no facts while the exchange shows no such deposit: refused,
            # or the money would be called arrived where nobody sees it.
            code, _, err = await cli(env, "resolve", workflow_id, "await_x", "--outcome",
                                     "done", "--note", "looks fine")
            assert code == 2, err
            assert f"{DEST} shows no credited ETH deposit matching task await_x" in err
            assert "--result txid=" in err
            # Nor is a resolve without a word of why taken.
            code, _, err = await cli(env, "resolve", workflow_id, "await_x", "--outcome",
                                     "failed", "--note", " ")
            assert code == 2 and "note" in err, err
            assert await store.stream_version(f"workflow-{workflow_id}") == before
            # The first command, as printed: looked up on the exchange, and accepted.
            code, _, err = await run_command(env, error["commands"][0])
            assert code == 0, err
        settled = (await load(store, workflow_id)).tasks[0]
        assert settled.state == "done"
        assert (settled.refresh_result or {})["result"]["txid"] == by_hand.txid


class Broken(Processor):
    """A transfer processor with a bug: every step raises before anything is sent."""

    kind = TaskKind.TRANSFER

    async def step(self, ctx: TaskContext) -> None:
        raise ZeroDivisionError("a bug in the transfer processor")

    async def request(self, ctx: TaskContext) -> None:
        raise AssertionError("not reached")

    async def refresh(self, ctx: TaskContext) -> None:
        raise AssertionError("not reached")


async def test_an_internal_error_names_the_resend_that_sends_it_once_fixed(
    database_url: str, nats_url: str, store: EventStore, world_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fixed = engine_module.PROCESSORS[TaskKind.TRANSFER]
    monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.TRANSFER, Broken())  # type: ignore[index]
    async with Worker(database_url, world=world_file, time_scale=SCALE) as worker:
        workflow_id, _ = await start_workflow(
            store, to_futures(worker.accounts), {"account": "binance-corp-sub", "amount": "0.5"},
            worker.accounts)
        async with engine_running(worker.engine):
            stuck = await eventually(lambda: load(store, workflow_id),
                                     lambda w: w.state == "needs_attention", timeout=30,
                                     what="the broken transfer handed to an operator")
        error = stuck.tasks[0].error or {}
        assert error["code"] == "internal" and "ZeroDivisionError" in error["message"]
        where = f"rebalancer resolve {workflow_id} move_to_futures"
        # Nothing was sent: resend sends it, failed gives up; no candidates to list.
        assert [c.split(" --note")[0] for c in error["commands"]] == [
            f"{where} --outcome resend", f"{where} --outcome failed"]
        assert "candidates" not in error
        async with command_line(store, worker, database_url, nats_url, tmp_path) as env:
            await shown_everywhere(store, env, workflow_id, "move_to_futures", error,
                                   "needs_attention")
            monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.TRANSFER,  # type: ignore[index]
                                fixed)
            code, out, err = await run_command(env, error["commands"][0])
            assert code == 0, err
        assert "move_to_futures: created" in out
        async with engine_running(worker.engine):
            done = await eventually(lambda: load(store, workflow_id),
                                    lambda w: w.state in ("done", "failed"), timeout=30,
                                    what="the resent transfer done")
        assert done.state == "done", done.reason


class Unanswerable(TransferProcessor):
    """The exchange's history cannot say whether the transfer landed (a truncated page, two
    rows carrying one id): the look-up raises, and the reconcile hands it to an operator."""

    async def lookup(self, ctx: TaskContext) -> Transfer | None:
        raise UnknownOutcomeError("the transfer history cannot say")


async def test_a_lost_answer_nobody_can_settle_names_the_checked_resend(
    database_url: str, nats_url: str, store: EventStore, world_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with (
        Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as worker,
        Worker(database_url, world=world_file, time_scale=SCALE, owner="lossy",
               faults="timeout=1.0") as lossy,
    ):
        workflow_id, _ = await start_workflow(
            store, to_futures(worker.accounts), {"account": "binance-corp-sub", "amount": "0.25"},
            worker.accounts)
        assert await lossy.step(workflow_id) == "moved"
        # The transfer call times out: nothing executed, but the worker cannot know that.
        assert await lossy.step(workflow_id) == "retry"
        sent = (await load(store, workflow_id)).tasks[0]
        assert sent.state == "submitting"
        fixed = engine_module.PROCESSORS[TaskKind.TRANSFER]
        monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.TRANSFER,  # type: ignore[index]
                            Unanswerable())
        [event] = await worker.step_until_moved(workflow_id)
        assert (event.data["trigger"], event.data["dest"]) == ("escalate", "needs_attention")
        error = event.data["error"]
        assert error["code"] == "unknown_outcome"
        where = f"rebalancer resolve {workflow_id} move_to_futures"
        # Found submitting: a resend sends it afresh, so its note says what was checked first.
        assert [c.split(" --note")[0] for c in error["commands"]] == [
            f"{where} --outcome resend", f"{where} --outcome failed"]
        assert sent.client_id and sent.client_id in error["commands"][0]
        assert "no transfer of 0.25 ETH" in error["commands"][0]
        monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.TRANSFER,  # type: ignore[index]
                            fixed)
        async with command_line(store, worker, database_url, nats_url, tmp_path) as env:
            await shown_everywhere(store, env, workflow_id, "move_to_futures", error,
                                   "needs_attention")
            code, out, err = await run_command(env, error["commands"][0])
            assert code == 0, err
        assert "move_to_futures: created" in out
        done = await worker.drive(workflow_id, until=("done", "failed"), timeout=30)
        assert done.state == "done", done.reason
        # The timed-out call moved nothing; the resend moved the amount once.
        moved = [op for op in await operations(database_url, "transfer")
                 if Decimal(op["amount"]) == Decimal("0.25")]
        assert len(moved) == 1


class ReturnedPort:
    """An account whose deposits the exchange reports returned (Binance's "wrong deposit"):
    the simulated world's own deposits, their status replaced; everything else passes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def fetch_deposits(self, currency: str, since: datetime) -> list[Deposit]:
        return [dataclasses.replace(d, status=TransferStatus.FAILED, raw_status="rejected")
                for d in await self.inner.fetch_deposits(currency, since)]


class Returned(DepositProcessor):
    async def refresh(self, ctx: TaskContext) -> None:
        inner = ctx.exchanges
        ctx.exchanges = SimpleNamespace(  # type: ignore[assignment]
            for_account=lambda account: ReturnedPort(inner.for_account(account)))
        await super().refresh(ctx)


async def test_a_returned_deposit_lists_itself_and_the_commands_that_settle_it(
    database_url: str, nats_url: str, store: EventStore, world_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Worker(database_url, world=world_file, time_scale=SCALE) as worker:
        port = worker.world.for_account(SOURCE)
        await port.create_order(dataclasses.replace(FUNDING, client_id="attn-funding-3"))
        hop = workflow("attn_returned", {}, [
            task("withdraw_x", "withdraw", from_account=SOURCE, to_account=DEST,
                 currency="ETH", amount="0.1", network="ETH"),
            task("deposit_x", "deposit", account=DEST, currency="ETH", from_account=SOURCE,
                 txid="{$.withdraw_x.refresh_result.result.txid}",
                 amount="{$.withdraw_x.refresh_result.result.received}"),
        ], accounts=worker.accounts)
        fixed = engine_module.PROCESSORS[TaskKind.DEPOSIT]
        monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.DEPOSIT,  # type: ignore[index]
                            Returned())
        workflow_id, _ = await start_workflow(store, hop, {}, worker.accounts)
        stuck = await worker.drive(workflow_id, until=("needs_attention",), timeout=30)
        monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.DEPOSIT,  # type: ignore[index]
                            fixed)
        txid = (stuck.tasks[0].refresh_result or {})["result"]["txid"]
        error = stuck.tasks[1].error or {}
        assert error["code"] == "deposit_failed" and "'rejected'" in error["message"]
        [seen] = error["candidates"]
        assert (seen["txid"], seen["claimed_by_workflow"]) == (txid, None)
        assert seen["id"] and seen["at"] and Decimal(seen["amount"]) > 0
        where = f"rebalancer resolve {workflow_id} deposit_x"
        assert [c.split(" --note")[0] for c in error["commands"]] == [
            f"{where} --outcome done --result txid={txid}",
            f"{where} --outcome resend", f"{where} --outcome failed"]
        async with command_line(store, worker, database_url, nats_url, tmp_path) as env:
            await shown_everywhere(store, env, workflow_id, "deposit_x", error,
                                   "needs_attention")
            # Credited after all (the exchange's support recovered it): done, looked up.
            code, _, err = await run_command(env, error["commands"][0])
            assert code == 0, err
        done = await worker.drive(workflow_id, until=("done", "failed"), timeout=30)
        assert done.state == "done", done.reason


async def test_an_acknowledged_withdrawal_past_its_deadline_is_done_by_its_exchange_id(
    database_url: str, nats_url: str, store: EventStore, world_file: Path, tmp_path: Path
) -> None:
    async with Worker(database_url, world=world_file, time_scale=SCALE) as worker:
        port = worker.world.for_account(SOURCE)
        await port.create_order(dataclasses.replace(FUNDING, client_id="attn-funding-4"))
        spec = workflow("attn_slow_withdraw", {}, [
            task("withdraw_x", "withdraw", deadline_seconds=0.001, from_account=SOURCE,
                 to_account=DEST, currency="ETH", amount="0.05", network="ETH")],
            accounts=worker.accounts)
        workflow_id, _ = await start_workflow(store, spec, {}, worker.accounts)
        stuck = await worker.drive(workflow_id, until=("needs_attention",), timeout=30)
        sent = stuck.tasks[0]
        error = sent.error or {}
        assert error["code"] == "deadline" and sent.intents == 1
        exchange_id = (sent.request_result or {})["id"]
        where = f"rebalancer resolve {workflow_id} withdraw_x"
        # Acknowledged: a resend would send it twice, so none is offered.
        assert [c.split(" --note")[0] for c in error["commands"]] == [
            f"{where} --outcome done --result id={exchange_id}", f"{where} --outcome failed"]
        async with command_line(store, worker, database_url, nats_url, tmp_path) as env:
            await shown_everywhere(store, env, workflow_id, "withdraw_x", error, "task_stuck")
            code, _, err = await run_command(env, error["commands"][0])
            assert code == 0, err
        done = await worker.drive(workflow_id, until=("done", "failed"), timeout=30)
        assert done.state == "done", done.reason
        # The exchange's own record filled what the command left out.
        assert (done.tasks[0].refresh_result or {})["result"]["amount"] is not None
        [ours] = [op for op in await operations(database_url, "withdraw")
                  if str(op["id"]) == str(exchange_id)]
        assert Decimal(ours["amount"]) == Decimal((sent.request_params or {})["amount"])


class Forgetful(TradeProcessor):
    """While canceling, the exchange no longer knows the acknowledged order (an archived
    order, a support desk's manual cancel): the read by client id finds nothing."""

    async def _lookup(self, ctx: TaskContext) -> Order | None:
        if ctx.task.state == "canceling":
            return None
        return await super()._lookup(ctx)


async def test_an_order_gone_while_canceling_is_settled_by_its_order_id(
    database_url: str, nats_url: str, store: EventStore, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resting = write_world(tmp_path, delays={"limit_fill_seconds": 10_000_000})
    async with Worker(database_url, world=resting, time_scale=SCALE) as worker:
        spec = workflow("attn_limit", {}, [task(
            "buy", "trade", account=SOURCE, side="buy", order_type="limit",
            base_currency="ETH", quote_currency="KRW", amount="0.1", price="3900000")],
            accounts=worker.accounts)
        workflow_id, _ = await start_workflow(store, spec, {}, worker.accounts)
        for _ in range(20):
            await worker.step(workflow_id)
            if (await load(store, workflow_id)).tasks[0].state == "open":
                break
        sent = (await load(store, workflow_id)).tasks[0]
        assert sent.state == "open"
        order_id = (sent.request_result or {})["order_id"]
        async with command_line(store, worker, database_url, nats_url, tmp_path) as env:
            code, _, err = await cli(env, "cancel", workflow_id)
            assert code == 0, err
            fixed = engine_module.PROCESSORS[TaskKind.TRADE]
            monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.TRADE,  # type: ignore[index]
                                Forgetful())
            stuck = await worker.drive(workflow_id, until=("needs_attention",), timeout=30)
            monkeypatch.setitem(engine_module.PROCESSORS, TaskKind.TRADE,  # type: ignore[index]
                                fixed)
            error = stuck.tasks[0].error or {}
            assert error["code"] == "unknown_outcome"
            assert "no longer knows it" in error["message"]
            where = f"rebalancer resolve {workflow_id} buy"
            # The order may have filled: settled by hand, never resent.
            assert [c.split(" --note")[0] for c in error["commands"]] == [
                f"{where} --outcome done", f"{where} --outcome failed"]
            assert all(order_id in c for c in error["commands"])
            await shown_everywhere(store, env, workflow_id, "buy", error, "needs_attention")
            # The operator cancels it on the exchange by hand, then says so.
            assert sent.client_id is not None
            await worker.world.for_account(SOURCE).cancel_order(sent.client_id, "ETH/KRW")
            code, _, err = await run_command(env, error["commands"][1])
            assert code == 0, err
        ended = await worker.drive(workflow_id, until=("failed",), timeout=30)
        assert ended.tasks[0].state == "failed"
        ok, totals = await worker.world.check()
        assert ok, totals
