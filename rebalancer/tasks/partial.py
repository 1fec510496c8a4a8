"""A trade that filled less than planned: what filled, what did not, what is left unspent, and
what the spec's `on_partial` makes of it once the last order has ended.

Kept apart from trade.py (which calls `finish` from the places a last slice ends) so that the
policy is one pure decision (`decide`) with the recording around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal

from events.vocabulary import TaskTrigger
from rebalancer.specs.models import (
    DEFAULT_MIN_FILLED_FRACTION,
    DEFAULT_ON_PARTIAL,
    PartialPolicy,
    TradeConfig,
)
from rebalancer.tasks.base import TaskContext, error
from rebalancer.tasks.remedies import command

Outcome = Literal["filled", "continue", "fail", "needs_attention"]
REASON: Final = "partial_fill"  # the remainder's reason and the error code of `fail`
# The fraction as recorded and shown; the decision compares exact amounts.
_FRACTION: Final = Decimal("0.0001")


@dataclass(frozen=True)
class Fill:
    """How much of a plan filled, in the plan's unit: `quote` (a buy by quote amount: its cost
    at the fill prices, as the orders were given) or `base`."""

    unit: str
    currency: str
    planned: Decimal
    filled: Decimal

    @property
    def unfilled(self) -> Decimal:
        # A market buy by quote never spends more than asked; clamped all the same, so an
        # exchange's rounding never shows as a negative amount left.
        return max(self.planned - self.filled, Decimal(0))

    @property
    def fraction(self) -> Decimal:
        return (self.filled / self.planned).quantize(_FRACTION) if self.planned else Decimal(1)

    def to_extra(self) -> dict[str, str]:
        """The figures every finished trade records in refresh_result.extra."""
        return {
            "amount_unit": self.unit,
            "amount_currency": self.currency,
            "planned_amount": plain(self.planned),
            "filled_amount": plain(self.filled),
            "unfilled_amount": plain(self.unfilled),
            "filled_fraction": str(self.fraction),
        }


def measure(unit: str, planned: Decimal, params: dict[str, Any],
            slices: list[dict[str, Any]]) -> Fill:
    """What the recorded slices filled of `planned`, in the plan's `unit`."""
    key = "cost" if unit == "quote" else "filled"
    filled = sum((Decimal(s.get(key) or "0") for s in slices), Decimal(0))
    currency = params.get("quote_currency") if unit == "quote" else params.get("base_currency")
    return Fill(unit, str(currency), planned, filled)


def record(unit: str, planned: Decimal, params: dict[str, Any],
           refresh: dict[str, Any]) -> Fill:
    """Measure the fill and record its figures in `refresh`'s extra (every finished trade)."""
    extra = refresh["extra"]
    fill = measure(unit, planned, params, extra["slices"])
    extra.update(fill.to_extra())
    return fill


def decide(fill: Fill, policy: PartialPolicy, threshold: Decimal) -> Outcome:
    """`filled` when at least `threshold` of the plan filled (exactly: no rounded fraction
    decides), else what the policy says."""
    if fill.filled >= fill.planned * threshold:
        return "filled"
    return policy


def remainder(fill: Fill, config: TradeConfig, extra: dict[str, Any],
              price: Decimal | None) -> dict[str, Any] | None:
    """What the trade was given to spend and did not, on its account: for a buy by quote the
    spec's quote amount less what left the account (fees included), for a sell the base not
    sold; for a buy by base amount the quote the unfilled part would have cost at `price`
    (the limit, else the average fill price), marked `estimated`."""
    if config.side == "buy" and config.quote_amount is not None:
        spent = Decimal(extra.get("cumulative_quote_spent") or extra.get("cumulative_cost") or 0)
        amount, currency, estimated = config.quote_amount - spent, config.quote_currency, False
    elif config.side == "sell" and config.amount is not None:
        amount, currency, estimated = fill.unfilled, config.base_currency, False
    elif price is not None:
        amount, currency, estimated = fill.unfilled * price, config.quote_currency, True
    else:
        return None
    if amount <= 0:
        return None
    left: dict[str, Any] = {"account": config.account, "currency": currency,
                            "amount": plain(amount), "reason": REASON}
    if estimated:
        left["estimated"] = True
    return left


def policy_of(ctx: TaskContext) -> tuple[PartialPolicy, Decimal]:
    spec = ctx.workflow.spec.tasks[ctx.task.index]
    return (spec.on_partial or DEFAULT_ON_PARTIAL,
            spec.min_filled_fraction or DEFAULT_MIN_FILLED_FRACTION)


async def finish(ctx: TaskContext, unit: str, planned: Decimal, refresh: dict[str, Any],
                 price: Decimal | None) -> None:
    """The last slice ended and something filled: record the figures, then done, failed or
    needs_attention as the policy says for a fill below the threshold."""
    policy, threshold = policy_of(ctx)
    extra = refresh["extra"]
    fill = record(unit, planned, ctx.task.request_params or {}, refresh)
    outcome = decide(fill, policy, threshold)
    if outcome == "filled":
        await ctx.move(TaskTrigger.COMPLETE, refresh_result=refresh)
        return
    config = ctx.config(TradeConfig)
    average = Decimal(refresh["result"]["average_price"]) if refresh["result"].get(
        "average_price") else None
    left = remainder(fill, config, extra, price or average)
    extra["remainders"] = [left] if left else []
    slices = extra["slices"]
    extra[REASON] = {
        "policy": policy,
        "min_filled_fraction": str(threshold),
        "slices": len(slices),
        "slices_filled": sum(1 for s in slices if Decimal(s.get("filled") or "0") > 0),
    }
    text = message(ctx.task.name, fill, extra)
    extra[REASON]["message"] = f"{text}; on_partial: {policy}" + (
        ", the workflow carries on with what filled" if outcome == "continue" else "")
    if outcome == "continue":
        await ctx.move(TaskTrigger.COMPLETE, refresh_result=refresh)
    elif outcome == "fail":
        await ctx.move(TaskTrigger.FAIL, refresh_result=refresh,
                       error=error(REASON, f"{text}; on_partial: fail", **{REASON: extra[REASON]}))
    else:
        await ctx.move(TaskTrigger.ESCALATE, refresh_result=refresh,
                       error=error(REASON, f"{text}. {settle_text(config, extra, fill)}",
                                   commands=commands(ctx), **{REASON: extra[REASON]}))


def message(task: str, fill: Fill, extra: dict[str, Any]) -> str:
    """Planned vs filled vs unfilled, and what stays unspent."""
    record = extra[REASON]
    percent = (fill.fraction * 100).normalize()
    text = (f"{task} filled {plain(fill.filled)} of {plain(fill.planned)} {fill.currency}"
            f" planned ({percent:f}%, {record['slices_filled']} of {record['slices']} orders);"
            f" {plain(fill.unfilled)} {fill.currency} unfilled, below the"
            f" {(Decimal(record['min_filled_fraction']) * 100).normalize():f}% required")
    for left in extra.get("remainders") or []:
        about = "about " if left.get("estimated") else ""
        text += f"; {about}{left['amount']} {left['currency']} stays unspent on {left['account']}"
    return text


def settle_text(config: TradeConfig, extra: dict[str, Any], fill: Fill) -> str:
    """What each way of settling it does, in the terms of this trade."""
    got = (f"{plain(Decimal(extra['cumulative_amount_excluding_fee']))} {config.base_currency}"
           " bought" if config.side == "buy" else
           f"{extra.get('cumulative_quote_received')} {config.quote_currency} received")
    return (f"resolve it: done carries on with the {got}, resend sends the unfilled"
            f" {plain(fill.unfilled)} {fill.currency} as one more order, failed (or cancel)"
            f" ends the workflow with both left on {config.account}")


def plain(amount: Decimal) -> str:
    """An amount without trailing zeros or exponent ("249999.96437", "1000000")."""
    return format(amount.normalize(), "f") if amount else "0"


def commands(ctx: TaskContext) -> list[str]:
    """The exact commands that settle it, as `rebalancer status ID` and the alert show them."""
    return [command(ctx.workflow.workflow_id, ctx.task.name, outcome, note) for outcome, note in (
        ("done", "carry on with what filled"),
        ("resend", "send the unfilled part again"),
        ("failed", "stop here, keep what filled"))]


__all__ = ["REASON", "Fill", "Outcome", "commands", "decide", "finish", "measure", "policy_of",
           "record", "remainder"]
