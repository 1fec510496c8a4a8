"""The `rebalancer sim` commands as plain functions: seed, check and ledger, plus their output."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from rebalancer.accounts import Accounts
from rebalancer.exchanges.simulated import SimulatedWorld


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


async def check(database_url: str) -> tuple[bool, list[dict[str, Any]]]:
    """Per currency: `currency`, `seeded`, `current`, `difference`; ok is False if any differ
    (or the world was never seeded)."""
    async with await _open(database_url) as world:
        return await world.check()


async def ledger(database_url: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Executed operations, oldest first (the last `limit` when given)."""
    async with await _open(database_url) as world:
        return await world.ledger(limit)


# -- output ---------------------------------------------------------------------------------


def money(value: Decimal | None) -> str:
    """A Decimal as a plain string: no exponent, no trailing zeros."""
    if value is None:
        return ""
    text = f"{value.normalize():f}"
    return "0" if text in ("-0", "0") else text


def jsonable(value: Any) -> Any:
    """Decimals and datetimes as strings, recursively, for `--json` output."""
    if isinstance(value, Decimal):
        return money(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def to_json(value: Any) -> str:
    return json.dumps(jsonable(value), indent=2)


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_seed(result: dict[str, Any]) -> str:
    lines = [str(result["message"])]
    balances: dict[str, dict[str, Decimal]] = result.get("balances") or {}
    if balances:
        rows = [[account, currency, money(amount)]
                for account, held in balances.items() for currency, amount in held.items()]
        lines += ["", _table(["account", "currency", "amount"], rows, {2})]
    totals: dict[str, Decimal] = result.get("totals") or {}
    if totals:
        rows = [[currency, money(amount)] for currency, amount in totals.items()]
        lines += ["", _table(["currency", "seeded total"], rows, {1})]
    return "\n".join(lines)


def format_check(ok: bool, rows: list[dict[str, Any]]) -> str:
    if not rows and not ok:
        return "FAIL: the simulated world is not seeded (run `rebalancer sim seed`)"
    table = _table(
        ["currency", "seeded", "current", "difference"],
        [[r["currency"], money(r["seeded"]), money(r["current"]), money(r["difference"])]
         for r in rows],
        {1, 2, 3},
    )
    changed = [r["currency"] for r in rows if r["difference"] != 0]
    verdict = ("OK: every currency's total is unchanged" if ok
               else "FAIL: totals changed for " + (", ".join(changed) or "an unseeded world"))
    return f"{table}\n{verdict}"


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
    return _table(
        ["id", "at", "exchange", "account", "kind", "client id", "cur", "amount", "fee",
         "status", "txid", "detail"],
        table_rows, {0, 7},
    )


__all__ = [
    "check",
    "format_check",
    "format_ledger",
    "format_seed",
    "jsonable",
    "ledger",
    "money",
    "seed",
    "to_json",
]
