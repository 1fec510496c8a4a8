"""`rebalancer preview`: a spec run on a throwaway simulated world seeded from what the
exchanges say now, before anything real happens.

The throwaway world lives in a database of its own, created next to the configured one and
dropped afterwards, so nothing of the preview can reach the real event store or exchanges.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

from events.migrations import migrate
from events.store import EventStore
from events.vocabulary import WORKFLOW_TERMINAL, WorkflowState
from rebalancer.accounts import Accounts
from rebalancer.balances import read_balances
from rebalancer.commands import start_workflow
from rebalancer.engine import Engine
from rebalancer.errors import RebalancerError
from rebalancer.exchanges.base import Exchange, Exchanges, Wallet
from rebalancer.exchanges.simulated import SimulatedWorld
from rebalancer.exchanges.simulated.spec import FUTURES_SUFFIX, WorldSpec
from rebalancer.specs.models import WorkflowSpec
from rebalancer.specs.resolution import resolve_params, resolve_result
from rebalancer.workflow import Workflow, fold

# What each exchange can do, for the throwaway world (the live connectors know it in code).
PROFILES: dict[str, dict[str, bool]] = {
    "upbit": {"internal_transfers": False, "withdraw_client_ids": False, "futures": False,
              "sub_accounts": False},
    "binance": {"internal_transfers": True, "withdraw_client_ids": True, "futures": True,
                "sub_accounts": True},
}
# The market maker of the throwaway world can take any trade a desk could make.
DEEP = Decimal("1000000000000")
# Confirmations of an hour take a few milliseconds: the preview shows amounts, not timing.
TIME_SCALE = 1_000_000.0
SETTLED = WORKFLOW_TERMINAL | {WorkflowState.NEEDS_ATTENTION}
LIVE, SIMULATED = "the live exchanges", "a copy of the simulated world"
ASSUMPTIONS = {
    LIVE: ["market orders fill at the last traded price, with the exchange's taker fee",
           "withdrawal fees and minimums as the exchanges report them now",
           "TWAP slices are planned as configured but not waited for"],
    SIMULATED: ["the simulated world's prices, spreads, fees and rules as they stand",
                "TWAP slices are planned as configured but not waited for"],
}
_CODE = re.compile(r"^[A-Z0-9]{2,12}$")


async def world_from_live(exchanges: Exchanges, accounts: Accounts, spec: WorkflowSpec,
                          params: Mapping[str, Any]) -> WorldSpec:
    """The live markets, fees, minimums, withdrawal rules and balances the spec may touch,
    read with read-only calls, as a world file for the simulator."""
    currencies = {str(v) for v in params.values() if _CODE.match(str(v))}
    for account in accounts.accounts.values():
        currencies |= set(account.deposit_addresses)
        currencies |= {a.currency for a in account.withdrawal_allowlist}
    by_exchange: dict[str, Exchange] = {}
    for account in accounts.accounts.values():
        by_exchange.setdefault(account.exchange, exchanges.for_account(account.id))
    world: dict[str, Any] = {"exchanges": {}, "balances": {}}
    for name, port in by_exchange.items():
        markets: dict[str, Any] = {}
        listed = await _symbols(port)
        for base in sorted(currencies):
            for quote in sorted(currencies - {base}):
                symbol = f"{base}/{quote}"
                if listed is not None and symbol not in listed:
                    continue
                try:
                    rules = await port.market(symbol)
                    price = await port.ticker_price(symbol)
                except RebalancerError:
                    continue  # no such market here
                tick = rules.price_tick(price)
                markets[symbol] = {
                    "mid": str((price / tick).to_integral_value() * tick), "spread": "0",
                    "taker_fee": str(rules.taker_fee), "min_notional": str(rules.min_notional),
                    "amount_step": str(rules.amount_step),
                    "market_buy_by_quote_only": rules.market_buy_by_quote_only,
                    "price_ticks": [[str(f), str(t)] for f, t in rules.price_ticks],
                }
        world["exchanges"][name] = {
            "market_maker": f"preview-{name}-mm", "fee_account": f"preview-{name}-fees",
            **PROFILES.get(name, PROFILES["binance"]), "markets": markets, "withdrawals": [],
        }
        world["balances"][f"preview-{name}-mm"] = {c: str(DEEP) for c in sorted(currencies)}
    seen: set[tuple[str, str, str]] = set()
    for account in accounts.accounts.values():
        port = exchanges.for_account(account.id)
        for allowed in account.withdrawal_allowlist:
            key = (account.exchange, allowed.currency, allowed.network)
            if key in seen:
                continue
            seen.add(key)
            try:
                limits = await port.withdrawal_rules(allowed.currency, allowed.network)
            except RebalancerError:
                continue  # the throwaway world refuses it, and the preview says so
            world["exchanges"][account.exchange]["withdrawals"].append({
                "currency": limits.currency, "network": limits.network, "fee": str(limits.fee),
                "minimum": str(limits.minimum), "multiple": str(limits.multiple),
                "fee_included": limits.fee_included})
    holdings, _ = await read_balances(exchanges, accounts)
    for h in holdings:
        holder = h.account + (FUTURES_SUFFIX if h.wallet == Wallet.FUTURES else "")
        world["balances"].setdefault(holder, {})[h.currency] = str(h.total)
    return WorldSpec.model_validate(world)


async def _symbols(port: Exchange) -> set[str] | None:
    """The symbols a live connector lists (one call), so only real markets are asked about."""
    markets = getattr(port, "markets", None)
    if markets is None:
        return None
    try:
        return set(await markets())
    except RebalancerError:
        return None


async def world_from_simulated(world: SimulatedWorld) -> WorldSpec:
    """A copy of the simulated world as it stands: its rules, and today's balances."""
    spec = await world.spec()
    balances = await world.balances()
    return spec.model_copy(update={"balances": {
        holder: {c: a for c, a in held.items() if a != 0} for holder, held in balances.items()}})


@contextlib.asynccontextmanager
async def throwaway_database(database_url: str) -> AsyncIterator[str]:
    """A new database next to `database_url`'s, dropped on the way out whatever happened."""
    name = f"rebalancer_preview_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        await admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(database_url, dbname=name)
    finally:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def without_waits(spec: WorkflowSpec) -> WorkflowSpec:
    """The spec with TWAP intervals of 0: the slices and their amounts stay, the waits go."""
    tasks = [t.model_copy(update={"twap": t.twap.model_copy(update={"interval_seconds": 0})})
             if t.twap is not None else t for t in spec.tasks]
    return spec.model_copy(update={"tasks": tasks})


async def run_preview(database_url: str, world: WorldSpec, spec: WorkflowSpec,
                      params: Mapping[str, Any], accounts: Accounts, *, source: str,
                      timeout: float = 120.0) -> dict[str, Any]:
    """Run `spec` to its end (or to an operator) on `world` in a throwaway database; the
    report: state, result, tasks, the first task that failed and why, fees, remainders and
    every balance of ours that changed. Raises SpecError for a bad spec or parameter."""
    async with throwaway_database(database_url) as url, contextlib.AsyncExitStack() as stack:
        await migrate(url)
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="preview-")))
        world_file = folder / "world.yaml"
        world_file.write_text(yaml.safe_dump(world.model_dump(mode="json")), encoding="utf-8")
        sim = await SimulatedWorld.open(url, world=world_file, accounts=accounts,
                                        time_scale=TIME_SCALE, max_size=4)
        stack.push_async_callback(sim.close)
        store = await EventStore.open(url, max_size=4)
        stack.push_async_callback(store.close)
        before = await sim.balances()
        workflow_id, _ = await start_workflow(store, without_waits(spec), params, accounts,
                                              actor="preview")
        engine = Engine(store, sim, accounts, owner="preview", follow_projections=False)
        workflow = await _drive(engine, store, workflow_id, timeout)
        after = await sim.balances()
    return _report(workflow, spec, params, accounts, before, after, world, source)


async def _drive(engine: Engine, store: EventStore, workflow_id: str, timeout: float
                 ) -> Workflow:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        workflow = fold(await store.read_stream(f"workflow-{workflow_id}"))
        if workflow.state in SETTLED or loop.time() > deadline:
            return workflow
        await engine.step(workflow_id)
        await asyncio.sleep(0.005)


def _report(workflow: Workflow, spec: WorkflowSpec, params: Mapping[str, Any],
            accounts: Accounts, before: dict[str, dict[str, Decimal]],
            after: dict[str, dict[str, Decimal]], world: WorldSpec, source: str
            ) -> dict[str, Any]:
    ours = set(accounts.accounts) | {a + FUTURES_SUFFIX for a in accounts.accounts}
    fee_accounts = {e.fee_account: name for name, e in world.exchanges.items()}
    changes, fees = [], []
    for holder in sorted(set(before) | set(after)):
        for currency in sorted(set(before.get(holder, {})) | set(after.get(holder, {}))):
            was = before.get(holder, {}).get(currency, Decimal(0))
            now = after.get(holder, {}).get(currency, Decimal(0))
            if was == now:
                continue
            if holder in ours:
                changes.append({"account": holder, "currency": currency, "before": was,
                                "after": now, "change": now - was})
            elif holder in fee_accounts:
                fees.append({"exchange": fee_accounts[holder], "currency": currency,
                             "amount": now - was})
    failure = next(({"task": t.name, "kind": t.kind.value, "state": t.state.value,
                     "error": t.error} for t in workflow.tasks if t.error is not None
                    and t.state.value in ("failed", "needs_attention")), None)
    resolved = resolve_params(spec, params, accounts)
    done = workflow.state == WorkflowState.DONE
    return {
        "source": source,
        "priced_at": datetime.now(UTC),
        "spec": spec.name,
        "state": workflow.state.value,
        "reason": workflow.reason,
        "result": resolve_result(spec, resolved, workflow.results()) if done else {},
        "first_failure": failure,
        "tasks": [{"name": t.name, "kind": t.kind.value, "state": t.state.value,
                   "amount": ((t.refresh_result or {}).get("result") or {}).get("amount")}
                  for t in workflow.tasks],
        "fees": fees,
        "remainders": [r for t in workflow.tasks for r in
                       ((t.refresh_result or {}).get("extra") or {}).get("remainders", [])],
        "balances": changes,
        "assumptions": ASSUMPTIONS[source],
    }


__all__ = ["LIVE", "SIMULATED", "run_preview", "throwaway_database", "without_waits",
           "world_from_live",
           "world_from_simulated"]
