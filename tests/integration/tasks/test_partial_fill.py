"""Partial fills have a policy (issue 13, part 2), as an operator meets them: a TWAP of 4 slices
on an account with money for one. The default (`needs_attention`) parks it with the figures,
the remainder, an alert carrying them and the commands that settle it; `continue` ends done with
a warning alert; `fail` fails; a full fill is unchanged. Real PostgreSQL, NATS (the API the
command line talks to), the simulated world and the `rebalancer` command line in a subprocess.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest

from events.store import EventStore
from projections.alerts import pending_alerts
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import Accounts
from rebalancer.alerts import AlertPublisher, body_of
from rebalancer.commands import reopen_workflow, resolve_task, start_workflow
from rebalancer.specs.builders import task, twap_trade, workflow
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.models import WorkflowSpec
from tests.support import Worker, operations, write_world
from tests.support.command_line import api_on_nats, cli, run_command
from tests.support.worker import SEED_PARAMS, SEED_SPEC

D = Decimal
SCALE = 1000.0
BUDGET = "1000000"  # KRW in 4 slices of 250,000
ONE_SLICE = "300000"  # what the account holds: one slice fills, three are refused for balance
ACCOUNT = "upbit-personal"


@pytest.fixture
async def env(store: EventStore, database_url: str, nats_url: str,
              tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """The command line's environment, with the API answering on NATS."""
    async with api_on_nats(store, database_url, nats_url, tmp_path / "home") as env:
        yield env


def twap_spec(accounts: Accounts, **policy: Any) -> WorkflowSpec:
    # No interval: each slice goes at the next step.
    return workflow(
        "partial_twap", {"account": "account", "budget": "amount"},
        [twap_trade("buy_eth", slices=4, interval_seconds=0, account="{account}", side="buy",
                    order_type="market", base_currency="ETH", quote_currency="KRW",
                    quote_amount="{budget}", **policy)],
        accounts=accounts)


async def start_twap(store: EventStore, worker: Worker, **policy: Any) -> str:
    workflow_id, _ = await start_workflow(
        store, twap_spec(worker.accounts, **policy), {"account": ACCOUNT, "budget": BUDGET},
        worker.accounts)
    return workflow_id


def extra_of(task: Any) -> dict[str, Any]:
    return dict((task.refresh_result or {}).get("extra") or {})


async def project(store: EventStore) -> None:
    await ProjectionRunner(store, default_projections()).catch_up()


async def alerts_of(store: EventStore, workflow_id: str) -> list[dict[str, Any]]:
    return [a for a in await pending_alerts(store) if a["workflow_id"] == workflow_id]


async def krw(worker: Worker) -> Decimal:
    return (await worker.world.balances()).get(ACCOUNT, {}).get("KRW", D(0))


def assert_one_slice_of_four(extra: dict[str, Any]) -> None:
    """The figures of a 1,000,000 KRW TWAP of which one 250,000 KRW slice filled."""
    assert [s["status"] for s in extra["slices"]] == ["closed", "rejected", "rejected",
                                                      "rejected"]
    planned, filled = D(extra["planned_amount"]), D(extra["filled_amount"])
    assert (extra["amount_unit"], extra["amount_currency"]) == ("quote", "KRW")
    assert planned == D(BUDGET)
    assert filled == D(extra["slices"][0]["cost"]) and D(249_000) < filled <= D(250_000)
    assert D(extra["unfilled_amount"]) == planned - filled
    assert D(extra["filled_fraction"]) == (filled / planned).quantize(D("0.0001"))
    # What stays unspent of the 1,000,000 KRW the trade was given: all but what left the
    # account (the order's cost and any fee in KRW).
    [left] = extra["remainders"]
    assert {**left, "amount": D(left["amount"])} == {
        "account": ACCOUNT, "currency": "KRW", "reason": "partial_fill",
        "amount": D(BUDGET) - D(extra["cumulative_quote_spent"])}


async def test_the_seed_twap_with_money_for_one_slice_needs_attention_then_carries_on(
    store: EventStore, database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={ACCOUNT: {"KRW": ONE_SLICE}})
    async with Worker(database_url, world=world, time_scale=SCALE) as worker:
        workflow_id, _ = await start_workflow(
            store, builtin_specs()[SEED_SPEC], {**SEED_PARAMS, "from_amount": BUDGET},
            worker.accounts)
        stuck = await worker.drive(workflow_id, until=("needs_attention", "done", "failed"),
                                   timeout=30)
        assert stuck.state == "needs_attention", stuck.reason
        trade = stuck.tasks[0]
        assert trade.state == "needs_attention"
        assert {t.state for t in stuck.tasks[1:]} == {"created"}  # nothing moved on
        extra = extra_of(trade)
        assert_one_slice_of_four(extra)
        error = trade.error or {}
        assert error["code"] == "partial_fill"
        unfilled = extra["unfilled_amount"]
        bought = format(D(extra["cumulative_amount_excluding_fee"]).normalize(), "f")
        for said in (f"filled {extra['filled_amount']} of {BUDGET} KRW planned",
                     "1 of 4 orders", f"{unfilled} KRW unfilled", "below the 99% required",
                     f"{extra['remainders'][0]['amount']} KRW stays unspent on {ACCOUNT}",
                     f"done carries on with the {bought} ETH bought",
                     f"resend sends the unfilled {unfilled} KRW as one more order",
                     f"failed (or cancel) ends the workflow with both left on {ACCOUNT}"):
            assert said in error["message"], (said, error["message"])
        where = f"rebalancer resolve {workflow_id} buy_in_source_spot"
        assert [c.split(" --note")[0] for c in error["commands"]] == [
            f"{where} --outcome done", f"{where} --outcome resend", f"{where} --outcome failed"]
        assert error["partial_fill"]["policy"] == "needs_attention"
        # Only the one slice's KRW left the account.
        assert await krw(worker) == D(ONE_SLICE) - D(extra["cumulative_quote_spent"])

        await project(store)
        # `status ID --json`: the figures and the remainder, on the task, in fills, left behind.
        code, out, err = await cli(env, "status", workflow_id, "--json")
        assert code == 0, err
        view = json.loads(out)
        assert view["state"] == "needs_attention"
        shown = view["tasks"][0]["refresh_result"]["extra"]
        assert {k: shown[k] for k in ("planned_amount", "filled_amount", "unfilled_amount",
                                      "remainders")} == {
            k: extra[k] for k in ("planned_amount", "filled_amount", "unfilled_amount",
                                  "remainders")}
        [fill] = view["fills"]
        assert (fill["planned_amount"], fill["filled_amount"], fill["unfilled_amount"],
                fill["amount_currency"]) == (extra["planned_amount"], extra["filled_amount"],
                                             unfilled, "KRW")
        [left] = view["remainders"]
        assert left == {**extra["remainders"][0], "task": "buy_in_source_spot"}
        # The table says the same, with the commands under the task.
        code, out, err = await cli(env, "status", workflow_id)
        assert code == 0, err
        assert "KRW on upbit-personal (partial_fill, by buy_in_source_spot)" in out
        assert "attention buy_in_source_spot\n  settle with one of:\n" in out
        for command in error["commands"]:
            assert f"    {command}\n" in out
        # `exposure` lists it as left behind on the account.
        code, out, err = await cli(env, "exposure", "--json")
        assert code == 0, err
        behind = [r for r in json.loads(out)["remainders"] if r["workflow_id"] == workflow_id]
        assert [(r["account"], r["currency"], D(r["amount"]), r["reason"]) for r in behind] == [
            (ACCOUNT, "KRW", D(left["amount"]), "partial_fill")]
        # The needs_attention alert carries the figures, the remainder and the commands.
        [alert] = await alerts_of(store, workflow_id)
        assert alert["kind"] == "needs_attention" and alert["message"] == error["message"]
        body = json.loads(body_of(alert))
        assert body["commands"] == error["commands"]
        assert body["remainders"] == extra["remainders"]
        assert body["partial_fill"]["unfilled_amount"] == unfilled
        assert body["partial_fill"]["slices_filled"] == 1

        # The first command, as printed: carry on with what filled.
        code, out, err = await run_command(env, error["commands"][0])
        assert code == 0, err
        assert out.strip() == f"{workflow_id} buy_in_source_spot: done"
        done = await worker.drive(workflow_id, timeout=30)
        assert done.state == "done", done.reason
        # The path moved what the one slice bought, less the withdrawal fees on the way.
        withdraw = done.tasks[1]
        assert D((withdraw.request_params or {})["available"]) == D(
            extra["cumulative_amount_excluding_fee"])
        assert extra_of(done.tasks[0])["remainders"] == extra["remainders"]
        ok, totals = await worker.world.check()
        assert ok, totals


async def received_alerts(nats_url: str, subject: str, workflow_id: str) -> list[dict[str, Any]]:
    """The alert bodies JetStream holds on `subject` for one workflow."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
        found = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                break
            body = json.loads(msg.data)
            if body["workflow_id"] == workflow_id:
                found.append(body)
        await sub.unsubscribe()
        return found
    finally:
        await nc.drain()


async def test_on_partial_continue_ends_done_with_the_remainder_and_a_warning(
    store: EventStore, database_url: str, nats_url: str, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={ACCOUNT: {"KRW": ONE_SLICE}})
    async with Worker(database_url, world=world, time_scale=SCALE) as worker:
        workflow_id = await start_twap(store, worker, on_partial="continue")
        flow = await worker.drive(workflow_id)
        assert flow.state == "done", flow.reason
        trade = flow.tasks[0]
        assert trade.state == "done"
        extra = extra_of(trade)
        assert_one_slice_of_four(extra)
        assert extra["partial_fill"]["policy"] == "continue"
        await project(store)
        [alert] = await alerts_of(store, workflow_id)
        assert alert["kind"] == "partial_fill" and alert["task"] == "buy_eth"
        assert "the workflow carries on with what filled" in alert["message"]
        body = json.loads(body_of(alert))
        assert body["level"] == "warning"
        assert body["remainders"] == extra["remainders"]
        assert body["partial_fill"]["filled_amount"] == extra["filled_amount"]
        # Published on its own subject, once.
        nc = await nats.connect(nats_url)
        try:
            assert await AlertPublisher(store, nc.jetstream()).publish_pending() >= 1
        finally:
            await nc.drain()
        assert await received_alerts(nats_url, "rebalancer.alerts.partial_fill",
                                     workflow_id) == [body]
        ok, totals = await worker.world.check()
        assert ok, totals


async def test_on_partial_fail_fails_the_task_and_the_workflow(
    store: EventStore, database_url: str, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={ACCOUNT: {"KRW": ONE_SLICE}})
    async with Worker(database_url, world=world, time_scale=SCALE) as worker:
        workflow_id = await start_twap(store, worker, on_partial="fail",
                                       min_filled_fraction="0.5")
        flow = await worker.drive(workflow_id)
        assert flow.state == "failed"
        trade = flow.tasks[0]
        assert trade.state == "failed"
        assert (trade.error or {})["code"] == "partial_fill"
        assert "below the 50% required" in (trade.error or {})["message"]
        extra = extra_of(trade)
        assert_one_slice_of_four(extra)
        await project(store)
        kinds = {a["kind"]: a for a in await alerts_of(store, workflow_id)}
        assert set(kinds) == {"partial_fill", "workflow_failed"}
        assert json.loads(body_of(kinds["partial_fill"]))["level"] == "error"
        assert (flow.reason or "").startswith("task buy_eth failed: buy_eth filled")


async def test_a_full_fill_is_unchanged_and_raises_no_alert(
    store: EventStore, database_url: str, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={ACCOUNT: {"KRW": "5000000"}})
    async with Worker(database_url, world=world, time_scale=SCALE) as worker:
        workflow_id = await start_twap(store, worker)
        flow = await worker.drive(workflow_id)
        assert flow.state == "done", flow.reason
        trade = flow.tasks[0]
        moves = [(e.data["trigger"], e.data["dest"])
                 for e in await store.read_stream(f"workflow-{workflow_id}")
                 if e.data.get("task_name")]
        assert moves == [("submit", "submitting"), ("accept", "requested")] + [
            ("next_slice", "submitting"), ("accept", "requested")] * 2 + [
            ("next_slice", "submitting"), ("complete", "done")]
        extra = extra_of(trade)
        assert "partial_fill" not in extra and "remainders" not in extra
        # The figures are recorded all the same: a market buy by quote keeps the step's dust.
        assert D(extra["planned_amount"]) == D(BUDGET)
        assert D("0.99") <= D(extra["filled_fraction"]) <= 1
        assert D(extra["unfilled_amount"]) < D(1)
        await project(store)
        assert await alerts_of(store, workflow_id) == []


async def test_resend_from_the_attention_sends_the_unfilled_part_as_one_more_order(
    store: EventStore, database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={ACCOUNT: {"KRW": ONE_SLICE}})
    async with Worker(database_url, world=world, time_scale=SCALE) as worker:
        workflow_id = await start_twap(store, worker)
        stuck = await worker.drive(workflow_id, until=("needs_attention",))
        error = stuck.tasks[0].error or {}
        unfilled = D(extra_of(stuck.tasks[0])["unfilled_amount"])
        # The operator funds the account (from the market maker: the world's totals hold).
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            for account, delta in (("upbit-mm", -D(BUDGET)), (ACCOUNT, D(BUDGET))):
                await conn.execute("update sim.balances set amount = amount + %s"
                                   " where account = %s and currency = 'KRW'", (delta, account))
        code, out, err = await run_command(env, error["commands"][1])
        assert code == 0, err
        assert out.strip() == f"{workflow_id} buy_eth: created"
        flow = await worker.drive(workflow_id)
        assert flow.state == "done", flow.reason
        extra = extra_of(flow.tasks[0])
        assert [s["status"] for s in extra["slices"]] == ["closed", "rejected", "rejected",
                                                          "rejected", "closed"]
        plan = (flow.tasks[0].request_params or {})["plan"]
        # The unfilled KRW on the market's step (whole won): an order the exchange takes.
        assert D(plan["amounts"][-1]) == unfilled.to_integral_value(rounding="ROUND_FLOOR")
        assert D(plan["planned"]) == D(BUDGET)
        assert D(extra["planned_amount"]) == D(BUDGET)
        assert D(extra["filled_fraction"]) >= D("0.99")
        assert "partial_fill" not in extra and "remainders" not in extra
        assert len(await operations(database_url, "order")) == 2
        ok, totals = await worker.world.check()
        assert ok, totals


async def test_a_resend_of_a_trade_that_filled_sends_nothing_and_hands_it_back(
    store: EventStore, database_url: str, tmp_path: Path
) -> None:
    # The trade fills in full; the withdrawal after it fails (no address on that network). An
    # operator re-opens the workflow at the trade and resends it: buying again would spend the
    # money twice, so the trade is handed back with the commands that settle it.
    world = write_world(tmp_path, balances={ACCOUNT: {"KRW": "5000000"}})
    async with Worker(database_url, world=world, time_scale=SCALE) as worker:
        spec = workflow(
            "buy_then_withdraw", {"budget": "amount"},
            [twap_trade("buy_eth", slices=2, interval_seconds=0, account=ACCOUNT, side="buy",
                        order_type="market", base_currency="ETH", quote_currency="KRW",
                        quote_amount="{budget}"),
             task("withdraw_eth", "withdraw", from_account=ACCOUNT,
                  to_account="binance-personal", currency="ETH", network="NOPE",
                  amount="{$.buy_eth.refresh_result.extra.cumulative_amount_excluding_fee}")],
            accounts=worker.accounts)
        workflow_id, _ = await start_workflow(store, spec, {"budget": BUDGET}, worker.accounts)
        failed = await worker.drive(workflow_id)
        assert failed.state == "failed"
        assert (failed.tasks[1].error or {})["code"] == "no_deposit_address"
        reopened = await reopen_workflow(store, "reopen-1", workflow_id, "buy_eth")
        assert reopened["ok"], reopened
        resent = await resolve_task(store, "resend-1", workflow_id, "buy_eth", "resend",
                                    "buy again?")
        assert resent["ok"], resent
        again = await worker.drive(workflow_id, until=("needs_attention",))
        trade = again.tasks[0]
        assert trade.state == "needs_attention"
        error = trade.error or {}
        assert error["code"] == "nothing_to_resend" and "it filled; resolve done" in (
            error["message"])
        assert [c.split(" --note")[0] for c in error["commands"]] == [
            f"rebalancer resolve {workflow_id} buy_eth --outcome done",
            f"rebalancer resolve {workflow_id} buy_eth --outcome failed"]
        assert len(await operations(database_url, "order")) == 2  # the two slices, no more
        ok, totals = await worker.world.check()
        assert ok, totals
