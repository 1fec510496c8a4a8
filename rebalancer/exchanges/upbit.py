"""The Upbit connector: KRW spot markets, withdrawals without client ids, over ccxt."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

import ccxt
import ccxt.async_support as ccxt_async

from rebalancer.errors import (
    AmbiguousOutcomeError,
    RejectedError,
    RetryableError,
)
from rebalancer.exchanges.base import (
    Deposit,
    HistoryMatch,
    MarketRules,
    MasterTransferRequest,
    Order,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
    Transfer,
    TransferRequest,
    TransferStatus,
    Withdrawal,
    WithdrawalRules,
    WithdrawRequest,
)
from rebalancer.exchanges.ccxt_base import (
    CcxtExchange,
    dec,
    from_millis,
    lookup_status,
    normalise_txid,
    opt_dec,
)

# Upbit's order states. `cancel` is not decided by this table alone: a market buy (ord_type
# `price`) that spent its KRW ends `cancel` with the leftover refunded (see `order_status`).
ORDER_STATUS: dict[str, OrderStatus] = {
    "wait": OrderStatus.OPEN,  # resting in the book
    "watch": OrderStatus.OPEN,  # a reserved (stop) order waiting for its trigger
    "done": OrderStatus.CLOSED,
    "cancel": OrderStatus.CANCELED,
}

# Withdrawal states, looked up lower-cased (Upbit's newer API answers in upper case, its older
# one and ccxt's comments in lower case). Only `done` means the coin left on chain.
WITHDRAWAL_STATUS: dict[str, TransferStatus] = {
    "waiting": TransferStatus.PENDING,  # queued, not yet processed
    "submitting": TransferStatus.PENDING,  # legacy: being submitted
    "submitted": TransferStatus.PENDING,  # legacy: submitted, not yet approved
    "almost_accepted": TransferStatus.PENDING,  # legacy: waiting for the withdrawal queue
    # legacy "approved": Upbit's compliance let it through, it has not left yet (ccxt says
    # ok, but there is no txid and it may still fail)
    "accepted": TransferStatus.PENDING,
    "processing": TransferStatus.PENDING,  # being sent on chain
    "done": TransferStatus.OK,
    "failed": TransferStatus.FAILED,
    "rejected": TransferStatus.FAILED,  # refused by Upbit (compliance, travel rule)
    "canceled": TransferStatus.CANCELED,
    "cancelled": TransferStatus.CANCELED,  # the newer API's spelling
}

# Deposit states (looked up lower-cased).
DEPOSIT_STATUS: dict[str, TransferStatus] = {
    "processing": TransferStatus.PENDING,  # seen on chain, waiting for confirmations
    # held until the sender's exchange answers Upbit's travel-rule check: it may still be
    # credited, so it is waited on (past the deadline an operator looks at it)
    "travel_rule_suspected": TransferStatus.PENDING,
    "accepted": TransferStatus.OK,  # credited to the balance
    "rejected": TransferStatus.FAILED,
    "refunding": TransferStatus.FAILED,  # on its way back to the sender: never credited
    "refunded": TransferStatus.FAILED,
    "canceled": TransferStatus.CANCELED,
    "cancelled": TransferStatus.CANCELED,
}

# Upbit has no wallets besides spot and no sub accounts: nothing to map. Kept so that every
# connector has one table per kind.
TRANSFER_STATUS: dict[str, TransferStatus] = {}

# KRW price units since 2025-07-31 (lowest price, tick), highest first. The rows below 100 KRW
# are the pre-2025 units and unverified offline: Upbit's /v1/orderbook/instruments says the
# tick of a market at its current price.
KRW_TICKS: tuple[tuple[Decimal, Decimal], ...] = tuple(
    (Decimal(floor), Decimal(tick)) for floor, tick in (
        ("1000000", "1000"), ("500000", "500"), ("100000", "100"), ("50000", "50"),
        ("10000", "10"), ("5000", "5"), ("100", "1"), ("10", "0.1"), ("1", "0.01"),
        ("0.1", "0.001"), ("0.01", "0.0001"), ("0.001", "0.00001"), ("0", "0.000001"),
    ))

# ccxt's precision for every Upbit market (amounts and, outside KRW, prices).
_AMOUNT_STEP = Decimal("0.00000001")


class UpbitExchange(CcxtExchange):
    """One Upbit account (its own key pair)."""

    exchange: ClassVar[str] = "upbit"
    client_class: ClassVar[type[ccxt_async.Exchange]] = ccxt_async.upbit

    # -- market data ---------------------------------------------------------------------------

    async def market(self, symbol: str) -> MarketRules:
        market = await self.market_of(symbol)
        # The minimum and the fees of this account, read now: Upbit changes them.
        chance = await self.read(f"order rules {symbol}", lambda: (
            self.client.private_get_orders_chance({"market": market["id"]})))
        info = chance.get("market") or {}
        minimum = dec((info.get("bid") or {}).get("min_total"))
        taker = max(dec(chance.get("bid_fee")), dec(chance.get("ask_fee")))
        step = opt_dec((market.get("precision") or {}).get("amount")) or _AMOUNT_STEP
        if market["quote"] == "KRW":
            ticks = KRW_TICKS
        else:
            tick = opt_dec((market.get("precision") or {}).get("price")) or _AMOUNT_STEP
            ticks = ((Decimal(0), tick),)
        return MarketRules(symbol=symbol, base=market["base"], quote=market["quote"],
                           min_notional=minimum, amount_step=step, taker_fee=taker,
                           market_buy_by_quote_only=True, price_ticks=ticks,
                           buy_fee_on_top=True)

    # -- orders --------------------------------------------------------------------------------

    async def create_order(self, request: OrderRequest) -> Order:
        self._check_shape(request)
        rules = await self.market(request.symbol)
        notional = self._notional(request, rules)
        if notional is not None and notional < rules.min_notional:
            raise RejectedError(f"upbit {request.symbol}: {notional} {rules.quote} is below the "
                                f"minimum order of {rules.min_notional} {rules.quote}")
        params: dict[str, Any] = {"clientOrderId": request.client_id}
        amount: str | None = None
        price: str | None = None
        if request.type == OrderType.MARKET and request.side == Side.BUY:
            # ord_type=price: spend this much KRW; ccxt sends `cost` as the order's price.
            params["cost"] = str(request.quote_amount)
        else:
            amount = str(request.amount)
            price = str(request.price) if request.price is not None else None
        sent = await self.send(f"order {request.client_id}", lambda: self.client.create_order(
            request.symbol, str(request.type), str(request.side), amount, price, params))
        # The answer to POST /v1/orders is the order as accepted (a market order still `wait`):
        # its settled state comes from reading it back. If that read fails, the order landed
        # all the same: the caller gets what the POST said and reconciles by client id later.
        try:
            settled = await self.read(f"order {request.client_id}", lambda: (
                self.client.private_get_order({"uuid": sent["id"]})))
            return self._order(self.client.parse_order(settled), request.client_id)
        except (RetryableError, RejectedError):
            return self._order(sent, request.client_id)

    def _check_shape(self, request: OrderRequest) -> None:
        """Refusals decided before any request: what Upbit cannot take in this form."""
        if request.type == OrderType.MARKET and request.side == Side.BUY:
            if request.quote_amount is None or request.amount is not None:
                raise RejectedError("upbit buys at market by KRW amount only (ord_type=price): "
                                    "give quote_amount, not a base amount")
            if request.quote_amount <= 0:
                raise RejectedError("upbit market buy needs a positive quote_amount")
            return
        if request.quote_amount is not None:
            raise RejectedError("upbit takes a quote amount on market buys only")
        if request.amount is None or request.amount <= 0:
            raise RejectedError(f"upbit {request.type} {request.side} needs a positive amount")
        if request.type == OrderType.LIMIT and (request.price is None or request.price <= 0):
            raise RejectedError("upbit limit order needs a positive price")
        if request.type == OrderType.MARKET and request.price is not None:
            raise RejectedError("upbit market sell takes no price")

    @staticmethod
    def _notional(request: OrderRequest, rules: MarketRules) -> Decimal | None:
        if request.quote_amount is not None:
            return request.quote_amount
        if request.type == OrderType.LIMIT and request.price is not None and request.amount:
            tick = rules.price_tick(request.price)
            if request.price % tick != 0:
                # ccxt would round it to 1e-8 and Upbit refuse it; say why before sending.
                raise RejectedError(f"upbit {request.symbol}: price {request.price} is not a "
                                    f"multiple of the tick {tick} at that price")
            return request.price * request.amount
        return None  # a market sell: Upbit checks its worth at the book

    async def fetch_order(self, client_id: str, symbol: str) -> Order | None:
        await self.markets()

        async def by_identifier() -> dict[str, Any] | None:
            # ccxt's fetch_order sends uuid=None; the raw endpoint takes the identifier.
            try:
                raw: dict[str, Any] = await self.client.private_get_order(
                    {"identifier": client_id})
            except ccxt.OrderNotFound:
                return None
            return raw

        raw = await self.read(f"order {client_id}", by_identifier)
        return None if raw is None else self._order(self.client.parse_order(raw), client_id)

    async def cancel_order(self, client_id: str, symbol: str) -> None:
        # DELETE /v1/order by our identifier (ccxt's cancel_order sends only a uuid). The answer
        # is the order before the cancel took effect (`wait`): the caller reads it back.
        await self.markets()
        await self.send(f"cancel order {client_id}", lambda: (
            self.client.private_delete_order({"identifier": client_id})))

    def _order(self, parsed: Mapping[str, Any], client_id: str) -> Order:
        info: dict[str, Any] = dict(parsed.get("info") or {})
        filled = dec(info.get("executed_volume"))
        cost = self._cost(info, parsed)
        raw_status = str(info.get("state") or "")
        side = Side.BUY if info.get("side") == "bid" else Side.SELL
        kind = OrderType.LIMIT if info.get("ord_type") == "limit" else OrderType.MARKET
        fee = parsed.get("fee") or {}
        return Order(
            client_id=str(info.get("identifier") or client_id),
            exchange_id=str(info.get("uuid") or parsed.get("id")),
            symbol=str(parsed.get("symbol")),
            side=side,
            type=kind,
            status=order_status(info),
            amount=opt_dec(info.get("volume")),
            filled=filled,
            cost=cost,
            fee=dec(info.get("paid_fee") if "paid_fee" in info else fee.get("cost")),
            fee_currency=str(fee.get("currency") or str(parsed.get("symbol")).split("/")[-1]),
            average_price=cost / filled if filled > 0 else None,
            raw_status=raw_status,
            raw=info,
        )

    @staticmethod
    def _cost(info: Mapping[str, Any], parsed: Mapping[str, Any]) -> Decimal:
        """KRW spent or received: `executed_funds` where Upbit gives it, else the trades'
        funds; never the requested KRW of an ord_type=price order (ccxt's `cost` there)."""
        if info.get("executed_funds") not in (None, ""):
            return dec(info["executed_funds"])
        trades = info.get("trades") or []
        if trades:
            return sum((dec(t.get("funds")) for t in trades), Decimal(0))
        if dec(info.get("executed_volume")) == 0:
            return Decimal(0)
        average = opt_dec(parsed.get("average"))
        return average * dec(info.get("executed_volume")) if average else Decimal(0)

    # -- withdrawals and deposits --------------------------------------------------------------

    async def withdrawal_rules(self, currency: str, network: str) -> WithdrawalRules:
        chance = await self.read(f"withdrawal rules {currency} {network}", lambda: (
            self.client.private_get_withdraws_chance({"currency": currency,
                                                      "net_type": network})))
        info = chance.get("currency") or {}
        limit = chance.get("withdraw_limit") or {}
        if info.get("code") not in (None, currency):
            raise RejectedError(f"upbit answered for {info.get('code')}, not {currency}")
        fixed = limit.get("fixed")
        # `fixed`: how many decimal places a withdrawal amount may have.
        multiple = Decimal(1).scaleb(-int(fixed)) if fixed not in (None, "") else _AMOUNT_STEP
        return WithdrawalRules(currency=currency, network=network,
                               fee=dec(info.get("withdraw_fee")),
                               minimum=dec(limit.get("minimum")), multiple=multiple,
                               fee_included=False)  # Upbit charges the fee on top

    async def withdraw(self, request: WithdrawRequest) -> Withdrawal:
        if not request.network:
            raise RejectedError("upbit needs a network (net_type) for every withdrawal")
        params: dict[str, Any] = {"network": request.network}
        if request.tag is not None:
            params["tag"] = request.tag  # ccxt sends it as secondary_address
        # Upbit takes no client id: the caller stored its intent before this call, and
        # `fetch_withdrawal` finds it again in the history.
        sent = await self.send(f"withdraw {request.client_id}", lambda: self.client.withdraw(
            request.currency, str(request.amount), request.address, params))
        return self._withdrawal(dict(sent.get("info") or {}), request.client_id,
                                request.address, request.network)

    async def fetch_withdrawal(self, client_id: str, match: HistoryMatch) -> Withdrawal | None:
        await self.markets()
        history = await self.read(f"withdrawals {match.currency}", lambda: (
            self.client.private_get_withdraws({"currency": match.currency, "limit": 100})))
        candidates = [raw for raw in history if self._matches(raw, match)]
        if match.exchange_id is not None:
            candidates = [raw for raw in candidates if raw.get("uuid") == match.exchange_id]
        else:
            candidates = [raw for raw in candidates if raw.get("uuid") not in match.exclude_ids]
        if not candidates:
            return None
        if len(candidates) > 1:
            listed = ", ".join(f"{raw.get('uuid')} (txid {raw.get('txid')})" for raw in candidates)
            raise AmbiguousOutcomeError(
                f"upbit {self.account}: {len(candidates)} withdrawals of {match.amount} "
                f"{match.currency} since {match.since.isoformat()} match: {listed}",
                [{"id": str(raw.get("uuid")), "txid": raw.get("txid"),
                  "amount": str(raw.get("amount")), "at": str(raw.get("created_at"))}
                 for raw in candidates])
        return self._withdrawal(candidates[0], client_id, match.address, None)

    @staticmethod
    def _matches(raw: Mapping[str, Any], match: HistoryMatch) -> bool:
        if str(raw.get("currency")) != match.currency or dec(raw.get("amount")) != match.amount:
            return False
        # Upbit's history entries carry no address in its documented payload; where one is
        # given it must be ours.
        address = raw.get("address")
        if match.address is not None and address not in (None, "") and (
                str(address).lower() != match.address.lower()):
            return False
        return _created(raw) >= match.since.replace(microsecond=0)

    def _withdrawal(self, raw: Mapping[str, Any], client_id: str | None, address: str | None,
                    network: str | None) -> Withdrawal:
        raw_status = str(raw.get("state") or "")
        amount = dec(raw.get("amount"))
        return Withdrawal(
            client_id=client_id,
            exchange_id=str(raw.get("uuid")),
            currency=str(raw.get("currency")),
            amount=amount,
            fee=dec(raw.get("fee")),
            received=amount,  # the fee is charged on top
            address=str(raw.get("address") or address or ""),
            network=str(raw.get("net_type") or network or ""),
            status=lookup_status(WITHDRAWAL_STATUS, raw_status.lower(), TransferStatus.UNKNOWN),
            txid=normalise_txid(raw.get("txid")),
            internal=raw.get("transaction_type") == "internal",
            created_at=_created(raw),
            raw_status=raw_status,
            raw=dict(raw),
        )

    async def fetch_deposits(self, currency: str, since: datetime) -> list[Deposit]:
        await self.markets()
        history = await self.read(f"deposits {currency}", lambda: (
            self.client.private_get_deposits({"currency": currency, "limit": 100})))
        floor = since.replace(microsecond=0)
        deposits = [self._deposit(raw) for raw in history
                    if str(raw.get("currency")) == currency and _created(raw) >= floor]
        return sorted(deposits, key=lambda d: d.created_at)

    @staticmethod
    def _deposit(raw: Mapping[str, Any]) -> Deposit:
        raw_status = str(raw.get("state") or "")
        return Deposit(
            exchange_id=str(raw.get("uuid")),
            currency=str(raw.get("currency")),
            amount=dec(raw.get("amount")),
            address=raw.get("address"),
            network=raw.get("net_type"),
            status=lookup_status(DEPOSIT_STATUS, raw_status.lower(), TransferStatus.UNKNOWN),
            txid=normalise_txid(raw.get("txid")),
            internal=raw.get("transaction_type") == "internal",
            created_at=_created(raw),
            raw_status=raw_status,
            raw=dict(raw),
        )

    # -- transfers: Upbit has neither futures wallets nor sub accounts -------------------------

    async def transfer(self, request: TransferRequest) -> Transfer:
        raise RejectedError(f"upbit has no {request.to_wallet} wallet: transfer "
                            f"{request.client_id} not sent")

    async def fetch_transfer(self, client_id: str, match: HistoryMatch) -> Transfer | None:
        return None  # nothing can have been sent

    async def master_transfer(self, request: MasterTransferRequest) -> Transfer:
        raise RejectedError(f"upbit has no sub accounts: transfer {request.client_id} not sent")

    async def fetch_master_transfer(self, client_id: str,
                                    match: HistoryMatch) -> Transfer | None:
        return None


def order_status(info: Mapping[str, Any]) -> OrderStatus:
    """Our status of a raw Upbit order: a `cancel` that executed everything it could and has
    nothing left to execute is a fill (a market buy's refunded KRW leftover), not a cancel."""
    raw = str(info.get("state") or "")
    if raw == "cancel" and dec(info.get("executed_volume")) > 0 and dec(
            info.get("remaining_volume")) == 0:
        return OrderStatus.CLOSED
    return lookup_status(ORDER_STATUS, raw, OrderStatus.UNKNOWN)


def _created(raw: Mapping[str, Any]) -> datetime:
    # Whole seconds: a HistoryMatch compares against its `since` truncated to the second.
    return from_millis(raw.get("created_at") or raw.get("done_at"))


__all__ = ["DEPOSIT_STATUS", "KRW_TICKS", "ORDER_STATUS", "TRANSFER_STATUS",
           "WITHDRAWAL_STATUS", "UpbitExchange", "order_status"]
