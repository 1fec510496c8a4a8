"""`rebalancer sim seed | check | ledger`: the simulated world's administration and its output."""

from __future__ import annotations

import argparse
import asyncio
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rebalancer import embedded
from rebalancer.accounts import Accounts
from rebalancer.cli.common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    ConflictError,
    database_url,
    with_store,
)
from rebalancer.cli.format import money, table, to_json
from rebalancer.exchanges.simulated import SimulatedWorld
from rebalancer.settings import Settings

if TYPE_CHECKING:
    from events.store import EventStore


def sim_seed(args: argparse.Namespace, settings: Settings) -> int:
    from events.migrations import migrate
    from rebalancer.accounts import load_accounts

    url = database_url(settings)
    asyncio.run(migrate(embedded.migrate_url(settings), connect_timeout=settings.connect_timeout))
    accounts = load_accounts(settings.config)
    if args.reset and not args.force:
        active = with_store(settings, active_workflows)
        if active:
            raise ConflictError(
                f"sim seed --reset: refused: {active} workflow(s) are active (created, running,"
                " paused or needing attention); a reset wipes the simulated exchanges under"
                " them, and the money they hold there or have in flight would vanish. Let them"
                " end (or cancel them) first, or pass --force to reset anyway")
    # The world `serve` uses (REBALANCER_SIM_WORLD, else the demo world) unless told --world.
    world = args.world or settings.sim_world
    result = asyncio.run(seed(url, world, reset=args.reset, accounts=accounts))
    print(to_json(result) if args.json else format_seed(result))
    return EXIT_OK


def sim_check(args: argparse.Namespace, settings: Settings) -> int:
    ok, rows = asyncio.run(check(database_url(settings)))
    print(to_json({"ok": ok, "currencies": rows}) if args.json
          else format_check(ok, rows))
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def sim_ledger(args: argparse.Namespace, settings: Settings) -> int:
    rows = asyncio.run(ledger(database_url(settings), args.limit))
    print(to_json(rows) if args.json else format_ledger(rows))
    return EXIT_OK


async def _open(database_url: str, world_path: Path | str | None = None,
                accounts: Accounts | None = None) -> SimulatedWorld:
    # Administration is never faulted.
    return await SimulatedWorld.open(database_url, world=world_path, accounts=accounts,
                                     faults="", auto_seed=False, max_size=2)


async def seed(database_url: str, world_path: Path | str | None = None, *, reset: bool = False,
               accounts: Accounts | None = None) -> dict[str, Any]:
    """Seed the world once (a second call reports "already seeded"); `reset` wipes it first.

    Returns `seeded` (bool), `message`, `source`, `seeded_at`, `totals` and the seeded
    `balances`. Raises SpecError for a bad world file.
    """
    async with await _open(database_url, world_path, accounts) as world:
        return await world.seed(reset=reset)


# Workflows whose stream does not end in a terminal state, from the events themselves: the read
# model may lag (or not run at all without `serve`), and a paused one has no schedule row.
_ACTIVE = (
    "select count(*) from (select distinct on (stream_id) data ->> 'dest' as dest from events"
    " where stream_id like 'workflow-%%'"
    " and type in ('WorkflowCreated', 'WorkflowStateChanged')"
    " order by stream_id, version desc) last"
    " where dest is null or not (dest = any(%s::text[]))"
)


async def active_workflows(store: EventStore) -> int:
    """How many workflows are not done, failed or canceled."""
    from events.vocabulary import WORKFLOW_TERMINAL

    rows = await store.fetch_rows(_ACTIVE, ([str(s.value) for s in WORKFLOW_TERMINAL],))
    return int(rows[0][0])


async def check(database_url: str) -> tuple[bool, list[dict[str, Any]]]:
    """Per currency: `currency`, `seeded`, `current`, `difference`; ok is False if any differ
    (or the world was never seeded)."""
    async with await _open(database_url) as world:
        return await world.check()


async def ledger(database_url: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Executed operations, oldest first (the last `limit` when given)."""
    async with await _open(database_url) as world:
        return await world.ledger(limit)


def format_seed(result: dict[str, Any]) -> str:
    lines = [str(result["message"])]
    balances: dict[str, dict[str, Decimal]] = result.get("balances") or {}
    if balances:
        rows = [[account, currency, money(amount)]
                for account, held in balances.items() for currency, amount in held.items()]
        shown = table(["account", "currency", "amount"], rows, right=frozenset({2}), rule=True)
        lines += ["", shown]
    totals: dict[str, Decimal] = result.get("totals") or {}
    if totals:
        rows = [[currency, money(amount)] for currency, amount in totals.items()]
        lines += ["", table(["currency", "seeded total"], rows, right=frozenset({1}),
                            rule=True)]
    return "\n".join(lines)


def format_check(ok: bool, rows: list[dict[str, Any]]) -> str:
    if not rows and not ok:
        return "FAIL: the simulated world is not seeded (run `rebalancer sim seed`)"
    shown = table(
        ["currency", "seeded", "current", "difference"],
        [[r["currency"], money(r["seeded"]), money(r["current"]), money(r["difference"])]
         for r in rows],
        right=frozenset({1, 2, 3}), rule=True,
    )
    changed = [r["currency"] for r in rows if r["difference"] != 0]
    verdict = ("OK: every currency's total is unchanged" if ok
               else "FAIL: totals changed for " + (", ".join(changed) or "an unseeded world"))
    return f"{shown}\n{verdict}"


def format_ledger(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no operations"
    table_rows = []
    for r in rows:
        detail = ""
        if r["kind"] == "order":
            detail = f"{r['side']} {r['symbol']} cost {money(r['cost'])}"
        elif r["kind"] in ("withdraw", "transfer", "master_transfer"):
            detail = f"{r.get('from_account') or r['account']} -> {r['to_account']}"
            if r.get("internal"):
                detail += " (internal)"
        elif r["kind"] == "deposit":
            detail = f"from withdrawal {r.get('ref')}"
            if r.get("internal"):
                detail += " (internal)"
        fee = money(r["fee"]) + (f" {r['fee_currency']}" if r.get("fee_currency") else "")
        table_rows.append([
            str(r["id"]), r["created_at"].strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            r["exchange"], r["account"], r["kind"], r["client_id"] or "-", r["currency"],
            money(r["amount"]), fee, r["status"], (r["txid"] or "-")[:16], detail,
        ])
    return table(
        ["id", "at", "exchange", "account", "kind", "client id", "cur", "amount", "fee",
         "status", "txid", "detail"],
        table_rows, right=frozenset({0, 7}), rule=True,
    )
