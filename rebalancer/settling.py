"""What an operator states when settling a task (`resolve --outcome done --result k=v`), checked
against the exchange where it can be asked, and turned into the fields later tasks reference.

A `--result` key is a leaf name the task's kind records (specs/recorded.py): `id` of a withdraw
lands at `request_result.id` and `refresh_result.result.id`, `txid` at `refresh_result.result.txid`.
Looked up on the exchange, the operation's own record fills what the operator left out (a
withdrawal's `received`, which the built-in path's deposit references), exactly as a normal
completion would have recorded it; what the operator gave must agree with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from events.vocabulary import TaskKind
from rebalancer.exchanges.base import (
    Deposit,
    Exchanges,
    HistoryMatch,
    Transfer,
    TransferStatus,
    Withdrawal,
    normalise_txid,
)
from rebalancer.money import to_money
from rebalancer.specs.recorded import RECORDED_FIELDS
from rebalancer.tasks.deposit import match_deposit
from rebalancer.workflow import TaskRecord

# Where a leaf may be recorded, in the order they are filled.
_PLACES: Final = ("request_result", "refresh_result.result", "refresh_result.extra")
# Leaves that are amounts: read by the one money parser, compared as Decimals.
_MONEY_PREFIXES: Final = ("amount", "cost", "fee", "received", "average_price", "filled",
                          "cumulative_", "planned_", "unfilled_")
_NOT_MONEY: Final = frozenset({"fee_currency", "cumulative_fee_currency", "amount_unit",
                                 "amount_currency", "filled_fraction"})
# How far before the task's intent the history is searched for the operation named.
_SLACK: Final = timedelta(minutes=5)


class SettlingError(Exception):
    """A stated result that cannot be recorded: `field` names the `--result` key at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def places(kind: TaskKind | str) -> dict[str, list[str]]:
    """Every `--result` key a task of `kind` accepts, with the places it is recorded at."""
    found: dict[str, list[str]] = {}
    for path in sorted(RECORDED_FIELDS[TaskKind(kind)]):
        for place in _PLACES:
            if path.startswith(place + ".") and "." not in path[len(place) + 1:]:
                found.setdefault(path[len(place) + 1:], []).append(place)
    return found


def is_money(key: str) -> bool:
    return key not in _NOT_MONEY and key.startswith(_MONEY_PREFIXES)


def parse_result(kind: TaskKind | str, given: Mapping[str, str]) -> dict[str, str]:
    """The stated result with amounts read by rebalancer/money.py and txids normalised; raises
    SettlingError for a key the kind does not record or an amount that is not one."""
    known = places(kind)
    parsed: dict[str, str] = {}
    for key, value in given.items():
        if key not in known:
            raise SettlingError(key, f"a {kind} task records no {key!r}; it records"
                                     f" {', '.join(sorted(known))}")
        if is_money(key):
            try:
                parsed[key] = str(to_money(value))
            except ValueError as e:
                raise SettlingError(key, f"result {key}: {e}") from None
        elif key == "txid":
            parsed[key] = normalise_txid(value) or value
        else:
            parsed[key] = value
    return parsed


@dataclass(frozen=True)
class Found:
    """The operation as the exchange reports it, in the task kind's recorded form."""

    request_result: dict[str, Any]
    result: dict[str, Any]


async def look_up(exchanges: Exchanges, task: TaskRecord, given: Mapping[str, str]) -> Found | None:
    """The exchange's record of the operation `given` names, checked against what was given;
    None where this kind cannot be looked up by what was given (it is recorded as stated).

    Raises SettlingError when the exchange has no such operation or reports another amount or
    txid; RetryableError (from the port) when the exchange cannot be asked now.
    """
    params = task.request_params or {}
    since = (task.intent_at or datetime.now().astimezone()) - _SLACK
    if task.kind == TaskKind.WITHDRAW and "id" in given and "from_account" in params:
        port = exchanges.for_account(params["from_account"])
        match = HistoryMatch(currency=params["currency"], amount=Decimal(params["amount"]),
                             since=since, address=params.get("address"), exchange_id=given["id"])
        withdrawal = await port.fetch_withdrawal(params["client_id"], match)
        if withdrawal is None or withdrawal.exchange_id != given["id"]:
            raise SettlingError("id", f"{params['from_account']} has no withdrawal {given['id']}"
                                      f" of {params['amount']} {params['currency']} since"
                                      f" {since.isoformat()} for this task")
        found = _withdrawal(withdrawal)
        _agree(given, found, "txid", "amount", "received", "fee")
        return Found({"id": withdrawal.exchange_id, "status": withdrawal.status.value,
                      "raw_status": withdrawal.raw_status}, found)
    if task.kind in (TaskKind.TRANSFER, TaskKind.MASTER_TRANSFER) and "id" in given and params:
        account = params["account"]
        port = exchanges.for_account(account)
        match = HistoryMatch(currency=params["currency"], amount=Decimal(params["amount"]),
                             since=since, exchange_id=given["id"])
        fetch = (port.fetch_transfer if task.kind == TaskKind.TRANSFER
                 else port.fetch_master_transfer)
        transfer = await fetch(params.get("client_id", ""), match)
        if transfer is None or transfer.exchange_id != given["id"]:
            raise SettlingError("id", f"{account} has no transfer {given['id']} of"
                                      f" {params['amount']} {params['currency']} for this task")
        found = _transfer(transfer)
        _agree(given, found, "amount")
        return Found({"id": transfer.exchange_id}, found)
    if task.kind == TaskKind.DEPOSIT and "txid" in given and "account" in params:
        port = exchanges.for_account(params["account"])
        deposits = await port.fetch_deposits(params["currency"],
                                             datetime.fromisoformat(params["since"]))
        deposit = next((d for d in deposits if d.txid == given["txid"]), None)
        if deposit is None:
            raise SettlingError("txid", f"{params['account']} has no {params['currency']}"
                                        f" deposit with txid {given['txid']}")
        found = _deposit(deposit)
        _agree(given, found, "amount")
        return Found({}, found)
    return None


async def look_up_deposit(exchanges: Exchanges, params: Mapping[str, Any]) -> Found | None:
    """The credited deposit a deposit task watches for (by its txid, else its amount, as the
    task itself matches), or None when the exchange shows none credited."""
    port = exchanges.for_account(params["account"])
    deposits = await port.fetch_deposits(params["currency"],
                                         datetime.fromisoformat(params["since"]))
    deposit = match_deposit(deposits, dict(params))
    if deposit is None or deposit.status != TransferStatus.OK:
        return None
    return Found({}, _deposit(deposit))


def _agree(given: Mapping[str, str], found: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if key not in given:
            continue
        theirs = found.get(key)
        same = (theirs is not None and Decimal(theirs) == Decimal(given[key])) if is_money(key) \
            else theirs == given[key]
        if not same:
            raise SettlingError(key, f"the exchange reports {key} {theirs}, not {given[key]}")


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _withdrawal(w: Withdrawal) -> dict[str, Any]:
    # The withdraw processor's own result form (tasks/withdraw.py), so later tasks read the same.
    return {"id": w.exchange_id, "txid": w.txid, "amount": _money(w.amount), "fee": _money(w.fee),
            "received": _money(w.received), "network": w.network, "address": w.address,
            "status": w.status.value, "internal": w.internal, "raw_status": w.raw_status}


def _transfer(t: Transfer) -> dict[str, Any]:
    return {"id": t.exchange_id, "amount": _money(t.amount), "status": t.status.value}


def _deposit(d: Deposit) -> dict[str, Any]:
    return {"id": d.exchange_id, "txid": d.txid, "amount": _money(d.amount),
            "status": d.status.value, "internal": d.internal, "raw_status": d.raw_status}


def settled_fields(task: TaskRecord, given: Mapping[str, str], found: Found | None,
                   note: str) -> dict[str, Any]:
    """The request_result and refresh_result a resolve_done records: what was recorded, then
    the exchange's record, then what the operator stated, at the places the kind records them."""
    request_result = dict(task.request_result or {})
    old = task.refresh_result or {}
    result = dict(old.get("result") or {})
    extra = dict(old.get("extra") or {})
    if found is not None:
        request_result.update(found.request_result)
        result.update(found.result)
    targets = {"request_result": request_result, "refresh_result.result": result,
               "refresh_result.extra": extra}
    for key, value in given.items():
        for place in places(task.kind)[key]:
            targets[place][key] = value
    if given or found is not None:
        extra.setdefault("status", "done")
        if task.kind == TaskKind.WITHDRAW:
            extra.setdefault("remainders", (task.request_params or {}).get("remainders", []))
    carried: dict[str, Any] = {
        "refresh_result": {**old, "result": result, "extra": extra, "resolution": note}
        if (given or found is not None) else {**old, "resolution": note},
    }
    if request_result != (task.request_result or {}):
        carried["request_result"] = request_result
    return carried


__all__ = ["Found", "SettlingError", "is_money", "look_up", "look_up_deposit", "parse_result",
           "places",
           "settled_fields"]
