"""How a simulated market takes an order: the exchange's order rules and the fill price."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from rebalancer.errors import RejectedError
from rebalancer.exchanges.base import OrderRequest, OrderType, Side, floor_to
from rebalancer.exchanges.simulated.spec import MarketSpec


@dataclass(frozen=True)
class Taken:
    """An accepted order: `amount` of base on the step, at `price`; `resting` waits for fills."""

    amount: Decimal
    price: Decimal
    resting: bool


def price_order(exchange: str, request: OrderRequest, market: MarketSpec) -> Taken:
    """Check `request` against the market's rules; raises RejectedError for what it refuses.

    A market order trades at once at the touch; a limit order through the touch too, at the
    better book price; any other limit order rests at its own price.
    """
    quote = request.symbol.split("/")[1]
    side = Side(request.side)
    if request.amount is not None and request.quote_amount is not None:
        raise RejectedError("give either amount or quote_amount, not both")
    if request.quote_amount is not None and (
            side != Side.BUY or request.type != OrderType.MARKET):
        raise RejectedError("quote_amount is for market buys only")
    if request.type == OrderType.MARKET and request.price is not None:
        raise RejectedError("a market order takes no price")
    if request.type == OrderType.MARKET:
        price = market.ask if side == Side.BUY else market.bid
        if side == Side.BUY and market.market_buy_by_quote_only and request.amount is not None:
            raise RejectedError(
                f"{exchange}: a market buy is given by {quote} amount (quote_amount) only")
        if request.quote_amount is not None:
            if request.quote_amount <= 0:
                raise RejectedError("quote_amount must be positive")
            notional = request.quote_amount
            amount = floor_to(request.quote_amount / price, market.amount_step)
        else:
            if request.amount is None or request.amount <= 0:
                raise RejectedError("a positive amount is required")
            amount = floor_to(request.amount, market.amount_step)
            notional = amount * price
        _check_minimum(request.symbol, notional, market)
        if amount <= 0:
            raise RejectedError(f"amount is below the step {market.amount_step}")
        return Taken(amount, price, resting=False)
    if request.price is None or request.price <= 0:
        raise RejectedError("a limit order needs a positive price")
    if request.amount is None or request.amount <= 0:
        raise RejectedError("a limit order needs a positive amount")
    tick = market.rules(request.symbol).price_tick(request.price)
    if request.price % tick != 0:
        raise RejectedError(
            f"price {request.price.normalize():f} is not a multiple of the tick"
            f" {tick.normalize():f} at that price")
    amount = floor_to(request.amount, market.amount_step)
    if amount <= 0:
        raise RejectedError(f"amount is below the step {market.amount_step}")
    _check_minimum(request.symbol, amount * request.price, market)
    if side == Side.BUY and request.price >= market.ask:
        return Taken(amount, market.ask, resting=False)
    if side == Side.SELL and request.price <= market.bid:
        return Taken(amount, market.bid, resting=False)
    return Taken(amount, request.price, resting=True)


def _check_minimum(symbol: str, notional: Decimal, market: MarketSpec) -> None:
    if notional < market.min_notional:
        quote = symbol.split("/")[1]
        raise RejectedError(
            f"{symbol} order of {notional.normalize():f} {quote} is below the"
            f" minimum {market.min_notional.normalize():f} {quote}")
