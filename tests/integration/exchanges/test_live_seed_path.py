"""The built-in path end to end on the live Upbit and Binance connectors (ccxt's own signing and
parsing; only the HTTP layer replaced by stateful fakes), with lost answers on both
withdrawals, and nothing secret in anything the run produced."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import nats
import psycopg
import pytest

from events.relay import Relay
from events.store import EventStore
from events.vocabulary import WORKFLOW_TERMINAL, TaskKind, TaskState, WorkflowState
from rebalancer.cli.main import main
from rebalancer.commands import start_workflow
from rebalancer.engine import Engine
from rebalancer.specs.loading import builtin_specs
from rebalancer.tasks.base import DEFAULT_DEADLINES
from rebalancer.workflow import Workflow, fold
from tests.support.venues.http import Fault
from tests.support.venues.live_world import LiveWorld, live_world

SPEC = "upbit_to_binance_sub_futures"
PARAMS = {"from_account": "upbit-personal", "to_account": "binance-corp-sub",
          "from_currency": "KRW", "interim_currency": "ETH", "to_currency": "USDT",
          "from_amount": "1000000"}
UPBIT_WITHDRAW = ("POST", "/v1/withdraws/coin")
BINANCE_WITHDRAW = ("POST", "/sapi/v1/capital/withdraw/apply")
SETTLED = WORKFLOW_TERMINAL | {WorkflowState.NEEDS_ATTENTION}


async def drive(store: EventStore, world: LiveWorld, workflow_id: str, *,
                timeout: float = 60.0, deadlines: dict[TaskKind, float] | None = None,
                seen: Callable[[Workflow], None] = lambda _: None) -> Workflow:
    """Step the workflow on one engine until it ends or waits for an operator."""
    exchanges = world.exchanges()
    try:
        engine = Engine(store, exchanges, world.accounts, owner="test", follow_projections=False,
                        deadlines={**DEFAULT_DEADLINES, **(deadlines or {})})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            workflow = fold(await store.read_stream(f"workflow-{workflow_id}"))
            seen(workflow)
            if workflow.state in SETTLED:
                return workflow
            assert loop.time() < deadline, f"still {workflow.state}: {workflow.tasks}"
            await engine.step(workflow_id)
            await asyncio.sleep(0.01)
    finally:
        await exchanges.close()


async def start(store: EventStore, world: LiveWorld, **params: str) -> str:
    workflow_id, _ = await start_workflow(store, builtin_specs()[SPEC], {**PARAMS, **params},
                                          world.accounts, actor="test")
    return workflow_id


async def test_the_seed_path_runs_on_both_connectors_and_lost_withdraw_answers_are_never_resent(
    store: EventStore, database_url: str, nats_url: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, ccxt's included, at its most talkative
    world = live_world()
    # Each withdrawal executes and its answer is lost: the intent is reconciled by history
    # (Upbit) and by withdrawOrderId (Binance), never sent again.
    world.faults["upbit-personal"] = [Fault("lost_response", *UPBIT_WITHDRAW, times=1)]
    world.faults["binance-personal"] = [Fault("lost_response", *BINANCE_WITHDRAW, times=1)]
    workflow_id = await start(store, world)
    workflow = await drive(store, world, workflow_id)

    assert workflow.state == WorkflowState.DONE, [(t.name, t.state.value, t.error)
                                                  for t in workflow.tasks if t.error]
    assert world.wires["upbit-personal"].count(*UPBIT_WITHDRAW) == 1
    assert world.wires["binance-personal"].count(*BINANCE_WITHDRAW) == 1
    # Each withdrawal was reconciled from `submitting` after the lost answer.
    for name in ("withdraw_to_interim", "withdraw_to_master"):
        moves = [e.data["trigger"] for e in await store.read_stream(f"workflow-{workflow_id}")
                 if e.data.get("task_name") == name]
        assert moves[:2] == ["submit", "accept"], moves
    # The money went where the spec says, and the fakes agree with the events.
    spent = Decimal(10_000_000) - world.upbit.free("upbit-personal", "KRW")
    assert Decimal(999_000) < spent <= Decimal(1_000_000)
    results = workflow.results()
    to_amount = Decimal(results["sub_spot_to_futures"]["refresh_result"]["result"]["amount"])
    assert to_amount > 0
    assert world.binance.free("binance-corp-sub", "USDT", futures=True) == to_amount
    bought = Decimal(results["buy_in_source_spot"]["refresh_result"]["result"]["amount"])
    assert Decimal("0.23") < bought < Decimal("0.232")  # 1,000,000 KRW at 4,321,000 less fee
    internal = results["withdraw_to_master"]["refresh_result"]["result"]
    assert internal["internal"] is True and internal["txid"]  # Binance -> Binance: no chain

    # Nothing secret anywhere: the event table, every log record, every NATS message, --json.
    secrets = world.secrets() + sorted(world.signatures())
    assert len(world.signatures()) > 10  # the scan looks for what was really sent
    produced = [await _events_table(database_url), caplog.text,
                *[str(r.__dict__) for r in caplog.records]]
    produced += await _relayed(store, nats_url, workflow_id)
    monkeypatch.setenv("REBALANCER_DATABASE_URL", database_url)
    for argv in (["history", workflow_id, "--json"], ["status", workflow_id, "--json"],
                 ["audit", workflow_id, "--json"]):
        await asyncio.to_thread(main, argv)
    produced.append(capsys.readouterr().out)
    for text in produced:
        for secret in secrets:
            assert secret not in text


async def test_an_unknown_raw_withdrawal_status_is_waited_on_then_named_to_an_operator(
    store: EventStore,
) -> None:
    world = live_world()
    history = world.upbit._withdraw_history

    def unlisted(account: Any, params: dict[str, Any]) -> Any:
        # A withdrawal state the connector's table does not list (a new compliance hold).
        rows = history(account, params)
        for row in rows:
            row["state"] = "UNDER_REVIEW"
        return rows

    world.upbit._withdraw_history = unlisted  # type: ignore[method-assign]
    states: list[TaskState] = []
    workflow_id = await start(store, world)
    workflow = await drive(store, world, workflow_id, deadlines={TaskKind.WITHDRAW: 2.0},
                           seen=lambda w: states.append(w.tasks[1].state))
    task = workflow.tasks[1]
    assert task.name == "withdraw_to_interim"
    # Waited on (acknowledged, not finished) for a while, never judged done or failed.
    assert states.count(TaskState.PROCESSING) > 3
    assert workflow.state == WorkflowState.NEEDS_ATTENTION
    assert task.state == TaskState.NEEDS_ATTENTION and task.error is not None
    assert task.error["code"] == "deadline"
    assert "'under_review'" in task.error["message"].lower()
    assert "which Rebalancer does not know" in task.error["message"]
    assert (task.refresh_result or {})["result"]["status"] == "unknown"
    # Nothing beyond the withdrawal happened: the deposit task never started.
    assert workflow.tasks[2].state == TaskState.CREATED


async def _events_table(database_url: str) -> str:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("select stream_id, type, data::text, metadata::text,"
                                 " encode(hash, 'hex') from events order by position")
        return json.dumps(await cur.fetchall(), default=str)


async def _relayed(store: EventStore, nats_url: str, workflow_id: str) -> list[str]:
    """Every message the relay published for the workflow, headers and body, as received."""
    received: list[str] = []
    nc = await nats.connect(nats_url)
    try:
        async def keep(msg: Any) -> None:
            received.append(f"{msg.subject} {msg.headers} {msg.data.decode()}")

        await nc.subscribe(f"rebalancer.events.{workflow_id}.>", cb=keep)
        async with Relay(store, nats_url) as relay:
            await relay.ensure_stream()
            while await relay.relay_once():
                pass
        events = len(await store.read_stream(f"workflow-{workflow_id}"))
        for _ in range(100):
            if len(received) >= events:
                break
            await asyncio.sleep(0.05)
        assert len(received) >= events
    finally:
        await nc.close()
    return received
