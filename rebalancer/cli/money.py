"""Where the money is: a workflow's result, fills, rate, fees and remainders (`status ID`), and
the money in transit and left behind across workflows (`exposure`)."""

from __future__ import annotations

import argparse
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rebalancer.cli.common import EXIT_OK, with_store
from rebalancer.cli.format import jsonable, money, print_json, table, when
from rebalancer.settings import Settings

if TYPE_CHECKING:
    from projections.workflows import WorkflowView


def _amount(value: Any) -> str:
    """A recorded amount as it reads: no exponent, no trailing zeros; "-" when unknown."""
    if value is None:
        return "-"
    try:
        return money(Decimal(str(value)))
    except ArithmeticError:
        return str(value)


def _rate(value: Any) -> str:
    """A rate to 10 significant digits: the stored one is exact to 18, more than one reads."""
    try:
        found = Decimal(str(value))
    except ArithmeticError:
        return str(value)
    if not found:
        return "0"
    digits = found.adjusted() - 9
    return money(found.quantize(Decimal(1).scaleb(digits)) if digits < 0 else found)


# The dashboard shows amounts and rates as the command line prints them.
amount_text = _amount
rate_text = _rate


def view_money_lines(view: WorkflowView) -> list[str]:
    """The `status ID` lines after the task table: result, fills, rate, fees, remainders."""
    lines = []
    if view.result:
        lines.append("result    " + ", ".join(
            f"{key} = {'-' if value is None else _amount(value)}"
            for key, value in view.result.items()))
    if view.rate is not None:
        r = view.rate
        lines.append(
            f"rate      {_rate(r['rate'])} {r['to_currency']} per {r['from_currency']}"
            f" ({_rate(r['inverse'])} {r['from_currency']} per {r['to_currency']}):"
            f" {_amount(r['to_amount'])} {r['to_currency']} for"
            f" {_amount(r['from_amount'])} {r['from_currency']} spent")
    if view.fees:
        lines.append("fees      " + ", ".join(
            f"{_amount(amount)} {currency}" for currency, amount in view.fees.items()))
    for remainder in view.remainders:
        lines.append(
            f"left      {_amount(remainder['amount'])} {remainder['currency']} on"
            f" {remainder['account']} ({remainder['reason']}, by {remainder['task']})")
    if view.fills:
        lines.append("fills")
        lines.append(table(
            ("task", "account", "side", "market", "filled", "cost", "average price", "slices",
             "fees"),
            ((f["task"], f["account"], f["side"], f"{f['base_currency']}/{f['quote_currency']}",
              _amount(f["filled"]), _amount(f["cost"]), _amount(f["average_price"]),
              "-" if f["slices"] is None else f["slices"],
              ", ".join(f"{_amount(v)} {k}" for k, v in f["fees"].items()) or "-")
             for f in view.fills),
            right=frozenset({4, 5, 6, 7}),
        ))
    return lines


def exposure_report(args: argparse.Namespace, settings: Settings) -> int:
    from projections.exposure import read_exposure

    found = with_store(settings, read_exposure)
    if args.json:
        print_json(jsonable(found))
        return EXIT_OK
    if not found["in_transit"]:
        print("nothing in transit")
    else:
        print("in transit (by workflow)")
        print(table(
            ("to account", "currency", "amount", "from", "workflow", "task", "status",
             "since"),
            ((i["account"], i["currency"], _amount(i["amount"]), i["from_account"] or "-",
              i["workflow_id"], i["task"] or f"#{i['task_index']}", i["status"],
              when(i["since"]))
             for i in found["in_transit"]),
            right=frozenset({2}),
        ))
        print()
        print("in transit (totals)")
        print(table(
            ("account", "currency", "amount", "items", "oldest"),
            ((t["account"], t["currency"], _amount(t["amount"]), t["items"], when(t["oldest"]))
             for t in found["totals"]),
            right=frozenset({2, 3}),
        ))
    print()
    if not found["remainders"]:
        print("nothing left behind")
        return EXIT_OK
    print("left behind (by workflow)")
    print(table(
        ("account", "currency", "amount", "reason", "workflow", "task", "updated_at"),
        ((r["account"], r["currency"], _amount(r["amount"]), r["reason"], r["workflow_id"],
          r["task"], when(r["updated_at"])) for r in found["remainders"]),
        right=frozenset({2}),
    ))
    print()
    print("left behind (totals)")
    print(table(
        ("account", "currency", "amount", "items"),
        ((t["account"], t["currency"], _amount(t["amount"]), t["items"])
         for t in found["remainder_totals"]),
        right=frozenset({2, 3}),
    ))
    return EXIT_OK
