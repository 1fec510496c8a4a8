"""`rebalancer balances`: what each account holds now, read with read-only calls."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

from rebalancer.accounts import Accounts, load_accounts
from rebalancer.balances import Holding, Unreadable, read_balances
from rebalancer.cli.common import EXIT_CHECK_FAILED, EXIT_OK, database_url
from rebalancer.cli.format import money, table, to_json
from rebalancer.exchanges.base import Exchanges
from rebalancer.settings import Settings


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
            await migrate(url)
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
