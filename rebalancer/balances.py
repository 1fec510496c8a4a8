"""What each account holds now, per wallet, read from its exchange with read-only calls."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal

from rebalancer.accounts import Accounts
from rebalancer.errors import NoSuchWalletError, RebalancerError
from rebalancer.exchanges.base import Exchanges, Wallet


@dataclass(frozen=True)
class Holding:
    account: str
    exchange: str
    wallet: Wallet
    currency: str
    free: Decimal
    total: Decimal


@dataclass(frozen=True)
class Unreadable:
    """An account whose balances could not be read, and why (the message holds no secret)."""

    account: str
    exchange: str
    error: str


async def read_balances(exchanges: Exchanges, accounts: Accounts, only: str | None = None
                        ) -> tuple[list[Holding], list[Unreadable]]:
    """Every wallet of every configured account (or of `only`), read concurrently; an account
    that cannot be read is reported, not fatal. Raises SpecError for an unknown `only`."""
    chosen = [accounts.get(only)] if only is not None else list(accounts.accounts.values())

    async def one(account_id: str, exchange: str) -> list[Holding] | Unreadable:
        port = exchanges.for_account(account_id)
        held: list[Holding] = []
        for wallet in Wallet:
            try:
                found = await port.balances(wallet)
            except NoSuchWalletError:
                continue
            except RebalancerError as e:
                return Unreadable(account_id, exchange, str(e))
            held += [Holding(account_id, exchange, wallet, currency, free, total)
                     for currency, (free, total) in sorted(found.items())]
        return held

    results = await asyncio.gather(*(one(a.id, a.exchange) for a in chosen))
    holdings = [h for r in results if isinstance(r, list) for h in r]
    failed = [r for r in results if isinstance(r, Unreadable)]
    return holdings, failed


__all__ = ["Holding", "Unreadable", "read_balances"]
