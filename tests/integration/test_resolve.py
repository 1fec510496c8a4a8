"""Resolving a withdrawal nobody can match with the facts the exchange shows: the next deposit
matches on the recorded txid and the workflow ends done."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from events.store import EventStore
from projections.alerts import pending_alerts
from projections.runner import ProjectionRunner, default_projections
from projections.workflows import TaskView
from rebalancer.alerts import body_of
from rebalancer.api import Api
from rebalancer.cli.reports import attention_text
from rebalancer.commands import start_workflow
from rebalancer.exchanges.base import OrderRequest, OrderType, Side, WithdrawRequest
from rebalancer.specs.builders import task, workflow
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.models import WorkflowSpec
from rebalancer.workflow import client_id
from tests.support import Worker, load, operations, withdraw_once, write_world

SCALE = 1000.0
SOURCE, DEST = "upbit-personal", "binance-personal"
FUNDING = OrderRequest("funding-1", "ETH/KRW", Side.BUY, OrderType.MARKET,
                       quote_amount=Decimal(1_000_000))


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"))


def withdraw_then_deposit(accounts: Any) -> WorkflowSpec:
    """The built-in path's hop: a withdrawal, then its deposit recognised by txid and amount."""
    return workflow(
        "withdraw_then_deposit", {"amount": "amount"},
        [
            task("withdraw_x", "withdraw", from_account=SOURCE, to_account=DEST,
                 currency="ETH", amount="{amount}", network="ETH"),
            task("deposit_x", "deposit", account=DEST, currency="ETH", from_account=SOURCE,
                 txid="{$.withdraw_x.refresh_result.result.txid}",
                 amount="{$.withdraw_x.refresh_result.result.received}"),
        ],
        accounts=accounts,
    )


async def ask(api: Api, command: str, **body: Any) -> dict[str, Any]:
    return await api.handle(f"rebalancer.cmd.{command}", json.dumps(body).encode())


async def test_an_ambiguous_withdrawal_resolved_with_its_txid_lets_the_deposit_match(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with (
        Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as healthy,
        Worker(database_url, world=world_file, time_scale=SCALE, owner="lossy",
               faults="lost_response=1.0") as lossy,
    ):
        port = healthy.world.for_account(SOURCE)
        # Enough ETH for two withdrawals.
        await port.create_order(FUNDING)
        await port.create_order(dataclasses.replace(FUNDING, client_id="funding-2"))
        workflow_id, _ = await start_workflow(
            store, withdraw_then_deposit(healthy.accounts), {"amount": "0.2"}, healthy.accounts)
        assert await lossy.step(workflow_id) == "moved"  # started
        # Our withdrawal executes; its answer is lost: the task stays submitting.
        assert await lossy.step(workflow_id) == "retry"
        sent = (await load(store, workflow_id)).tasks[0]
        assert sent.state == "submitting"
        params = sent.request_params or {}
        # Somebody sends an identical withdrawal by hand: Upbit keeps no client id, so the
        # history holds two that could be ours.
        await port.withdraw(WithdrawRequest(
            client_id="by-hand", currency="ETH", amount=Decimal(params["amount"]),
            address=params["address"], network=params["network"],
            tag=params["tag"]))
        events = await healthy.step_until_moved(workflow_id)
        assert [(e.data["trigger"], e.data["dest"]) for e in events] == [
            ("escalate", "needs_attention")]
        error = events[0].data["error"]
        assert "cannot tell which one is ours" in error["message"]
        ours_id = client_id(workflow_id, 0, 1)
        [ours] = [op for op in await operations(database_url, "withdraw")
                  if op["audit_ref"] == ours_id]
        [by_hand] = [op for op in await operations(database_url, "withdraw")
                     if op["audit_ref"] != ours_id]
        stuck = await healthy.drive(workflow_id, until=("needs_attention",))
        assert stuck.tasks[0].state == "needs_attention"

        # The attention lists both candidates, unclaimed, and the commands that settle it.
        assert sorted((c["id"], c["claimed_by_workflow"]) for c in error["candidates"]) == sorted(
            [(str(ours["id"]), None), (str(by_hand["id"]), None)])
        assert all(Decimal(c["amount"]) == Decimal(params["amount"]) and c["at"]
                   for c in error["candidates"])
        where = f"rebalancer resolve {workflow_id} withdraw_x"
        ours_command = next(c for c in error["commands"] if f"id={ours['id']} " in c)
        assert ours_command.startswith(f"{where} --outcome done --result id={ours['id']}")
        assert len(error["commands"]) == 3 and error["commands"][-1].startswith(
            f"{where} --outcome failed")
        # `status ID` shows them under the task.
        shown = attention_text(TaskView(0, "withdraw_x", "withdraw", stuck.tasks[0].state,
                                        error=stuck.tasks[0].error))
        assert f"id {ours['id']}" in shown and "unclaimed" in shown and ours_command in shown
        # The needs_attention alert carries them too.
        await ProjectionRunner(store, default_projections()).catch_up()
        [alert] = [a for a in await pending_alerts(store) if a["kind"] == "needs_attention"
                   and a["workflow_id"] == workflow_id]
        body = json.loads(body_of(alert))
        assert body["commands"] == error["commands"]
        assert body["candidates"] == error["candidates"]

        api = Api(store, healthy.accounts, builtin_specs, exchanges=healthy.world)
        # A txid the exchange does not report for that id is refused, naming the field.
        refused = await ask(api, "resolve", command_id="r0", workflow_id=workflow_id,
                            task="withdraw_x", outcome="done", note="checked",
                            result={"id": str(ours["id"]), "txid": "ab" * 32})
        assert refused["ok"] is False and refused["error"]["code"] == "invalid_request"
        assert refused["error"]["details"]["field"] == "result.txid"
        # An id that is not this task's withdrawal is refused as well.
        missing = await ask(api, "resolve", command_id="r1", workflow_id=workflow_id,
                            task="withdraw_x", outcome="done", note="checked",
                            result={"id": "999999"})
        assert missing["error"]["details"]["field"] == "result.id"
        # An amount is read by the money parser.
        bad = await ask(api, "resolve", command_id="r2", workflow_id=workflow_id,
                        task="withdraw_x", outcome="done", note="checked",
                        result={"id": str(ours["id"]), "amount": "1e999"})
        assert bad["error"]["details"]["field"] == "result.amount"
        assert (await load(store, workflow_id)).tasks[0].state == "needs_attention"

        # The right facts, as sim.operations shows them.
        reply = await ask(api, "resolve", command_id="r3", workflow_id=workflow_id,
                          task="withdraw_x", outcome="done",
                          note="ours by the audit ref in sim.operations",
                          result={"id": str(ours["id"]), "txid": ours["txid"],
                                  "amount": str(ours["amount"])})
        assert reply == {"ok": True, "workflow_id": workflow_id, "task": "withdraw_x",
                         "state": "done"}
        settled = (await load(store, workflow_id)).tasks[0]
        assert (settled.request_result or {})["id"] == str(ours["id"])
        recorded = (settled.refresh_result or {})["result"]
        assert recorded["txid"] == ours["txid"] and recorded["received"] is not None
        # The same command id with other facts is another command.
        reused = await ask(api, "resolve", command_id="r3", workflow_id=workflow_id,
                           task="withdraw_x", outcome="done", note="ours",
                           result={"id": str(ours["id"])})
        assert reused["error"]["code"] == "conflict"

        assert (await ask(api, "retry", command_id="x1", workflow_id=workflow_id))["ok"]
        done = await healthy.drive(workflow_id, until=("done", "failed"), timeout=20)
        assert done.state == "done", done.reason
        deposit = done.tasks[1]
        assert (deposit.refresh_result or {})["result"]["txid"] == ours["txid"]
        ok, totals = await healthy.world.check()
        assert ok, totals


async def test_retry_from_reopens_a_failed_workflow_with_money_in_transit_and_it_ends_done(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with (
        Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as healthy,
        Worker(database_url, world=world_file, time_scale=SCALE, owner="lossy",
               faults="lost_response=1.0") as lossy,
    ):
        port = healthy.world.for_account(SOURCE)
        await port.create_order(dataclasses.replace(FUNDING, client_id="funding-3"))
        await port.create_order(dataclasses.replace(FUNDING, client_id="funding-4"))
        workflow_id, _ = await start_workflow(
            store, withdraw_then_deposit(healthy.accounts), {"amount": "0.2"}, healthy.accounts,
            command_id="reopen-start")
        assert await lossy.step(workflow_id) == "moved"
        assert await lossy.step(workflow_id) == "retry"
        params = (await load(store, workflow_id)).tasks[0].request_params or {}
        await port.withdraw(WithdrawRequest(
            client_id="by-hand-2", currency="ETH", amount=Decimal(params["amount"]),
            address=params["address"], network=params["network"], tag=params["tag"]))
        await healthy.drive(workflow_id, until=("needs_attention",))
        api = Api(store, healthy.accounts, builtin_specs, exchanges=healthy.world)
        # Declared done without its facts (as before --result): the deposit cannot render its
        # txid and the workflow fails with the ETH in transit.
        assert (await ask(api, "resolve", command_id="q1", workflow_id=workflow_id,
                          task="withdraw_x", outcome="done", note="it went"))["ok"]
        failed = await healthy.drive(workflow_id, until=("failed", "done"))
        assert failed.state == "failed"
        assert "has not recorded refresh_result.result.txid" in failed.reason

        # from_task is for retry only; an unknown task is not found.
        wrong = await ask(api, "pause", command_id="q2", workflow_id=workflow_id,
                          from_task="withdraw_x")
        assert wrong["error"]["code"] == "invalid_request"
        missing = await ask(api, "retry", command_id="q3", workflow_id=workflow_id,
                            from_task="nope")
        assert missing["error"]["code"] == "not_found"
        # Re-opened at the withdrawal: it goes back to needs_attention, the deposit to created.
        reply = await ask(api, "retry", command_id="q4", workflow_id=workflow_id,
                          from_task="withdraw_x", reason="txid never recorded")
        assert reply == {"ok": True, "workflow_id": workflow_id, "state": "running",
                         "task": "withdraw_x", "task_state": "needs_attention"}
        reopened = await load(store, workflow_id)
        assert [t.state for t in reopened.tasks] == ["needs_attention", "created"]
        # It lists the commands that fit it: no exchange id was ever recorded, so a resend
        # only after the check its note names (tasks/remedies.py), or failed.
        where = f"rebalancer resolve {workflow_id} withdraw_x"
        commands = (reopened.tasks[0].error or {})["commands"]
        assert [c.split(" --note")[0] for c in commands] == [
            f"{where} --outcome resend", f"{where} --outcome failed"]
        assert "checked: no withdraw of" in commands[0]
        stuck = await healthy.drive(workflow_id, until=("needs_attention",))
        assert stuck.state == "needs_attention"

        [ours] = [op for op in await operations(database_url, "withdraw")
                  if op["audit_ref"] == client_id(workflow_id, 0, 1)]
        assert (await ask(api, "resolve", command_id="q5", workflow_id=workflow_id,
                          task="withdraw_x", outcome="done", note="ours by audit ref",
                          result={"id": str(ours["id"]), "txid": ours["txid"]}))["ok"]
        done = await healthy.drive(workflow_id, until=("done", "failed"), timeout=20)
        assert done.state == "done", done.reason
        # Only a failed workflow is re-opened.
        again = await ask(api, "retry", command_id="q6", workflow_id=workflow_id,
                          from_task="withdraw_x")
        assert again["error"]["code"] == "illegal_transition"
        ok, totals = await healthy.world.check()
        assert ok, totals


async def test_retry_from_is_refused_where_a_later_task_recorded_a_request(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as w:
        await w.world.for_account(SOURCE).create_order(
            dataclasses.replace(FUNDING, client_id="funding-5"))
        spec = workflow(
            "withdraw_then_ghost", {"amount": "amount"},
            [task("withdraw_x", "withdraw", from_account=SOURCE, to_account=DEST,
                  currency="ETH", amount="{amount}", network="ETH"),
             task("ghost_deposit", "deposit", account=DEST, currency="ETH",
                  amount="123.45678", deadline_seconds=0.3)],
            accounts=w.accounts,
        )
        workflow_id, _ = await start_workflow(store, spec, {"amount": "0.2"}, w.accounts,
                                              command_id="ghost-start")
        await w.drive(workflow_id, until=("needs_attention",), timeout=20)
        api = Api(store, w.accounts, builtin_specs, exchanges=w.world)
        assert (await ask(api, "resolve", command_id="g1", workflow_id=workflow_id,
                          task="ghost_deposit", outcome="failed", note="never came"))["ok"]
        failed = await w.drive(workflow_id, until=("failed",))
        assert failed.tasks[1].request_params is not None  # it watched: a request recorded

        refused = await ask(api, "retry", command_id="g2", workflow_id=workflow_id,
                            from_task="withdraw_x")
        assert refused["error"]["code"] == "conflict"
        assert refused["error"]["details"]["task"] == "ghost_deposit"
        assert "ghost_deposit already recorded a request" in refused["error"]["message"]
        assert (await load(store, workflow_id)).state == "failed"  # nothing appended
        # At the later task itself it is re-opened: the failed deposit watches again.
        reply = await ask(api, "retry", command_id="g3", workflow_id=workflow_id,
                          from_task="ghost_deposit")
        assert (reply["state"], reply["task_state"]) == ("running", "created")


async def test_the_attention_names_the_workflow_that_claimed_an_identical_withdrawal(
    database_url: str, store: EventStore, world_file: Path
) -> None:
    async with (
        Worker(database_url, world=world_file, time_scale=SCALE, owner="healthy") as healthy,
        Worker(database_url, world=world_file, time_scale=SCALE, owner="lossy",
               faults="lost_response=1.0") as lossy,
    ):
        port = healthy.world.for_account(SOURCE)
        for n in (6, 7, 8):
            await port.create_order(dataclasses.replace(FUNDING, client_id=f"funding-{n}"))
        params = {"from_account": SOURCE, "to_account": DEST, "amount": "0.2"}
        theirs_id, _ = await start_workflow(store, withdraw_once(healthy.accounts), params,
                                            healthy.accounts, command_id="claim-a")
        theirs = await healthy.drive(theirs_id, until=("done",), timeout=20)
        claimed = (theirs.tasks[0].request_result or {})["id"]

        workflow_id, _ = await start_workflow(store, withdraw_once(healthy.accounts), params,
                                              healthy.accounts, command_id="claim-b")
        assert await lossy.step(workflow_id) == "moved"
        assert await lossy.step(workflow_id) == "retry"
        sent = (await load(store, workflow_id)).tasks[0].request_params or {}
        await port.withdraw(WithdrawRequest(
            client_id="by-hand-3", currency="ETH", amount=Decimal(sent["amount"]),
            address=sent["address"], network=sent["network"], tag=sent["tag"]))
        [event] = await healthy.step_until_moved(workflow_id)
        error = event.data["error"]
        by_claim = {c["id"]: c["claimed_by_workflow"] for c in error["candidates"]}
        assert by_claim[claimed] == theirs_id
        assert sum(1 for owner in by_claim.values() if owner is None) == 2
        # No command offers the claimed one as ours.
        assert not any(f"id={claimed} " in c for c in error["commands"])
        assert len(error["commands"]) == 3
