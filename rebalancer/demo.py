"""`rebalancer demo`: the built-in path end to end on the simulated world, with a live view."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import uuid
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from events.migrations import migrate
from events.relay import PublishedEvent, Relay
from events.relay.anchors import load_key
from events.store import RecordedEvent
from events.vocabulary import WORKFLOW_TERMINAL, WorkflowState
from rebalancer.api import follow
from rebalancer.cli.format import move_text
from rebalancer.commands import start_workflow
from rebalancer.exchanges.simulated import SimulatedWorld
from rebalancer.service import build_dashboard, runtime, stop_on_signals
from rebalancer.settings import Settings, chain_key_path
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.resolution import resolve_params, resolve_result
from rebalancer.web import Bind, Dashboard
from rebalancer.web.operator import operator_token
from rebalancer.workflow import Workflow, fold

SPEC = "upbit_to_binance_sub_futures"
PARAMS = {
    "from_account": "upbit-personal",
    "to_account": "binance-corp-sub",
    "from_currency": "KRW",
    "interim_currency": "ETH",
    "to_currency": "USDT",
}
# Confirmation delays of minutes become seconds: the demo should finish in well under a minute.
DEMO_TIME_SCALE = 60.0
# Where the live view stops: the workflow ended, or waits for an operator.
SETTLED = WORKFLOW_TERMINAL | {WorkflowState.NEEDS_ATTENTION}


async def run_demo(
    settings: Settings,
    database_url: str,
    nats_url: str,
    *,
    amount: Decimal,
    as_json: bool,
    timeout: float = 120.0,
    migrate_url: str | None = None,
    http: Bind | None = None,
    listener: socket.socket | None = None,
) -> int:
    """Returns 0 when the workflow ended done and every currency's total held, else 1.
    `listener`: the dashboard's socket, bound by the caller before anything started."""
    if "sim_time_scale" not in settings.model_fields_set:
        # Unless REBALANCER_SIM_TIME_SCALE says otherwise, the demo runs at its own pace.
        settings = settings.model_copy(update={"sim_time_scale": DEMO_TIME_SCALE})
    # `migrate_url`: the owner role's (the service role may not change the schema).
    await migrate(migrate_url or database_url)
    console = Console(stderr=as_json)
    if not console.is_terminal:
        console = Console(stderr=as_json, width=max(console.width, 120))
    async with runtime(settings, database_url) as rt:
        world = rt.exchanges
        assert isinstance(world, SimulatedWorld)
        before = await world.balances()
        spec = builtin_specs()[SPEC]
        started = time.monotonic()
        workflow_id, _ = await start_workflow(
            rt.store,
            spec,
            {**PARAMS, "from_amount": str(amount)},
            rt.accounts,
            command_id=f"demo-{uuid.uuid4()}",
            actor="demo",
        )
        engine = rt.engine("demo", follow_projections=True)
        relay = Relay(rt.store, nats_url,
                      chain_key=load_key(chain_key_path(settings), create=True),
                      replicas=settings.nats_stream_replicas)
        # The stream must exist before the live view subscribes to it (a fresh NATS has none).
        await relay.ensure_stream()
        stop = asyncio.Event()
        dashboard = None if http is None else build_dashboard(
            settings, rt, http, token=operator_token(settings), relay=relay, listener=listener)
        driver = asyncio.gather(engine.run(stop, tick=0.1), relay.run(stop),
                                *([] if dashboard is None else [dashboard.run(stop)]))
        try:
            if dashboard is not None:
                await _announce(dashboard, driver, console)
            await asyncio.wait_for(_watch(nats_url, workflow_id, console, as_json), timeout)
            # The summary is exact: it folds the stored stream, not what NATS delivered.
            events = await rt.store.read_stream(f"workflow-{workflow_id}")
            workflow = fold(events)
            duration = time.monotonic() - started
            after = await world.balances()
            ok, totals = await world.check()
            params = resolve_params(spec, workflow.params, rt.accounts)
            done = workflow.state == WorkflowState.DONE
            result = resolve_result(spec, params, workflow.results()) if done else {}
            summary = _summary(workflow, events, before, after, totals, ok, duration, result)
            if as_json:
                print(json.dumps(summary, indent=2, default=str))
            else:
                _print_summary(console, summary)
            if dashboard is not None:
                # The dashboard stays up to be looked at, the worker beside it, until told.
                console.print(f"the dashboard stays up at {dashboard.url}; Ctrl-C to stop")
                hold = asyncio.Event()
                stop_on_signals(hold)
                await _until(hold, driver)
        finally:
            stop.set()
            await driver
            await relay.close()
    return 0 if workflow.state == WorkflowState.DONE and ok else 1


async def _announce(dashboard: Dashboard, driver: asyncio.Future[Any], console: Console) -> None:
    """Say where the dashboard is once it listens (or raise what kept it from listening)."""
    await _until(dashboard.started, driver)
    console.print(f"dashboard: {dashboard.url}", highlight=False)


async def _until(event: asyncio.Event, driver: asyncio.Future[Any]) -> None:
    """Wait for `event`, or raise what ended `driver` (the worker, relay or dashboard) first."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, driver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    if driver.done():
        driver.result()


async def _watch(nats_url: str, workflow_id: str, console: Console, as_json: bool) -> None:
    """Show the workflow's progress as NATS delivers its events (relayed from the store), until
    it ends: a live table on a terminal, a line per move otherwise."""
    start = time.monotonic()
    received: list[RecordedEvent] = []
    live = Live(console=console, refresh_per_second=8) if console.is_terminal else None

    def show(published: PublishedEvent) -> bool:
        event = RecordedEvent(
            published.position, 0, published.stream_id, published.version, published.type,
            published.schema_version, published.data, published.metadata,
            published.recorded_at, b"",
        )
        received.append(event)
        workflow = fold(received)
        if live is not None:
            live.update(_table(workflow))
        elif not as_json:
            console.print(_line(event, time.monotonic() - start), highlight=False)
        return workflow.state in SETTLED

    if live is not None:
        live.start()
    try:
        await follow(nats_url, workflow_id, show)
    finally:
        if live is not None:
            live.stop()


def _line(event: RecordedEvent, elapsed: float) -> str:
    data = event.data
    what = data.get("task_name") or "workflow"
    return f"  {elapsed:5.1f}s  {what:<24} {data.get('trigger', ''):<11} {move_text(data)}"


def _table(workflow: Workflow) -> Table:
    table = Table(title=f"workflow {workflow.workflow_id}: {workflow.state}")
    for column in ("#", "task", "kind", "state", "result"):
        table.add_column(column)
    for task in workflow.tasks:
        result = (task.refresh_result or {}).get("result") or {}
        shown = " ".join(f"{k}={result[k]}" for k in ("amount", "txid") if result.get(k))
        table.add_row(str(task.index), task.name, task.kind.value, task.state, shown)
    return table


def _summary(
    workflow: Workflow,
    events: list[RecordedEvent],
    before: dict[str, Any],
    after: dict[str, Any],
    totals: list[dict[str, Any]],
    ok: bool,
    duration: float,
    result: dict[str, Any],
) -> dict[str, Any]:
    accounts = sorted(set(before) | set(after))
    balances = []
    for account in accounts:
        for currency in sorted(set(before.get(account, {})) | set(after.get(account, {}))):
            was = Decimal(before.get(account, {}).get(currency, 0))
            now = Decimal(after.get(account, {}).get(currency, 0))
            if was != now:
                balances.append(
                    {
                        "account": account,
                        "currency": currency,
                        "before": str(was),
                        "after": str(now),
                        "change": str(now - was),
                    }
                )
    remainders = [
        r
        for t in workflow.tasks
        for r in ((t.refresh_result or {}).get("extra") or {}).get("remainders", [])
    ]
    fees = [b for b in balances if "fee" in b["account"]]
    return {
        "workflow_id": workflow.workflow_id,
        "state": workflow.state,
        "reason": workflow.reason,
        "result": result,
        "duration_seconds": round(duration, 2),
        "events_appended": len(events),
        "tasks": [{"name": t.name, "kind": t.kind.value, "state": t.state} for t in workflow.tasks],
        "balances": balances,
        "fees": fees,
        "remainders": remainders,
        "totals_unchanged": ok,
        "totals": [{k: str(v) for k, v in t.items()} for t in totals],
    }


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.print()
    console.print(
        f"[bold]workflow {summary['workflow_id']}[/bold]: {summary['state']}"
        f" ({summary['reason']}) in {summary['duration_seconds']} s,"
        f" {summary['events_appended']} events appended"
    )
    if summary["result"]:
        console.print("result: " + ", ".join(f"{k} = {v}" for k, v in summary["result"].items()))
    table = Table(title="balances that changed (sim)")
    for column in ("account", "currency", "before", "after", "change"):
        table.add_column(
            column, justify="right" if column in ("before", "after", "change") else "left"
        )
    for row in summary["balances"]:
        table.add_row(row["account"], row["currency"], row["before"], row["after"], row["change"])
    console.print(table)
    if summary["remainders"]:
        console.print(
            "left behind: "
            + ", ".join(
                f"{r['amount']} {r['currency']} ({r['reason']})" for r in summary["remainders"]
            )
        )
    verdict = "unchanged" if summary["totals_unchanged"] else "CHANGED"
    console.print(f"per-currency totals across the simulated world: {verdict}")
    sys.stdout.flush()
