"""A stateful fake of Binance's REST API (spot, USDⓈ-M wallet, capital, sub-accounts) behind
ccxt's HTTP layer: signatures verified, payloads and error bodies shaped as Binance documents."""

# Over 400 lines on purpose: one fake exchange, every endpoint the connector calls, kept
# together so that its state (balances, orders, withdrawals, transfers) stays in one place.

from __future__ import annotations

import hashlib
import hmac
import itertools
import time
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any

from rebalancer.accounts import Accounts
from rebalancer.exchanges.binance import BinanceExchange
from rebalancer.exchanges.live import Credentials
from tests.support.venues.chain import Chain
from tests.support.venues.http import Fault, Request, Response, Wire, install

TAKER = Decimal("0.001")
BNB_TAKER = Decimal("0.00075")  # 25% off when the account pays fees in BNB


def s(value: Decimal) -> str:
    """Binance's number strings: fixed point, 8 decimals."""
    return f"{value.quantize(Decimal('0.00000001'), rounding=ROUND_DOWN):f}"


def error(code: int, msg: str, status: int = 400) -> Response:
    return Response(status, {"code": code, "msg": msg}, "Bad Request")


@dataclass
class Market:
    base: str
    quote: str
    price: Decimal
    tick: Decimal = Decimal("0.01")
    step: Decimal = Decimal("0.0001")
    min_notional: Decimal = Decimal("5")

    @property
    def id(self) -> str:
        return self.base + self.quote


@dataclass
class Network:
    coin: str
    network: str
    fee: Decimal
    minimum: Decimal
    multiple: Decimal = Decimal("0.00000001")


@dataclass
class Holder:
    name: str
    api_key: str
    secret: str
    email: str
    master: str | None = None  # the master account's name, for a sub
    bnb_fees: bool = False
    spot: dict[str, list[Decimal]] = field(default_factory=dict)  # asset -> [free, locked]
    futures: dict[str, Decimal] = field(default_factory=dict)
    orders: list[dict[str, Any]] = field(default_factory=list)
    trades: list[dict[str, Any]] = field(default_factory=list)
    withdrawals: list[dict[str, Any]] = field(default_factory=list)
    deposits: list[dict[str, Any]] = field(default_factory=list)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    allowlist: set[tuple[str, str, str]] = field(default_factory=set)  # (coin, network, addr)

    def held(self, asset: str) -> list[Decimal]:
        return self.spot.setdefault(asset, [Decimal(0), Decimal(0)])


class FakeBinance:
    """Binance as the connector sees it; market orders fill at once at the market's price."""

    def __init__(self, chain: Chain | None = None) -> None:
        self.chain = chain or Chain()
        self.markets: dict[str, Market] = {}
        self.networks: dict[tuple[str, str], Network] = {}
        self.holders: dict[str, Holder] = {}
        self.universal: list[dict[str, Any]] = []  # sub-account universal transfers
        self.bnb_price = Decimal("600")  # in the quote, for BNB-paid fees
        self._ids = itertools.count(1000)

    # -- arranging -------------------------------------------------------------------------

    def add_market(self, market: Market) -> Market:
        self.markets[market.id] = market
        return market

    def add_network(self, network: Network) -> None:
        self.networks[(network.coin, network.network)] = network

    def add_account(self, name: str, *, email: str, master: str | None = None,
                    bnb_fees: bool = False) -> Credentials:
        holder = Holder(name, f"key-{name}", f"secret-{name}-{len(self.holders)}", email,
                        master, bnb_fees)
        self.holders[name] = holder
        return Credentials(holder.api_key, holder.secret)

    def fund(self, name: str, asset: str, amount: Decimal, *, futures: bool = False) -> None:
        holder = self.holders[name]
        if futures:
            holder.futures[asset] = holder.futures.get(asset, Decimal(0)) + amount
        else:
            holder.held(asset)[0] += amount

    def allow(self, name: str, coin: str, network: str, address: str) -> None:
        self.holders[name].allowlist.add((coin, network, address.lower()))

    def free(self, name: str, asset: str, *, futures: bool = False) -> Decimal:
        holder = self.holders[name]
        return holder.futures.get(asset, Decimal(0)) if futures else holder.held(asset)[0]

    def port(self, accounts: Accounts, name: str, *, read_only: bool = False,
             faults: list[Fault] | None = None,
             credentials: Credentials | None = None) -> tuple[BinanceExchange, Wire]:
        holder = self.holders[name]
        port = BinanceExchange(accounts.get(name), accounts,
                               credentials or Credentials(holder.api_key, holder.secret),
                               read_only=read_only, options={"enableRateLimit": False})
        return port, install(port.client, self, faults)

    def credit_deposit(self, account: str, currency: str, amount: Decimal, *, network: str,
                       address: str, tag: str | None, txid: str, internal: bool) -> None:
        holder = self.holders[account]
        holder.held(currency)[0] += amount
        holder.deposits.append({
            "id": str(next(self._ids)), "amount": s(amount), "coin": currency,
            "network": network, "status": 1, "address": address, "addressTag": tag or "",
            "txId": txid, "insertTime": self.now(), "transferType": 1 if internal else 0,
            "confirmTimes": "12/12", "unlockConfirm": 0, "walletType": 0,
        })

    @staticmethod
    def now() -> int:
        return int(time.time() * 1000)

    # -- the wire --------------------------------------------------------------------------

    def too_many_requests(self) -> Response:
        return Response(429, {"code": -1003, "msg": "Too many requests; current limit of IP is "
                              "6000 request weight per 1 MINUTE."}, "Too Many Requests")

    def handle(self, request: Request) -> Response:
        route = ROUTES.get((request.method, request.path))
        if route is None:
            return error(-1000, f"fake: no route {request.method} {request.path}", 404)
        handler, signed = route
        if not signed:
            return handler(self, None, request.params)
        holder = self.holders_by_key().get(request.headers.get("X-MBX-APIKEY", ""))
        if holder is None:
            return error(-2015, "Invalid API-key, IP, or permissions for action.", 401)
        payload = request.body if request.method == "POST" else request.url.partition("?")[2]
        signed_part, _, signature = (payload or "").rpartition("&signature=")
        expected = hmac.new(holder.secret.encode(), signed_part.encode(),
                            hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature, expected):
            return error(-1022, "Signature for this request is not valid.")
        params = {k: v for k, v in request.params.items() if k != "signature"}
        return handler(self, holder, params)

    def holders_by_key(self) -> dict[str, Holder]:
        return {h.api_key: h for h in self.holders.values()}

    # -- market data -----------------------------------------------------------------------

    def exchange_info(self, _: Holder | None, params: dict[str, Any]) -> Response:
        return Response(200, {
            "timezone": "UTC", "serverTime": self.now(), "rateLimits": [], "exchangeFilters": [],
            "symbols": [{
                "symbol": m.id, "status": "TRADING", "baseAsset": m.base,
                "baseAssetPrecision": 8, "quoteAsset": m.quote, "quotePrecision": 8,
                "quoteAssetPrecision": 8, "baseCommissionPrecision": 8,
                "quoteCommissionPrecision": 8,
                "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT",
                               "TAKE_PROFIT_LIMIT"],
                "icebergAllowed": True, "ocoAllowed": True, "otoAllowed": True,
                "quoteOrderQtyMarketAllowed": True, "allowTrailingStop": True,
                "cancelReplaceAllowed": True, "isSpotTradingAllowed": True,
                "isMarginTradingAllowed": False,
                "filters": [
                    {"filterType": "PRICE_FILTER", "minPrice": s(m.tick),
                     "maxPrice": "1000000.00000000", "tickSize": s(m.tick)},
                    {"filterType": "LOT_SIZE", "minQty": s(m.step), "maxQty": "9000.00000000",
                     "stepSize": s(m.step)},
                    {"filterType": "NOTIONAL", "minNotional": s(m.min_notional),
                     "applyMinToMarket": True, "maxNotional": "9000000.00000000",
                     "applyMaxToMarket": False, "avgPriceMins": 5},
                ],
                "permissions": [], "permissionSets": [["SPOT"]],
                "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
                "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER"],
            } for m in self.markets.values()],
        })

    def ticker(self, _: Holder | None, params: dict[str, Any]) -> Response:
        market = self.markets.get(str(params.get("symbol")))
        if market is None:
            return error(-1121, "Invalid symbol.")
        price = s(market.price)
        return Response(200, {
            "symbol": market.id, "priceChange": "0", "priceChangePercent": "0",
            "weightedAvgPrice": price, "prevClosePrice": price, "lastPrice": price,
            "lastQty": "1", "bidPrice": price, "bidQty": "1", "askPrice": price, "askQty": "1",
            "openPrice": price, "highPrice": price, "lowPrice": price, "volume": "1000",
            "quoteVolume": "1000", "openTime": self.now() - 86_400_000, "closeTime": self.now(),
            "firstId": 1, "lastId": 2, "count": 2,
        })

    def capital_config(self, _: Holder | None, params: dict[str, Any]) -> Response:
        coins: dict[str, list[Network]] = {}
        for network in self.networks.values():
            coins.setdefault(network.coin, []).append(network)
        return Response(200, [{
            "coin": coin, "depositAllEnable": True, "withdrawAllEnable": True, "name": coin,
            "free": "0", "locked": "0", "freeze": "0", "withdrawing": "0", "ipoing": "0",
            "ipoable": "0", "storage": "0", "isLegalMoney": False, "trading": True,
            "networkList": [{
                "network": n.network, "coin": coin, "withdrawIntegerMultiple": s(n.multiple),
                "isDefault": i == 0, "depositEnable": True, "withdrawEnable": True,
                "depositDesc": "", "withdrawDesc": "", "specialTips": "", "name": n.network,
                "resetAddressStatus": False, "addressRegex": "", "memoRegex": "",
                "withdrawFee": s(n.fee), "withdrawMin": s(n.minimum),
                "withdrawMax": "9999999999.99999999", "minConfirm": 12, "unLockConfirm": 0,
                "sameAddress": False, "estimatedArrivalTime": 5, "busy": False,
            } for i, n in enumerate(networks)],
        } for coin, networks in coins.items()])

    # -- balances --------------------------------------------------------------------------

    def account(self, holder: Holder, params: dict[str, Any]) -> Response:
        return Response(200, {
            "makerCommission": 10, "takerCommission": 10, "buyerCommission": 0,
            "sellerCommission": 0, "canTrade": True, "canWithdraw": True, "canDeposit": True,
            "brokered": False, "requireSelfTradePrevention": False, "preventSor": False,
            "updateTime": self.now(), "accountType": "SPOT", "permissions": ["SPOT"],
            "balances": [{"asset": a, "free": s(f), "locked": s(lk)}
                         for a, (f, lk) in holder.spot.items()],
        })

    def futures_account(self, holder: Holder, params: dict[str, Any]) -> Response:
        assets = [{
            "asset": a, "walletBalance": s(v), "unrealizedProfit": "0.00000000",
            "marginBalance": s(v), "maintMargin": "0.00000000", "initialMargin": "0.00000000",
            "positionInitialMargin": "0.00000000", "openOrderInitialMargin": "0.00000000",
            "crossWalletBalance": s(v), "crossUnPnl": "0.00000000", "availableBalance": s(v),
            "maxWithdrawAmount": s(v), "updateTime": self.now(),
        } for a, v in holder.futures.items()]
        total = s(sum(holder.futures.values(), Decimal(0)))
        return Response(200, {"totalInitialMargin": "0", "totalWalletBalance": total,
                              "availableBalance": total, "assets": assets, "positions": []})

    # -- orders ----------------------------------------------------------------------------

    def new_order(self, holder: Holder, p: dict[str, Any]) -> Response:
        market = self.markets.get(str(p.get("symbol")))
        if market is None:
            return error(-1121, "Invalid symbol.")
        client_id = str(p.get("newClientOrderId") or f"fake{next(self._ids)}")
        # Binance refuses a newClientOrderId only while an order with it is open.
        if any(o["clientOrderId"] == client_id and o["status"] in ("NEW", "PARTIALLY_FILLED")
               for o in holder.orders):
            return error(-2010, "Duplicate order sent.")
        side, kind = str(p.get("side")), str(p.get("type"))
        price = market.price if kind == "MARKET" else Decimal(str(p.get("price")))
        if kind == "MARKET" and "quoteOrderQty" in p:
            quote_qty = Decimal(str(p["quoteOrderQty"]))
            qty = (quote_qty / price / market.step).to_integral_value(ROUND_DOWN) * market.step
        else:
            quote_qty, qty = Decimal(0), Decimal(str(p.get("quantity")))
        if kind != "MARKET" and price % market.tick != 0:
            return error(-1013, "Filter failure: PRICE_FILTER")
        if qty <= 0 or qty % market.step != 0:
            return error(-1013, "Filter failure: LOT_SIZE")
        if qty * price < market.min_notional:
            return error(-1013, "Filter failure: NOTIONAL")
        pay, pay_amount = (market.quote, qty * price) if side == "BUY" else (market.base, qty)
        if holder.held(pay)[0] < pay_amount:
            return error(-2010, "Account has insufficient balance for requested action.")
        fills = kind == "MARKET" or (side == "BUY") == (price >= market.price)
        order = {
            "symbol": market.id, "orderId": next(self._ids), "orderListId": -1,
            "clientOrderId": client_id, "price": s(Decimal(0) if kind == "MARKET" else price),
            "origQty": s(qty), "executedQty": "0.00000000", "cummulativeQuoteQty": "0.00000000",
            "status": "NEW", "timeInForce": str(p.get("timeInForce") or "GTC"), "type": kind,
            "side": side, "stopPrice": "0.00000000", "icebergQty": "0.00000000",
            "time": self.now(), "updateTime": self.now(), "isWorking": True,
            "workingTime": self.now(), "origQuoteOrderQty": s(quote_qty),
            "selfTradePreventionMode": "EXPIRE_MAKER",
        }
        holder.orders.append(order)
        fill_list: list[dict[str, Any]] = []
        if fills:
            fill_list.append(self._fill(holder, market, order, qty, market.price))
        else:
            holder.held(pay)[0] -= pay_amount
            holder.held(pay)[1] += pay_amount
        view = {k: v for k, v in order.items()
                if k not in ("time", "updateTime", "isWorking", "stopPrice", "icebergQty")}
        return Response(200, {**view, "transactTime": order["time"], "fills": fill_list})

    def _fill(self, holder: Holder, market: Market, order: dict[str, Any], qty: Decimal,
              price: Decimal) -> dict[str, Any]:
        cost = qty * price
        buy = order["side"] == "BUY"
        if holder.bnb_fees:
            fee, fee_asset = (cost * BNB_TAKER / self.bnb_price), "BNB"
        else:
            fee, fee_asset = (qty * TAKER, market.base) if buy else (cost * TAKER, market.quote)
        fee = Decimal(s(fee))
        holder.held(market.quote)[0] += -cost if buy else cost
        holder.held(market.base)[0] += qty if buy else -qty
        holder.held(fee_asset)[0] -= fee
        order.update(executedQty=s(qty), cummulativeQuoteQty=s(cost), status="FILLED",
                     updateTime=self.now())
        trade_id = next(self._ids)
        holder.trades.append({
            "symbol": market.id, "id": trade_id, "orderId": order["orderId"],
            "orderListId": -1, "price": s(price), "qty": s(qty), "quoteQty": s(cost),
            "commission": s(fee), "commissionAsset": fee_asset, "time": self.now(),
            "isBuyer": buy, "isMaker": False, "isBestMatch": True,
        })
        return {"price": s(price), "qty": s(qty), "commission": s(fee),
                "commissionAsset": fee_asset, "tradeId": trade_id}

    def get_order(self, holder: Holder, p: dict[str, Any]) -> Response:
        for order in reversed(holder.orders):
            if order["symbol"] == p.get("symbol") and (
                    order["clientOrderId"] == p.get("origClientOrderId")
                    or str(order["orderId"]) == str(p.get("orderId"))):
                return Response(200, dict(order))
        return error(-2013, "Order does not exist.")

    def cancel_order(self, holder: Holder, p: dict[str, Any]) -> Response:
        """DELETE /api/v3/order: an open order's reservation is released; any other is -2011."""
        market = next((m for m in self.markets.values() if m.id == p.get("symbol")), None)
        for order in reversed(holder.orders):
            if market is not None and order["symbol"] == market.id and (
                    order["clientOrderId"] == p.get("origClientOrderId")
                    or str(order["orderId"]) == str(p.get("orderId"))):
                if order["status"] not in ("NEW", "PARTIALLY_FILLED"):
                    break
                left = Decimal(order["origQty"]) - Decimal(order["executedQty"])
                pay, amount = ((market.quote, left * Decimal(order["price"]))
                               if order["side"] == "BUY" else (market.base, left))
                holder.held(pay)[0] += amount
                holder.held(pay)[1] -= amount
                order.update(status="CANCELED", updateTime=self.now())
                return Response(200, {**order, "origClientOrderId": order["clientOrderId"]})
        return error(-2011, "Unknown order sent.")

    def my_trades(self, holder: Holder, p: dict[str, Any]) -> Response:
        return Response(200, [t for t in holder.trades if t["symbol"] == p.get("symbol") and (
            "orderId" not in p or str(t["orderId"]) == str(p["orderId"]))])

    # -- withdrawals and deposits ----------------------------------------------------------

    def withdraw(self, holder: Holder, p: dict[str, Any]) -> Response:
        coin, network = str(p.get("coin")), str(p.get("network"))
        rules = self.networks.get((coin, network))
        if rules is None:
            return error(-4000, "Network is not supported.")  # *unverified* code and wording
        amount, address = Decimal(str(p.get("amount"))), str(p.get("address"))
        order_id = p.get("withdrawOrderId")
        if order_id and any(w["withdrawOrderId"] == order_id for w in holder.withdrawals):
            return error(-4000, "withdrawOrderId already exists.")  # *unverified* wording
        if amount < rules.minimum or amount % rules.multiple != 0:
            return error(-4022, "The withdrawal amount is below the minimum.")  # *unverified*
        if (coin, network, address.lower()) not in holder.allowlist:
            return error(-4014, "Withdrawal address is not in the address whitelist.")
        if holder.held(coin)[0] < amount:
            return error(-4026, "User has insufficient balance")
        holder.held(coin)[0] -= amount
        internal = self.chain.owner(network, address) is not None and isinstance(
            self.chain.owner(network, address)[0], FakeBinance)  # type: ignore[index]
        withdrawal_id = f"w{next(self._ids)}"
        holder.withdrawals.append({
            "id": withdrawal_id, "amount": s(amount), "transactionFee": s(rules.fee),
            "coin": coin, "status": 0, "address": address, "addressTag": p.get("addressTag", ""),
            "txId": "", "applyTime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "network": network, "transferType": 1 if internal else 0,
            "withdrawOrderId": order_id or "", "info": "", "confirmNo": 0, "walletType": 0,
            "txKey": "", "_applied": self.now(),
        })
        return Response(200, {"id": withdrawal_id})

    def withdraw_history(self, holder: Holder, p: dict[str, Any]) -> Response:
        start, end = int(p.get("startTime", 0)), int(p.get("endTime", 2**62))
        if p.get("withdrawOrderId") and end - start > 7 * 24 * 3600 * 1000:
            return error(-1127, "More than 7 days between startTime and endTime.")
        rows = []
        for w in holder.withdrawals:
            if not start <= w["_applied"] <= end or w["coin"] != p.get("coin", w["coin"]):
                continue
            if p.get("withdrawOrderId") and w["withdrawOrderId"] != p["withdrawOrderId"]:
                continue
            self._advance(w)
            rows.append({k: v for k, v in w.items() if not k.startswith("_")})
        return Response(200, rows)

    def _advance(self, w: dict[str, Any]) -> None:
        """Each read moves a withdrawal one step: 0 -> 4 (processing) -> 6 (delivered)."""
        if w["status"] == 0:
            w["status"] = 4
        elif w["status"] == 4:
            w["status"] = 6
            internal = w["transferType"] == 1
            w["txId"] = (f"Internal transfer {next(self._ids)}" if internal
                         else "0x" + hashlib.sha256(w["id"].encode()).hexdigest())
            received = Decimal(w["amount"]) - Decimal(w["transactionFee"])
            self.chain.deliver(w["coin"], received, network=w["network"],
                               address=w["address"], tag=w["addressTag"] or None,
                               txid=w["txId"], internal=internal)
            w["completeTime"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())

    def deposit_history(self, holder: Holder, p: dict[str, Any]) -> Response:
        start = int(p.get("startTime", 0))
        return Response(200, [d for d in holder.deposits if d["insertTime"] >= start
                              and d["coin"] == p.get("coin", d["coin"])])

    # -- transfers -------------------------------------------------------------------------

    def asset_transfer(self, holder: Holder, p: dict[str, Any]) -> Response:
        kind, asset, amount = str(p.get("type")), str(p.get("asset")), Decimal(str(p["amount"]))
        if kind not in ("MAIN_UMFUTURE", "UMFUTURE_MAIN"):
            return error(-9000, f"fake: transfer type {kind} not arranged")
        if amount <= 0:
            return error(-1102, "Mandatory parameter 'amount' was not sent, was empty/null, "
                                "or malformed.")
        if kind == "MAIN_UMFUTURE":
            if holder.held(asset)[0] < amount:
                return error(-5002, "You have insufficient balance.")
            holder.held(asset)[0] -= amount
            holder.futures[asset] = holder.futures.get(asset, Decimal(0)) + amount
        else:
            if holder.futures.get(asset, Decimal(0)) < amount:
                return error(-5002, "You have insufficient balance.")
            holder.futures[asset] -= amount
            holder.held(asset)[0] += amount
        tran_id = next(self._ids)
        holder.transfers.append({"asset": asset, "amount": s(amount), "type": kind,
                                 "status": "CONFIRMED", "tranId": tran_id,
                                 "timestamp": self.now()})
        return Response(200, {"tranId": tran_id})

    def transfer_history(self, holder: Holder, p: dict[str, Any]) -> Response:
        start = int(p.get("startTime", 0))
        rows = [t for t in holder.transfers if t["type"] == p.get("type")
                and t["timestamp"] >= start]
        return Response(200, {"total": len(rows), "rows": rows})

    def universal_transfer(self, holder: Holder, p: dict[str, Any]) -> Response:
        if holder.master is not None:
            return error(-12022, "This request is only allowed for the master account.")
        subs = {h.email: h for h in self.holders.values() if h.master == holder.name}
        source = subs.get(p["fromEmail"]) if "fromEmail" in p else holder
        target = subs.get(p["toEmail"]) if "toEmail" in p else holder
        if source is None or target is None:
            return error(-12020, "The sub-account does not exist.")
        client_id = p.get("clientTranId")
        if client_id and any(u["clientTranId"] == client_id for u in self.universal):
            return error(-12021, "clientTranId already exists.")  # *unverified* wording
        asset, amount = str(p["asset"]), Decimal(str(p["amount"]))
        if p.get("fromAccountType") != "SPOT" or p.get("toAccountType") != "SPOT":
            return error(-9000, "fake: only SPOT <-> SPOT universal transfers are arranged")
        if source.held(asset)[0] < amount:
            return error(-5002, "You have insufficient balance.")
        source.held(asset)[0] -= amount
        target.held(asset)[0] += amount
        tran_id = next(self._ids)
        self.universal.append({
            "tranId": tran_id, "fromEmail": source.email, "toEmail": target.email,
            "asset": asset, "amount": s(amount), "createTimeStamp": self.now(),
            "fromAccountType": p["fromAccountType"], "toAccountType": p["toAccountType"],
            "status": "SUCCESS", "clientTranId": client_id or "", "_master": holder.name,
        })
        return Response(200, {"tranId": tran_id, "clientTranId": client_id or ""})

    def universal_history(self, holder: Holder, p: dict[str, Any]) -> Response:
        if holder.master is not None:
            return error(-12022, "This request is only allowed for the master account.")
        # fromEmail defaults to the master's own: a transfer into it is found by toEmail.
        wanted = ("toEmail", p["toEmail"]) if "toEmail" in p else (
            "fromEmail", p.get("fromEmail", holder.email))
        rows = [{k: v for k, v in u.items() if not k.startswith("_")} for u in self.universal
                if u["_master"] == holder.name and u[wanted[0]] == wanted[1]
                and u["createTimeStamp"] >= int(p.get("startTime", 0))
                and u["clientTranId"] == p.get("clientTranId", u["clientTranId"])]
        return Response(200, {"result": rows, "totalCount": len(rows)})


ROUTES: dict[tuple[str, str], tuple[Any, bool]] = {
    ("GET", "/api/v3/exchangeInfo"): (FakeBinance.exchange_info, False),
    ("GET", "/api/v3/ticker/24hr"): (FakeBinance.ticker, False),
    ("GET", "/sapi/v1/capital/config/getall"): (FakeBinance.capital_config, True),
    ("GET", "/api/v3/account"): (FakeBinance.account, True),
    ("GET", "/fapi/v3/account"): (FakeBinance.futures_account, True),
    ("POST", "/api/v3/order"): (FakeBinance.new_order, True),
    ("GET", "/api/v3/order"): (FakeBinance.get_order, True),
    ("DELETE", "/api/v3/order"): (FakeBinance.cancel_order, True),
    ("GET", "/api/v3/myTrades"): (FakeBinance.my_trades, True),
    ("POST", "/sapi/v1/capital/withdraw/apply"): (FakeBinance.withdraw, True),
    ("GET", "/sapi/v1/capital/withdraw/history"): (FakeBinance.withdraw_history, True),
    ("GET", "/sapi/v1/capital/deposit/hisrec"): (FakeBinance.deposit_history, True),
    ("POST", "/sapi/v1/asset/transfer"): (FakeBinance.asset_transfer, True),
    ("GET", "/sapi/v1/asset/transfer"): (FakeBinance.transfer_history, True),
    ("POST", "/sapi/v1/sub-account/universalTransfer"): (FakeBinance.universal_transfer, True),
    ("GET", "/sapi/v1/sub-account/universalTransfer"): (FakeBinance.universal_history, True),
}

__all__ = ["FakeBinance", "Market", "Network"]
