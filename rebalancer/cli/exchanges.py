"""`rebalancer balances` and `preview`: what the exchanges hold and would do, read-only."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

from rebalancer import embedded
from rebalancer.accounts import Accounts, load_accounts
from rebalancer.balances import Holding, Unreadable, read_balances
from rebalancer.cli.common import EXIT_CHECK_FAILED, EXIT_OK, database_url
from rebalancer.cli.format import money, table, to_json
from rebalancer.exchanges.base import Exchanges
from rebalancer.settings import Settings
from rebalancer.specs.models import WorkflowSpec


@contextlib.asynccontextmanager
async def opened_exchanges(settings: Settings, accounts: Accounts) -> AsyncIterator[Exchanges]:
    """The exchanges this configuration talks to, for one command: live connectors (no
    database needed) or the simulated world (migrated and seeded first)."""
    from rebalancer.exchanges.live import exchange_mode
    from rebalancer.service import open_exchanges

    async with contextlib.AsyncExitStack() as stack:
        url = ""
        if exchange_mode(settings, accounts) == "simulated":
            from events.migrations import migrate

            url = database_url(settings)
            await migrate(embedded.migrate_url(settings), connect_timeout=settings.connect_timeout)
        yield await open_exchanges(settings, url, accounts, stack)


def account_balances(args: argparse.Namespace, settings: Settings) -> int:
    accounts = load_accounts(settings.config)
    if args.account is not None:
        accounts.get(args.account)  # an unknown account is a usage error before any call

    async def run() -> tuple[list[Holding], list[Unreadable]]:
        async with opened_exchanges(settings, accounts) as exchanges:
            return await read_balances(exchanges, accounts, args.account)

    holdings, failed = asyncio.run(run())
    if args.json:
        print(to_json({
            "balances": [{"account": h.account, "exchange": h.exchange, "wallet": h.wallet.value,
                          "currency": h.currency, "free": h.free, "total": h.total}
                         for h in holdings],
            "unreadable": [{"account": u.account, "exchange": u.exchange, "error": u.error}
                           for u in failed],
        }))
    else:
        rows = [[h.account, h.exchange, h.wallet.value, h.currency, money(h.free),
                 money(h.total)] for h in holdings]
        print(table(["account", "exchange", "wallet", "currency", "free", "total"], rows,
                    right=frozenset({4, 5})) if rows else "no balances")
        for u in failed:
            print(f"rebalancer: {u.account} ({u.exchange}): {u.error}", file=sys.stderr)
    return EXIT_CHECK_FAILED if failed else EXIT_OK


async def preview_report(settings: Settings, accounts: Accounts, spec: WorkflowSpec,
                         params: dict[str, str]) -> dict[str, Any]:
    """The spec run on a throwaway world seeded from the exchanges this process talks to."""
    from rebalancer.exchanges.live import exchange_mode
    from rebalancer.exchanges.simulated import SimulatedWorld
    from rebalancer.preview import (
        LIVE,
        SIMULATED,
        run_preview,
        world_from_live,
        world_from_simulated,
    )

    mode = exchange_mode(settings, accounts)
    async with opened_exchanges(settings, accounts) as exchanges:
        if isinstance(exchanges, SimulatedWorld):
            world = await world_from_simulated(exchanges)
        else:
            world = await world_from_live(exchanges, accounts, spec, params)
    source = SIMULATED if mode == "simulated" else LIVE
    # The throwaway database is made (and migrated) by the owner role: the service may not.
    return await run_preview(embedded.migrate_url(settings), world, spec, params, accounts,
                             source=source)


def spec_preview(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.cli.control import checked_start

    accounts, spec, params = checked_start(args, settings)
    report = asyncio.run(preview_report(settings, accounts, spec, params))
    print(to_json(report) if args.json else format_preview(report))
    return EXIT_OK if report["state"] == "done" else EXIT_CHECK_FAILED


def format_preview(report: dict[str, Any]) -> str:
    lines = [f"preview of {report['spec']} on {report['source']}: it would end"
             f" {report['state']}" + (f" ({report['reason']})" if report.get("reason") else "")]
    if report["result"]:
        lines.append("expected result: " + ", ".join(
            f"{k} = {v}" for k, v in report["result"].items()))
    failure = report.get("first_failure")
    if failure:
        error = failure.get("error") or {}
        lines.append(f"first task to stop: {failure['task']} ({failure['kind']}) ->"
                     f" {failure['state']}: {error.get('message', error)}")
    rows = [[t["name"], t["kind"], t["state"], t["amount"] or ""] for t in report["tasks"]]
    lines.append(table(["task", "kind", "state", "amount"], rows, right=frozenset({3})))
    if report["fees"]:
        lines.append("fees: " + ", ".join(f"{money(f['amount'])} {f['currency']} ({f['exchange']})"
                                          for f in report["fees"]))
    if report["remainders"]:
        lines.append("left behind: " + ", ".join(
            f"{r['amount']} {r['currency']} ({r['reason']})" for r in report["remainders"]))
    if report["balances"]:
        rows = [[b["account"], b["currency"], money(b["before"]), money(b["after"]),
                 money(b["change"])] for b in report["balances"]]
        lines.append(table(["account", "currency", "before", "after", "change"], rows,
                           right=frozenset({2, 3, 4})))
    lines.append("assumes: " + "; ".join(report["assumptions"]))
    return "\n".join(lines)
