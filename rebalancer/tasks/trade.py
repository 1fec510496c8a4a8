"""Trades, optionally sliced (TWAP): each slice is its own intent and client id, recorded first."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from events.vocabulary import TaskKind, TaskState, TaskTrigger
from rebalancer.errors import RejectedError
from rebalancer.exchanges.base import (
    Exchange,
    MarketRules,
    Order,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
    floor_to,
)
from rebalancer.specs.models import TradeConfig
from rebalancer.tasks import partial
from rebalancer.tasks.base import Processor, TaskContext, error, reconcile_lookup
from rebalancer.tasks.remedies import commands_for

log = logging.getLogger(__name__)

FINISHED = (OrderStatus.CLOSED, OrderStatus.CANCELED, OrderStatus.REJECTED)
CANCELED = "canceled"  # the reason of a canceled trade's remainder


@dataclass(frozen=True)
class Plan:
    """The slices of one trade: amounts in `unit` ("quote": spend this much, "base": this much).

    `price` is a limit order's price on the market's tick (None for a market order).
    `planned` is set once an operator's resend added an order for the unfilled part: the
    amount first planned, which fills are measured against (else the slices' sum).
    """

    unit: str
    amounts: list[Decimal]
    interval: float
    price: Decimal | None = None
    planned: Decimal | None = None

    @property
    def total(self) -> Decimal:
        return self.planned if self.planned is not None else sum(self.amounts, Decimal(0))

    def to_data(self) -> dict[str, Any]:
        data = {
            "unit": self.unit,
            "amounts": [str(a) for a in self.amounts],
            "interval_seconds": self.interval,
            "price": _str(self.price),
        }
        if self.planned is not None:
            data["planned"] = str(self.planned)
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Plan:
        # Plans stored before prices were rounded carry no "price": the config's is used.
        price, planned = data.get("price"), data.get("planned")
        return cls(
            data["unit"], [Decimal(a) for a in data["amounts"]], float(data["interval_seconds"]),
            Decimal(price) if price is not None else None,
            Decimal(planned) if planned is not None else None,
        )


def round_price(rules: MarketRules, price: Decimal, side: Side) -> Decimal:
    """`price` on the market's tick: a buy rounds down, a sell rounds up.

    Both directions keep the user's limit a limit: a buy never pays more than the price
    asked, a sell never sells for less. Where the tick depends on the price (Upbit's KRW
    table), rounding up can cross into a coarser band, so it repeats until the price sits on
    its own band's tick.
    """
    rounding = ROUND_FLOOR if side == Side.BUY else ROUND_CEILING
    rounded = price
    for _ in range(len(rules.price_ticks) + 1):
        tick = rules.price_tick(rounded)
        rounded = (rounded / tick).to_integral_value(rounding=rounding) * tick
        if rounded % rules.price_tick(rounded) == 0:
            break
    return rounded


def plan_slices(
    total: Decimal, wanted: int, min_notional: Decimal, notional_per_unit: Decimal, quantum: Decimal
) -> list[Decimal]:
    """Split `total` into at most `wanted` slices, none below the minimum notional.

    The count is capped at total / minimum (in notional terms); every slice but the last is
    rounded down to `quantum` and the remainder is folded into the last slice, so the slices
    add up to `total` exactly. Empty when even one slice would be below the minimum.
    """
    notional = total * notional_per_unit
    cap = int(notional / min_notional) if min_notional > 0 else wanted
    count = max(0, min(wanted, cap))
    if count == 0:
        return []
    each = floor_to(total / count, quantum)
    if each <= 0:
        return [total]
    return [each] * (count - 1) + [total - each * (count - 1)]


class TradeProcessor(Processor):
    kind = TaskKind.TRADE

    async def request(self, ctx: TaskContext) -> None:
        """From `created`: the first slice, or the next one after a refused/never-landed slice."""
        config = ctx.config(TradeConfig)
        exchange = ctx.exchange(config.account)
        plan = _stored_plan(ctx)
        if plan is not None and len(_slices(ctx)) >= len(plan.amounts):
            # An operator's resend after the last slice.
            plan = await self._resent(ctx, config, exchange, plan)
        elif plan is None:
            plan = await self._make_plan(ctx, config, exchange)
        if plan is None:
            return
        if self._waiting(ctx, plan):
            return
        await self._send_slice(ctx, config, exchange, plan, TaskTrigger.SUBMIT)

    async def _resent(
        self, ctx: TaskContext, config: TradeConfig, exchange: Exchange, plan: Plan
    ) -> Plan | None:
        """Every slice ended and an operator resent the task (a partial fill's attention): one
        more order for the unfilled part, on the market's step. Escalated again while an order
        may still rest on the exchange, or when what is left is no order the market takes."""
        slices = _slices(ctx)
        fill = partial.measure(plan.unit, plan.total, ctx.task.request_params or {}, slices)
        # Filled as the spec counts it (a market order's step dust included): nothing to send.
        filled = partial.decide(fill, "needs_attention", partial.policy_of(ctx)[1]) == "filled"
        why = (" it filled; resolve done" if filled else " one may still be open on the"
               " exchange: cancel it there, then resolve done or failed")
        amount = fill.unfilled
        if not filled and not any(s["status"] == "open" for s in slices):
            symbol = f"{config.base_currency}/{config.quote_currency}"
            rules = await exchange.market(symbol)
            if plan.unit == "quote":
                amount = floor_to(amount, _quote_quantum(config.quote_currency))
                notional = amount
            else:
                amount = floor_to(amount, rules.amount_step)
                notional = amount * (plan.price or await exchange.ticker_price(symbol))
            if amount <= 0 or notional < rules.min_notional:
                why = (f" the {fill.unfilled} {fill.currency} left is below {symbol}'s minimum"
                       f" order of {rules.min_notional} {rules.quote}; resolve done or failed")
                filled = True  # nothing the exchange would take
        if filled or any(s["status"] == "open" for s in slices):
            await ctx.move(TaskTrigger.ESCALATE, error=error(
                "nothing_to_resend",
                f"{ctx.task.name}: every order of the plan was sent and" + why,
                commands=partial.commands(ctx)[::2]))
            return None
        return replace(plan, amounts=[*plan.amounts, amount], planned=plan.total)

    async def reconcile(self, ctx: TaskContext) -> None:
        found = await reconcile_lookup(ctx, lambda: self._lookup(ctx))
        if found is not None:
            await self._follow(ctx, found)

    async def refresh(self, ctx: TaskContext) -> None:
        order = await self._lookup(ctx)
        if order is not None:
            await self._follow(ctx, order)

    async def _lookup(self, ctx: TaskContext) -> Order | None:
        params = ctx.task.request_params or {}
        exchange = ctx.exchange(params["account"])
        return await exchange.fetch_order(params["client_id"], params["symbol"])

    async def _make_plan(
        self, ctx: TaskContext, config: TradeConfig, exchange: Exchange
    ) -> Plan | None:
        symbol = f"{config.base_currency}/{config.quote_currency}"
        rules = await exchange.market(symbol)
        spec = ctx.workflow.spec.tasks[ctx.task.index]
        wanted = spec.twap.slices if spec.twap else 1
        interval = spec.twap.interval_seconds if spec.twap else 0.0
        price: Decimal | None = None
        if config.order_type == OrderType.LIMIT and config.price is not None:
            price = round_price(rules, config.price, Side(config.side))
            if price <= 0:
                await ctx.move(
                    TaskTrigger.FAIL,
                    error=error(
                        "invalid_price",
                        f"price {config.price} rounds to {price} on {symbol}'s tick of"
                        f" {rules.price_tick(config.price)} {rules.quote}",
                        price=str(config.price),
                    ),
                )
                return None
        if config.quote_amount is not None:
            if config.side != "buy":
                await ctx.move(
                    TaskTrigger.FAIL, error=error("unsupported", "a sell is given in base amount")
                )
                return None
            quantum = _quote_quantum(config.quote_currency)
            total = config.quote_amount
            if rules.buy_fee_on_top:
                # Where the fee comes on top (Upbit), the orders spend less, so that orders and
                # fees together stay within the amount the spec gives.
                total = floor_to(total / (1 + rules.taker_fee), quantum)
            amounts = plan_slices(total, wanted, rules.min_notional, Decimal(1), quantum)
            unit = "quote"
        else:
            assert config.amount is not None
            if (
                config.side == "buy" and config.order_type == OrderType.MARKET
                and rules.market_buy_by_quote_only
            ):
                # Refused here, before any intent: the exchange would only refuse it after.
                await ctx.move(
                    TaskTrigger.FAIL,
                    error=error(
                        "unsupported",
                        f"{exchange.exchange} buys {symbol} at market by {rules.quote} amount"
                        f" only: give quote_amount (how much {rules.quote} to spend) instead"
                        f" of amount",
                    ),
                )
                return None
            notional_price = price or await exchange.ticker_price(symbol)
            amounts = plan_slices(
                config.amount, wanted, rules.min_notional, notional_price, rules.amount_step
            )
            unit = "base"
        if not amounts:
            given = config.quote_amount or config.amount
            await ctx.move(
                TaskTrigger.FAIL,
                error=error(
                    "below_minimum",
                    f"{given} is below the minimum order of {rules.min_notional}"
                    f" {rules.quote} on {symbol}",
                ),
            )
            return None
        return Plan(unit, amounts, interval, price)

    def _waiting(self, ctx: TaskContext, plan: Plan) -> bool:
        """Slices after the first wait `interval` seconds after the previous slice's intent."""
        if not _slices(ctx) or ctx.task.intent_at is None:
            return False
        due = ctx.task.intent_at + timedelta(seconds=plan.interval)
        if ctx.now < due:
            ctx.wake_at = due
            return True
        return False

    async def _send_slice(
        self, ctx: TaskContext, config: TradeConfig, exchange: Exchange, plan: Plan,
        trigger: TaskTrigger,
    ) -> None:
        index = len(_slices(ctx))
        amount = plan.amounts[index]
        client_id = ctx.next_client_id()
        symbol = f"{config.base_currency}/{config.quote_currency}"
        price = plan.price if plan.price is not None else config.price
        params = {
            "account": config.account,
            "symbol": symbol,
            "side": config.side,
            "order_type": config.order_type,
            "base_currency": config.base_currency,
            "quote_currency": config.quote_currency,
            "price": _str(price),  # as sent: on the market's tick
            "requested_price": _str(config.price),
            "amount": str(amount) if plan.unit == "base" else None,
            "quote_amount": str(amount) if plan.unit == "quote" else None,
            "slice": index,
            "slices": len(plan.amounts),
            "plan": plan.to_data(),
            "client_id": client_id,
        }
        request = OrderRequest(
            client_id=client_id,
            symbol=symbol,
            side=Side(config.side),
            type=OrderType(config.order_type),
            amount=amount if plan.unit == "base" else None,
            quote_amount=amount if plan.unit == "quote" else None,
            price=price,
        )
        carried: dict[str, Any] = {"request_params": params}
        if trigger == TaskTrigger.NEXT_SLICE:
            carried["refresh_result"] = ctx.task.refresh_result
        await ctx.move(trigger, **carried)
        try:
            order = await exchange.create_order(request)
        except RejectedError as e:
            await self._slice_refused(ctx, plan, str(e))
            return
        await self._follow(ctx, order)

    async def _slice_refused(self, ctx: TaskContext, plan: Plan, message: str) -> None:
        slices = [
            *_slices(ctx),
            {
                "slice": len(_slices(ctx)),
                "status": "rejected",
                "client_id": ctx.task.client_id,
                "error": message,
            },
        ]
        refresh = _refresh(slices, ctx)
        if len(slices) < len(plan.amounts):
            # Never landed: back to created; the next step sends the next slice.
            await ctx.move(
                TaskTrigger.RESET,
                refresh_result=refresh,
                error=error("slice_rejected", message, slice=len(slices) - 1),
            )
        elif _filled(slices) > 0:
            await partial.finish(ctx, plan.unit, plan.total, refresh, plan.price)
        else:
            partial.record(plan.unit, plan.total, ctx.task.request_params or {}, refresh)
            await ctx.move(
                TaskTrigger.FAIL, refresh_result=refresh, error=error("rejected", message)
            )

    async def _follow(self, ctx: TaskContext, order: Order) -> None:
        """Record the current slice's order as the exchange reports it, and move on."""
        plan = _stored_plan(ctx)
        assert plan is not None
        done = _slices(ctx)
        index = (ctx.task.request_params or {}).get("slice", len(done))
        current = _slice_record(index, order)
        slices = [s for s in done if s["slice"] != index] + [current]
        refresh = _refresh(slices, ctx)
        state = ctx.task.state
        changed = refresh != ctx.task.refresh_result
        request_result = {"order_id": order.exchange_id, "status": order.status.value}
        if order.status not in FINISHED:
            if state in (TaskState.SUBMITTING, TaskState.REQUESTED):
                await ctx.move(
                    TaskTrigger.OPEN, request_result=request_result, refresh_result=refresh
                )
            elif changed:
                await ctx.move(TaskTrigger.FILL, refresh_result=refresh)
            return
        last = index >= len(plan.amounts) - 1
        if state == TaskState.SUBMITTING and not last:
            await ctx.move(
                TaskTrigger.ACCEPT, request_result=request_result, refresh_result=refresh
            )
            return
        if last:
            if _filled(slices) > 0:
                await partial.finish(ctx, plan.unit, plan.total, refresh, plan.price)
            else:
                partial.record(plan.unit, plan.total, ctx.task.request_params or {}, refresh)
                await ctx.move(
                    TaskTrigger.FAIL,
                    refresh_result=refresh,
                    error=error(
                        "not_filled", f"the order ended {order.raw_status} with nothing filled"
                    ),
                )
            return
        if changed and state == TaskState.OPEN:
            await ctx.move(TaskTrigger.FILL, refresh_result=refresh)
            return
        if ctx.holding:
            return  # paused, or being canceled: what was sent settles, no next slice is sent
        if self._waiting(ctx, plan):
            return
        config = ctx.config(TradeConfig)
        exchange = ctx.exchange(config.account)
        await self._send_slice(ctx, config, exchange, plan, TaskTrigger.NEXT_SLICE)

    async def cancel(self, ctx: TaskContext) -> None:
        """`canceling`: cancel the current slice's order if it rests on the exchange, read it
        back, and end `canceled` with what filled and the unspent part as a remainder.

        The cancel request is already stored (request_cancel), so a restarted worker comes
        back here: it reads the order first and asks for a cancel only while the exchange
        shows it open; a lost answer to the cancel is settled by that read, never by a guess.
        """
        params = ctx.task.request_params
        if params is None or _slice_ended(ctx):
            await _end_canceled(ctx, None)  # between slices: nothing rests on the exchange
            return
        order = await self._lookup(ctx)
        if order is not None and order.status not in FINISHED:
            exchange = ctx.exchange(params["account"])
            try:
                await exchange.cancel_order(params["client_id"], params["symbol"])
            except RejectedError as e:
                # It ended meanwhile (filled, or canceled by an earlier try whose answer was
                # lost): the read below says which.
                log.info("workflow %s %s: cancel of order %s refused (%s); reading it back",
                         ctx.workflow.workflow_id[:8], ctx.task.name, params["client_id"], e,
                         extra={"workflow_id": ctx.workflow.workflow_id, "task": ctx.task.name})
            order = await self._lookup(ctx)
        if order is None:
            if _canceled_from(ctx) in (TaskState.CREATED, TaskState.SUBMITTING):
                # Never acknowledged and the exchange has no such order: it never landed.
                await _end_canceled(ctx, None)
            else:
                await ctx.move(TaskTrigger.ESCALATE, error=error(
                    "unknown_outcome", f"order {params['client_id']} was acknowledged but the"
                    " exchange no longer knows it: check what filled by hand",
                    commands=commands_for(ctx.workflow.workflow_id, ctx.task)))
            return
        if order.status in FINISHED:
            await _end_canceled(ctx, order)
        # Still open (the exchange has a cancel pending): the next poll reads it again.


# -- canceling (kept apart from completion: the policies of a partial fill live there) --------


def _slice_ended(ctx: TaskContext) -> bool:
    """Whether the current slice's order is recorded as ended: nothing of it rests."""
    index = (ctx.task.request_params or {}).get("slice")
    return any(s["slice"] == index and s["status"] in FINISHED for s in _slices(ctx))


def _canceled_from(ctx: TaskContext) -> str | None:
    """The state the task was in when the cancel was asked for (commands.py records it)."""
    return (ctx.task.error or {}).get("from_state")


async def _end_canceled(ctx: TaskContext, order: Order | None) -> None:
    """`canceling -> canceled`, recording `order` (the current slice as it ended) with the
    earlier slices, the planned/filled/unfilled figures every finished trade records, and what
    the trade did not spend as a remainder (reason `canceled`)."""
    params = ctx.task.request_params or {}
    slices = _slices(ctx)
    if order is not None:
        index = params.get("slice", len(slices))
        slices = [s for s in slices if s["slice"] != index] + [_slice_record(index, order)]
    refresh = _refresh(slices, ctx)
    plan = _stored_plan(ctx)
    if plan is not None:
        extra = refresh["extra"]
        fill = partial.record(plan.unit, plan.total, params, refresh)
        average = refresh["result"].get("average_price")
        price = plan.price or (Decimal(average) if average else None)
        if price is None and params.get("side") == "buy" and plan.unit == "base":
            # A market buy given in base that filled nothing: the quote it would have cost.
            price = await ctx.exchange(params["account"]).ticker_price(params["symbol"])
        left = partial.remainder(fill, ctx.config(TradeConfig), extra, price)
        extra["remainders"] = [{**left, "reason": CANCELED}] if left else []
        extra["slices_planned"] = len(plan.amounts)
    asked = ctx.task.error or {}
    await ctx.move(TaskTrigger.CANCEL, refresh_result=refresh, error=error(
        "canceled", asked.get("message") or "canceled", actor=asked.get("actor")))


def _quote_quantum(currency: str) -> Decimal:
    """The step a spend in `currency` is planned in: whole won, else satoshi-like units."""
    return Decimal(1) if currency == "KRW" else Decimal("0.00000001")


def _stored_plan(ctx: TaskContext) -> Plan | None:
    data = (ctx.task.request_params or {}).get("plan")
    return Plan.from_data(data) if data else None


def _slices(ctx: TaskContext) -> list[dict[str, Any]]:
    extra = (ctx.task.refresh_result or {}).get("extra") or {}
    return list(extra.get("slices") or [])


def _slice_record(index: int, order: Order) -> dict[str, Any]:
    return {
        "slice": index,
        "client_id": order.client_id,
        "order_id": order.exchange_id,
        "status": order.status.value,
        "raw_status": order.raw_status,
        "filled": str(order.filled),
        "cost": str(order.cost),
        "fee": str(order.fee),
        "fee_currency": order.fee_currency,
        "average_price": _str(order.average_price),
    }


def _filled(slices: list[dict[str, Any]]) -> Decimal:
    return sum((Decimal(s.get("filled", "0")) for s in slices), Decimal(0))


def _refresh(slices: list[dict[str, Any]], ctx: TaskContext) -> dict[str, Any]:
    """Cumulative figures over every slice; what later tasks reference.

    A fee in a third currency (BNB at Binance) is neither base nor quote: it shows in `fees`
    (by currency) and leaves the base and quote figures alone.
    """
    params = ctx.task.request_params or {}
    base, quote = params.get("base_currency"), params.get("quote_currency")
    filled = cost = Decimal(0)
    fees: dict[str, Decimal] = {}
    for s in slices:
        filled += Decimal(s.get("filled", "0"))
        cost += Decimal(s.get("cost", "0"))
        fee, currency = Decimal(s.get("fee", "0")), s.get("fee_currency")
        if fee and currency:
            fees[currency] = fees.get(currency, Decimal(0)) + fee
    base_fee = fees.get(str(base), Decimal(0))
    quote_fee = fees.get(str(quote), Decimal(0))
    side = params.get("side")
    # A buy spends the cost plus any fee taken in quote; a sell receives the cost less it.
    spent = cost + quote_fee if side == "buy" else None
    received = cost - quote_fee if side == "sell" else None
    average = (cost / filled) if filled else None
    status = "done" if slices and all(s["status"] != "open" for s in slices) else "open"
    # One fee figure needs one currency: with fees in several, it is null (see `fees`).
    if len(fees) > 1:
        fee_total: str | None = None
        fee_currency: str | None = None
    else:
        (fee_currency, amount), = fees.items() if fees else ((quote, Decimal(0)),)
        fee_total = str(amount)
    return {
        "result": {
            "amount": str(filled),
            "filled": str(filled),
            "cost": str(cost),
            "fee": fee_total,
            "fee_currency": fee_currency,
            "average_price": _str(average),
            "status": status,
        },
        "extra": {
            "slices": slices,
            "cumulative_amount": str(filled),
            "cumulative_amount_excluding_fee": str(filled - base_fee),
            "cumulative_cost": str(cost),
            "cumulative_quote_spent": _str(spent),
            "cumulative_quote_received": _str(received),
            # Deprecated alias (misnamed: it is spent for a buy, received for a sell).
            "cumulative_cost_excluding_fee": str(spent if spent is not None else received),
            "cumulative_fee": fee_total,
            "fees": {currency: str(amount) for currency, amount in sorted(fees.items())},
            "status": status,
        },
    }


def _str(value: Decimal | None) -> str | None:
    return None if value is None else str(value)
