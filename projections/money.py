"""Where a workflow's money went, from what its tasks recorded: the spec's result, each trade's
fills, the effective rate, fees per currency and remainders left behind.

Pure functions of the folded tasks (no I/O), run once per workflow per projection batch, never
per event. They never raise on odd recorded data: a value that is not what a task of its kind
records is skipped, because a projection that raised would stop on a poison event.

The spec's `result` templates are filled in here rather than by `rebalancer.specs` (projections
may not import the service): only from tasks that are done, so a value shown is final, and null
until then. `{param}` is the stored param (an account as its id); `{param.attr}` needs the
accounts configuration, which the events do not carry, and stays null.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation, localcontext
from typing import TYPE_CHECKING, Any

from events.vocabulary import TaskKind, TaskState

if TYPE_CHECKING:
    from projections.workflows import TaskView

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_RESULT = re.compile(r"\$\.([A-Za-z][A-Za-z0-9_]*)\.([A-Za-z0-9_.]+)")
_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RATE_DIGITS = 18  # significant digits of a rate: exact enough, short enough to read


class _Unknown(Exception):
    """A reference with nothing (final) to fill it yet."""


def dec(value: Any) -> Decimal | None:
    """A recorded decimal string (or int) as a Decimal; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        return None
    try:
        found = Decimal(value)
    except (InvalidOperation, ValueError):
        return None
    return found if found.is_finite() else None


def text(value: Decimal) -> str:
    """An exact amount as a plain decimal string ("1000000", never "1E+6")."""
    return format(value, "f")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _walk(node: Any, path: str) -> Any:
    for step in path.split("."):
        if isinstance(node, Mapping) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            raise _Unknown
    return node


def _lookup(body: str, params: Mapping[str, Any], done: Mapping[str, TaskView]) -> Any:
    match = _RESULT.fullmatch(body)
    if match is not None:
        task = done.get(match.group(1).lower())
        if task is None:
            raise _Unknown
        recorded = {"request_params": task.request_params or {},
                    "request_result": task.request_result or {},
                    "refresh_result": task.refresh_result or {}}
        return _walk(recorded, match.group(2))
    if _PARAM.fullmatch(body) and body in params:
        return params[body]
    raise _Unknown  # {param.attr}, or anything validation would have refused


def _render(template: str, params: Mapping[str, Any], done: Mapping[str, TaskView]) -> Any:
    parts = list(_TOKEN.finditer(template))
    whole = len(parts) == 1 and parts[0].group(1) is not None and parts[0].span() == (
        0, len(template))
    if whole:
        return _lookup(parts[0].group(1), params, done)
    out, end = [], 0
    for match in parts:
        out.append(template[end:match.start()])
        end = match.end()
        if match.group(1) is None:
            out.append(match.group(0)[0])  # an escaped brace
            continue
        value = _lookup(match.group(1), params, done)
        if value is None or isinstance(value, dict | list):
            raise _Unknown
        out.append(text(value) if isinstance(value, Decimal) else str(value))
    out.append(template[end:])
    return "".join(out)


def evaluate_result(
    spec: Mapping[str, Any], params: Mapping[str, Any], tasks: Iterable[TaskView]
) -> dict[str, Any]:
    """The spec's `result`, each entry filled in from the tasks that are done (else null)."""
    templates = _dict(spec.get("result"))
    if not templates:
        return {}
    done = {t.name: t for t in tasks if t.state == TaskState.DONE and t.name}
    out: dict[str, Any] = {}
    for key, template in templates.items():
        try:
            out[key] = _render(template, params, done) if isinstance(template, str) else None
        except _Unknown:
            out[key] = None
    return out


def fills(tasks: Iterable[TaskView]) -> list[dict[str, Any]]:
    """Per trade task that filled anything or was sent: what filled, at what average price."""
    found = []
    for task in tasks:
        if task.kind != TaskKind.TRADE or not isinstance(task.request_params, dict):
            continue
        params = task.request_params
        refresh = _dict(task.refresh_result)
        result, extra = _dict(refresh.get("result")), _dict(refresh.get("extra"))
        filled = dec(extra.get("cumulative_amount")) or dec(result.get("filled"))
        cost = dec(extra.get("cumulative_cost")) or dec(result.get("cost"))
        average = dec(result.get("average_price"))
        if average is None and filled and cost is not None:
            with localcontext() as ctx:
                ctx.prec = RATE_DIGITS
                average = cost / filled
        slices = extra.get("slices")
        found.append({
            "task": task.name,
            "state": str(task.state),
            "account": params.get("account"),
            "side": params.get("side"),
            "base_currency": params.get("base_currency"),
            "quote_currency": params.get("quote_currency"),
            "requested_amount": params.get("amount"),
            "requested_quote_amount": params.get("quote_amount"),
            "filled": None if filled is None else text(filled),
            "cost": None if cost is None else text(cost),
            "average_price": None if average is None else text(average),
            "quote_spent": extra.get("cumulative_quote_spent"),
            "quote_received": extra.get("cumulative_quote_received"),
            "slices": len(slices) if isinstance(slices, list) else None,
            # In the plan's unit (base, or quote for a buy by quote amount), once it finished.
            "amount_unit": extra.get("amount_unit"),
            "amount_currency": extra.get("amount_currency"),
            "planned_amount": extra.get("planned_amount"),
            "filled_amount": extra.get("filled_amount"),
            "unfilled_amount": extra.get("unfilled_amount"),
            "filled_fraction": extra.get("filled_fraction"),
            "fees": {k: v for k, v in _dict(extra.get("fees")).items() if dec(v) is not None},
        })
    return found


def fees(tasks: Iterable[TaskView]) -> dict[str, str]:
    """Every fee charged, totalled per currency: trades' `fees`, done withdrawals' `fee`."""
    totals: dict[str, Decimal] = {}

    def add(currency: Any, amount: Decimal | None) -> None:
        if isinstance(currency, str) and currency and amount:
            totals[currency] = totals.get(currency, Decimal(0)) + amount

    for task in tasks:
        refresh = _dict(task.refresh_result)
        if task.kind == TaskKind.TRADE:
            for currency, amount in _dict(_dict(refresh.get("extra")).get("fees")).items():
                add(currency, dec(amount))
        elif task.kind == TaskKind.WITHDRAW and task.state == TaskState.DONE:
            # A withdrawal's fee is in the currency withdrawn; charged once it was sent.
            add(_dict(task.request_params).get("currency"),
                dec(_dict(refresh.get("result")).get("fee")))
    return {currency: text(totals[currency]) for currency in sorted(totals)}


def remainders(tasks: Iterable[TaskView]) -> list[dict[str, Any]]:
    """What tasks recorded as left behind (`refresh_result.extra.remainders`), with the
    account it stays on: the remainder's own, else the task's source account."""
    found = []
    for task in tasks:
        params = _dict(task.request_params)
        listed = _dict(_dict(task.refresh_result).get("extra")).get("remainders")
        for item in listed if isinstance(listed, list) else []:
            if not isinstance(item, dict) or dec(item.get("amount")) is None:
                continue
            account = item.get("account") or params.get("from_account") or params.get("account")
            found.append({"account": account, "currency": item.get("currency"),
                          "amount": item.get("amount"), "reason": item.get("reason"),
                          "task": task.name})
    return found


def spent_in(currency: Any, tasks: Iterable[TaskView]) -> Decimal | None:
    """How much of `currency` the workflow's trades spent (a buy's quote, a sell's base)."""
    total: Decimal | None = None
    for task in tasks:
        if task.kind != TaskKind.TRADE:
            continue
        params = _dict(task.request_params)
        extra = _dict(_dict(task.refresh_result).get("extra"))
        spent = None
        if params.get("side") == "buy" and params.get("quote_currency") == currency:
            spent = dec(extra.get("cumulative_quote_spent"))
        elif params.get("side") == "sell" and params.get("base_currency") == currency:
            spent = dec(extra.get("cumulative_amount"))
        if spent is not None:
            total = spent + (total or Decimal(0))
    return total


def rate(
    params: Mapping[str, Any], to_amount: Any, tasks: list[TaskView]
) -> dict[str, Any] | None:
    """The effective rate from `from_currency` to `to_currency`: what arrived over what was
    spent (the trades' spending in the source currency; `from_amount` when no trade spent it).
    None until both are known."""
    source, target = params.get("from_currency"), params.get("to_currency")
    arrived = dec(to_amount)
    spent = spent_in(source, tasks)
    if spent is None:
        spent = dec(params.get("from_amount"))
    if not (isinstance(source, str) and isinstance(target, str) and arrived and spent):
        return None
    with localcontext() as ctx:
        ctx.prec = RATE_DIGITS
        forward, inverse = arrived / spent, spent / arrived
    return {"from_currency": source, "from_amount": text(spent), "to_currency": target,
            "to_amount": text(arrived), "rate": text(forward), "inverse": text(inverse)}


__all__ = ["dec", "evaluate_result", "fees", "fills", "rate", "remainders", "spent_in", "text"]
