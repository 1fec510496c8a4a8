"""Binance spot, USDⓈ-M futures wallet and sub-accounts behind the exchange port, over ccxt."""

# Over 400 lines on purpose: one class holds every Binance quirk the port must hide (orders,
# withdrawals, deposits, wallet and sub-account transfers), and the status tables beside it.

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import ccxt
import ccxt.async_support as ccxt_async

from rebalancer.accounts import Account, Accounts
from rebalancer.errors import DuplicateClientIdError, RejectedError, UnknownOutcomeError
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
    Wallet,
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
    to_millis,
)
from rebalancer.exchanges.live import Credentials

OS, T = OrderStatus, TransferStatus

# Spot order statuses (GET /api/v3/order `status`).
ORDER_STATUSES: Final[dict[str, OrderStatus]] = {
    "NEW": OS.OPEN,
    "PARTIALLY_FILLED": OS.OPEN,
    "PENDING_CANCEL": OS.OPEN,  # a cancel was asked for and is not final: it may still fill
    "FILLED": OS.CLOSED,
    "CANCELED": OS.CANCELED,
    "REJECTED": OS.REJECTED,
    "EXPIRED": OS.CANCELED,  # ended by the exchange (IOC/FOK, market out of liquidity)
    "EXPIRED_IN_MATCH": OS.CANCELED,  # ended by self-trade prevention
}
# The expired ones that ended with fills are a market order done: see `_order`.
_EXPIRED: Final = frozenset({"EXPIRED", "EXPIRED_IN_MATCH"})

# Withdrawal history `status` (GET /sapi/v1/capital/withdraw/history).
WITHDRAWAL_STATUSES: Final[dict[str, TransferStatus]] = {
    "0": T.PENDING,  # e-mail sent: awaiting the e-mail confirmation
    "1": T.CANCELED,  # canceled by the user (1 is success for deposits: not the same table)
    "2": T.PENDING,  # awaiting approval
    "3": T.FAILED,  # rejected
    "4": T.PENDING,  # processing
    "5": T.FAILED,  # failure
    "6": T.OK,  # completed
}

# Deposit history `status` (GET /sapi/v1/capital/deposit/hisrec).
DEPOSIT_STATUSES: Final[dict[str, TransferStatus]] = {
    "0": T.PENDING,
    "1": T.OK,
    "6": T.OK,  # credited, not yet withdrawable: the balance holds it
    "2": T.FAILED,  # rejected
    "7": T.FAILED,  # wrong deposit (e.g. memo missing): not credited, support must recover it
    "8": T.PENDING,  # waiting for the user's confirmation (travel rule): credited once confirmed
}

# Spot <-> futures transfer history `status` (GET /sapi/v1/asset/transfer).
TRANSFER_STATUSES: Final[dict[str, TransferStatus]] = {
    "CONFIRMED": T.OK,
    "PENDING": T.PENDING,
    "FAILED": T.FAILED,
}

# Sub-account universal transfer history `status`: Binance documents only SUCCESS; any other
# word waits as unknown rather than being guessed.
MASTER_TRANSFER_STATUSES: Final[dict[str, TransferStatus]] = {
    "SUCCESS": T.OK,
}

# ccxt account names for the unified transfer: "swap" is USDⓈ-M (UMFUTURE). Never "future":
# ccxt takes that for an isolated-margin symbol.
_CCXT_WALLETS: Final = {Wallet.SPOT: "spot", Wallet.FUTURES: "swap"}
_TRANSFER_TYPES: Final = {(Wallet.SPOT, Wallet.FUTURES): "MAIN_UMFUTURE",
                          (Wallet.FUTURES, Wallet.SPOT): "UMFUTURE_MAIN"}
_SUB_ACCOUNT_TYPES: Final = {Wallet.SPOT: "SPOT", Wallet.FUTURES: "USDT_FUTURE"}
_SUB_WALLETS: Final = {v: k for k, v in _SUB_ACCOUNT_TYPES.items()}

_WITHDRAW_LOOKUP_WINDOW_MS: Final = 7 * 24 * 3600 * 1000 - 1  # withdrawOrderId lookups: 7 days
_TRANSFER_LOOKBACK_MS: Final = 5 * 60 * 1000  # clock skew allowed when reading our own transfer


class BinanceExchange(CcxtExchange):
    """One Binance account (spot and USDⓈ-M futures wallets; a master also moves its subs')."""

    exchange = "binance"
    client_class = ccxt_async.binance
    has_testnet = True  # the spot testnet: no withdrawals, deposits or transfers there

    def __init__(self, account: Account, accounts: Accounts, credentials: Credentials | None,
                 *, read_only: bool = False, testnet: bool = False,
                 options: Mapping[str, Any] | None = None) -> None:
        config = dict(options or {})
        # Spot markets only: load_markets must not call the futures and coin-M endpoints, nor
        # the margin pairs (the futures wallet balance needs no market).
        config["options"] = {"fetchMarkets": {"types": ["spot"]}, "fetchMargins": False,
                             "defaultType": "spot", **dict(config.get("options") or {})}
        super().__init__(account, accounts, credentials, read_only=read_only, testnet=testnet,
                         options=config)

    # -- market data -----------------------------------------------------------------------

    async def market(self, symbol: str) -> MarketRules:
        market = await self.market_of(symbol)
        precision, limits = market.get("precision") or {}, market.get("limits") or {}
        # precision (TICK_SIZE mode) carries PRICE_FILTER tickSize and LOT_SIZE stepSize;
        # limits.cost.min the NOTIONAL / MIN_NOTIONAL filter.
        tick = dec(precision.get("price"))
        return MarketRules(
            symbol=symbol, base=market["base"], quote=market["quote"],
            min_notional=dec((limits.get("cost") or {}).get("min")),
            amount_step=dec(precision.get("amount")),
            taker_fee=dec(market.get("taker")),
            market_buy_by_quote_only=False,
            price_ticks=((Decimal(0), tick),),
        )

    def wallet_params(self, wallet: Wallet) -> dict[str, Any]:
        # "swap" = USDⓈ-M: GET /fapi/v3/account.
        return {} if wallet == Wallet.SPOT else {"type": "swap"}

    # -- orders ----------------------------------------------------------------------------

    async def create_order(self, request: OrderRequest) -> Order:
        rules = await self.market(request.symbol)
        amount, params = self._order_params(request, rules)
        # Binance refuses a newClientOrderId only among OPEN orders: a filled order's id is
        # accepted again and executed twice. So a used id is looked up before sending.
        if await self.fetch_order(request.client_id, request.symbol) is not None:
            raise DuplicateClientIdError(
                f"binance {self.account} order {request.client_id} was sent before: not resent")
        # No price on a market order: ccxt would turn amount * price into quoteOrderQty.
        price = str(request.price) if request.type == OrderType.LIMIT else None
        response = await self.send(f"order {request.client_id}", lambda: self.client.create_order(
            request.symbol, request.type.value, request.side.value, amount, price, params))
        info = response["info"]
        fee, fee_currency = _fee_of(info.get("fills") or [], rules.quote)
        return self._order(info, request.symbol, fee, fee_currency)

    def _order_params(self, request: OrderRequest,
                      rules: MarketRules) -> tuple[str | None, dict[str, Any]]:
        """ccxt's amount and params for `request`, refused where ccxt would silently round."""
        params: dict[str, Any] = {"newClientOrderId": request.client_id}
        if (request.amount is None) == (request.quote_amount is None):
            raise RejectedError(f"order {request.client_id}: give an amount or a quote amount")
        if request.quote_amount is not None:
            if request.type != OrderType.MARKET or request.side != Side.BUY:
                raise RejectedError(f"order {request.client_id}: a quote amount is for market "
                                    "buys only")
            tick = rules.price_tick(Decimal(0))
            if request.quote_amount <= 0 or request.quote_amount % tick != 0:
                raise RejectedError(f"order {request.client_id}: quote amount "
                                    f"{request.quote_amount} is not a positive multiple of {tick}")
            # Spend exactly this much: quoteOrderQty, deliberately.
            params["quoteOrderQty"] = str(request.quote_amount)
            return None, params
        assert request.amount is not None
        if request.amount <= 0 or request.amount % rules.amount_step != 0:
            raise RejectedError(f"order {request.client_id}: amount {request.amount} is not a "
                                f"positive multiple of the lot step {rules.amount_step}")
        if request.type == OrderType.LIMIT:
            if request.price is None or request.price <= 0:
                raise RejectedError(f"order {request.client_id}: a limit order needs a price")
            tick = rules.price_tick(request.price)
            if request.price % tick != 0:
                # ccxt would round it to the tick: a price the caller did not ask for.
                raise RejectedError(f"order {request.client_id}: price {request.price} is off "
                                    f"the tick {tick}")
        elif request.price is not None:
            raise RejectedError(f"order {request.client_id}: a market order takes no price")
        return str(request.amount), params

    async def fetch_order(self, client_id: str, symbol: str) -> Order | None:
        rules = await self.market(symbol)

        async def lookup() -> dict[str, Any] | None:
            try:
                found = await self.client.fetch_order(
                    None, symbol, {"origClientOrderId": client_id})
            except ccxt.OrderNotFound:  # -2013 "Order does not exist."
                return None
            return dict(found["info"])

        info = await self.read(f"order {client_id}", lookup)
        if info is None:
            return None
        fee, fee_currency = Decimal(0), rules.quote
        if dec(info.get("executedQty")) > 0:
            # The order itself carries no commission: its trades do (in BNB if so charged).
            trades = await self.read(f"trades of order {client_id}", lambda: (
                self.client.fetch_my_trades(symbol, None, None, {"orderId": info["orderId"]})))
            fee, fee_currency = _fee_of([t["info"] for t in trades], rules.quote)
        return self._order(info, symbol, fee, fee_currency)

    async def cancel_order(self, client_id: str, symbol: str) -> None:
        # DELETE /api/v3/order by origClientOrderId. Its answer carries no commission: the
        # caller reads the order back (fetch_order) for what filled. An order that already
        # ended is -2011 "Unknown order sent." (OrderNotFound): a refusal.
        await self.market_of(symbol)
        await self.send(f"cancel order {client_id}", lambda: self.client.cancel_order(
            None, symbol, {"origClientOrderId": client_id}))

    def _order(self, info: Mapping[str, Any], symbol: str, fee: Decimal,
               fee_currency: str) -> Order:
        raw_status = str(info.get("status"))
        filled, cost = dec(info.get("executedQty")), dec(info.get("cummulativeQuoteQty"))
        status = lookup_status(ORDER_STATUSES, raw_status, OS.UNKNOWN)
        order_type = OrderType.MARKET if info.get("type") == "MARKET" else OrderType.LIMIT
        if raw_status in _EXPIRED and order_type == OrderType.MARKET and filled > 0:
            status = OS.CLOSED  # a market order that ran out of book ended with what it got
        by_quote = dec(info.get("origQuoteOrderQty")) > 0
        return Order(
            client_id=str(info.get("clientOrderId")), exchange_id=str(info.get("orderId")),
            symbol=symbol, side=Side(str(info.get("side")).lower()), type=order_type,
            status=status, amount=None if by_quote else dec(info.get("origQty")),
            filled=filled, cost=cost, fee=fee, fee_currency=fee_currency,
            average_price=cost / filled if filled else None,
            raw_status=raw_status, raw=dict(info),
        )

    # -- withdrawals and deposits ----------------------------------------------------------

    async def withdrawal_rules(self, currency: str, network: str) -> WithdrawalRules:
        # GET /sapi/v1/capital/config/getall (signed): fees and minimums change, read each time.
        currencies = await self.read("currencies", lambda: self.client.fetch_currencies())
        entry = ((currencies.get(currency) or {}).get("info") or {})
        for item in entry.get("networkList") or []:
            if item.get("network") == network:
                # 0 happens only for fiat and leveraged tokens; the smallest unit then.
                multiple = dec(item.get("withdrawIntegerMultiple")) or Decimal("0.00000001")
                return WithdrawalRules(currency, network, fee=dec(item.get("withdrawFee")),
                                       minimum=dec(item.get("withdrawMin")), multiple=multiple,
                                       fee_included=True)  # amount is gross: fee comes out
        raise RejectedError(f"binance has no {currency} withdrawals on network {network}")

    async def withdraw(self, request: WithdrawRequest) -> Withdrawal:
        rules = await self.withdrawal_rules(request.currency, request.network)
        if request.amount <= 0 or request.amount % rules.multiple != 0:
            # ccxt would round it to the multiple: an amount the caller did not ask for.
            raise RejectedError(f"withdrawal {request.client_id}: amount {request.amount} is not "
                                f"a positive multiple of {rules.multiple}")
        params: dict[str, Any] = {"network": request.network,
                                  "withdrawOrderId": request.client_id}
        if request.tag:
            params["tag"] = request.tag  # sent as addressTag
        response = await self.send(f"withdrawal {request.client_id}", lambda: self.client.withdraw(
            request.currency, str(request.amount), request.address, params))
        info = response.get("info") or {}
        # The answer is only the id: the status, txid and internal flag come from the history.
        return Withdrawal(
            client_id=request.client_id, exchange_id=str(info.get("id")),
            currency=request.currency, amount=request.amount, fee=rules.fee,
            received=request.amount - rules.fee, address=request.address,
            network=request.network, status=T.PENDING, txid=None, internal=False,
            created_at=datetime.now(UTC), raw_status="", raw=dict(info),
        )

    async def fetch_withdrawal(self, client_id: str, match: HistoryMatch) -> Withdrawal | None:
        since = to_millis(match.since)
        # By withdrawOrderId the window is at most 7 days; ccxt would ask for 90 (and `until`
        # is ignored with `since`). And ccxt drops rows older than `since` by `applyTime`,
        # which has whole seconds only: a withdrawal made in the same second would vanish. So
        # the window goes in the params and ccxt gets no `since`.
        params = {"withdrawOrderId": client_id, "startTime": since,
                  "endTime": since + _WITHDRAW_LOOKUP_WINDOW_MS}
        rows = await self.read(f"withdrawal {client_id}", lambda: self.client.fetch_withdrawals(
            match.currency, None, None, params))
        found = [self._withdrawal(r["info"]) for r in rows
                 if (r.get("info") or {}).get("withdrawOrderId") == client_id]
        if match.exchange_id is not None:
            found = [w for w in found if w.exchange_id == match.exchange_id]
        if len(found) > 1:
            raise UnknownOutcomeError(f"binance {self.account}: {len(found)} withdrawals carry "
                                      f"the id {client_id}")
        return found[0] if found else None

    def _withdrawal(self, info: Mapping[str, Any]) -> Withdrawal:
        amount, fee = dec(info.get("amount")), dec(info.get("transactionFee"))
        raw_status = str(info.get("status"))
        return Withdrawal(
            client_id=info.get("withdrawOrderId") or None, exchange_id=str(info.get("id")),
            currency=str(info.get("coin")), amount=amount, fee=fee, received=amount - fee,
            address=str(info.get("address")), network=str(info.get("network")),
            status=lookup_status(WITHDRAWAL_STATUSES, raw_status, T.UNKNOWN),
            # Binance -> Binance: transferType 1 and txId "Internal transfer N".
            txid=normalise_txid(info.get("txId")), internal=str(info.get("transferType")) == "1",
            created_at=from_millis(info.get("applyTime")), raw_status=raw_status, raw=dict(info),
        )

    async def fetch_deposits(self, currency: str, since: datetime) -> list[Deposit]:
        rows = await self.read(f"{currency} deposits", lambda: self.client.fetch_deposits(
            currency, to_millis(since)))
        deposits = []
        for row in rows:
            info = row["info"]
            raw_status = str(info.get("status"))
            deposits.append(Deposit(
                exchange_id=str(info.get("id")), currency=str(info.get("coin")),
                amount=dec(info.get("amount")), address=info.get("address") or None,
                network=info.get("network") or None,
                status=lookup_status(DEPOSIT_STATUSES, raw_status, T.UNKNOWN),
                txid=normalise_txid(info.get("txId")),
                internal=str(info.get("transferType")) == "1",
                created_at=from_millis(info.get("insertTime")), raw_status=raw_status,
                raw=dict(info)))
        return deposits

    # -- spot <-> USDⓈ-M futures -----------------------------------------------------------

    async def transfer(self, request: TransferRequest) -> Transfer:
        kind = _TRANSFER_TYPES.get((request.from_wallet, request.to_wallet))
        if kind is None or request.amount <= 0:
            raise RejectedError(f"transfer {request.client_id}: needs two different wallets and "
                                "a positive amount")
        await self.markets()  # ccxt needs the currencies before sending
        started = int(time.time() * 1000) - _TRANSFER_LOOKBACK_MS
        # POST /sapi/v1/asset/transfer type MAIN_UMFUTURE / UMFUTURE_MAIN.
        response = await self.send(f"transfer {request.client_id}", lambda: self.client.transfer(
            request.currency, str(request.amount), _CCXT_WALLETS[request.from_wallet],
            _CCXT_WALLETS[request.to_wallet]))
        tran_id = str((response.get("info") or {}).get("tranId"))
        # No client id at Binance: the history row with the tranId just given is ours.
        match = HistoryMatch(request.currency, request.amount, from_millis(started),
                             exchange_id=tran_id)
        try:
            found = await self.fetch_transfer(request.client_id, match)
        except Exception:  # the transfer is done; its status can be read again later
            found = None
        if found is not None:
            return found
        return Transfer(request.client_id, tran_id, request.currency, request.amount,
                        request.from_wallet, request.to_wallet, self.account, self.account,
                        T.PENDING, datetime.now(UTC), raw=dict(response.get("info") or {}))

    async def fetch_transfer(self, client_id: str, match: HistoryMatch) -> Transfer | None:
        # The match gives no direction: both histories are read (MAIN_UMFUTURE, UMFUTURE_MAIN).
        candidates: list[Transfer] = []
        for (source, target), kind in _TRANSFER_TYPES.items():
            rows = await self.read(f"transfers {kind}", lambda kind=kind: (  # type: ignore[misc]
                self.client.fetch_transfers(match.currency, to_millis(match.since), None,
                                            {"type": kind})))
            for row in rows:
                info = row["info"]
                transfer = Transfer(
                    client_id, str(info.get("tranId")), str(info.get("asset")),
                    dec(info.get("amount")), source, target, self.account, self.account,
                    lookup_status(TRANSFER_STATUSES, info.get("status"), T.UNKNOWN),
                    from_millis(info.get("timestamp")), raw=dict(info))
                if match.exchange_id is not None:
                    if transfer.exchange_id == match.exchange_id:
                        return transfer
                elif (transfer.amount == match.amount and transfer.currency == match.currency
                      and transfer.created_at >= match.since
                      and transfer.exchange_id not in match.exclude_ids):
                    candidates.append(transfer)
        if len(candidates) > 1:
            raise UnknownOutcomeError(f"binance {self.account}: {len(candidates)} transfers of "
                                      f"{match.amount} {match.currency} could be {client_id}")
        return candidates[0] if candidates else None

    # -- master <-> sub --------------------------------------------------------------------

    async def master_transfer(self, request: MasterTransferRequest) -> Transfer:
        params = self._universal_params(request)
        response = await self.send(f"master transfer {request.client_id}", lambda: (
            self.client.sapi_post_sub_account_universaltransfer(params)))
        try:
            found = await self.fetch_master_transfer(
                request.client_id, HistoryMatch(request.currency, request.amount,
                                                datetime.now(UTC)))
        except Exception:  # it was executed: its status can be read again later
            found = None
        if found is not None:
            return found
        return Transfer(request.client_id, str(response.get("tranId")), request.currency,
                        request.amount, request.from_wallet, request.to_wallet,
                        request.from_account, request.to_account, T.PENDING, datetime.now(UTC),
                        raw=dict(response))

    def _universal_params(self, request: MasterTransferRequest) -> dict[str, Any]:
        """POST /sapi/v1/sub-account/universalTransfer params; refused before any request
        unless this account is the master of both sides."""
        if self.profile.kind != "master":
            raise RejectedError(f"{self.account} is not a master account: master transfer "
                                f"{request.client_id} not sent")
        if request.from_account == request.to_account or request.amount <= 0:
            raise RejectedError(f"master transfer {request.client_id}: needs two accounts and "
                                "a positive amount")
        params: dict[str, Any] = {
            "fromAccountType": _SUB_ACCOUNT_TYPES[request.from_wallet],
            "toAccountType": _SUB_ACCOUNT_TYPES[request.to_wallet],
            "asset": request.currency, "amount": str(request.amount),
            "clientTranId": request.client_id,
        }
        for side, account_id in (("fromEmail", request.from_account),
                                 ("toEmail", request.to_account)):
            if account_id == self.account:
                continue  # the master's own side is named by leaving the e-mail out
            if account_id not in self.accounts:
                raise RejectedError(f"master transfer {request.client_id}: unknown account "
                                    f"{account_id}")
            other = self.accounts.get(account_id)
            if other.master_account != self.account or not other.email:
                raise RejectedError(f"master transfer {request.client_id}: {account_id} is not "
                                    f"a sub of {self.account} with an e-mail")
            params[side] = other.email
        return params

    async def fetch_master_transfer(self, client_id: str,
                                    match: HistoryMatch) -> Transfer | None:
        if self.profile.kind != "master":
            raise RejectedError(f"{self.account} is not a master account")
        rows: list[dict[str, Any]] = []
        # The history defaults to transfers FROM the master; transfers into it need toEmail.
        queries: list[dict[str, Any]] = [{"clientTranId": client_id}]
        if self.profile.email:
            queries.append({"clientTranId": client_id, "toEmail": self.profile.email})
        for query in queries:
            response = await self.read(f"master transfer {client_id}", lambda q=query: (  # type: ignore[misc]
                self.client.sapi_get_sub_account_universaltransfer(q)))
            rows = [r for r in response.get("result") or [] if r.get("clientTranId") == client_id]
            if rows:
                break
        if not rows:
            return None
        if len(rows) > 1:
            raise UnknownOutcomeError(f"binance {self.account}: {len(rows)} transfers carry "
                                      f"the id {client_id}")
        info = rows[0]
        return Transfer(
            client_id, str(info.get("tranId")), str(info.get("asset")), dec(info.get("amount")),
            self._sub_wallet(info.get("fromAccountType")),
            self._sub_wallet(info.get("toAccountType")),
            self._account_of(info.get("fromEmail")), self._account_of(info.get("toEmail")),
            lookup_status(MASTER_TRANSFER_STATUSES, info.get("status"), T.UNKNOWN),
            from_millis(info.get("createTimeStamp")), raw=dict(info))

    def _sub_wallet(self, account_type: object) -> Wallet:
        wallet = _SUB_WALLETS.get(str(account_type))
        if wallet is None:
            raise RejectedError(f"binance account type {account_type} is none of our wallets")
        return wallet

    def _account_of(self, email: object) -> str:
        """Our account id for a Binance e-mail (an empty one is the master's own side)."""
        if not email or email == self.profile.email:
            return self.account
        for account in self.accounts.accounts.values():
            if account.exchange == "binance" and account.email == email:
                return account.id
        return str(email)


def _fee_of(fills: list[Mapping[str, Any]], default_currency: str) -> tuple[Decimal, str]:
    """The commission of an order's fills, in the asset Binance charged it in (BNB when the
    account pays fees with BNB). Fills charged in another asset than the first one's are not
    added to it: a mixed case Binance does not produce for one order."""
    if not fills:
        return Decimal(0), default_currency
    currency = str(fills[0].get("commissionAsset"))
    return sum((dec(f.get("commission")) for f in fills
                if f.get("commissionAsset") == currency), Decimal(0)), currency


__all__ = [
    "DEPOSIT_STATUSES",
    "MASTER_TRANSFER_STATUSES",
    "ORDER_STATUSES",
    "TRANSFER_STATUSES",
    "WITHDRAWAL_STATUSES",
    "BinanceExchange",
]
