"""A stateful fake of Upbit's REST API (v1) behind ccxt's HTTP layer: JWT-signed accounts,
KRW markets, orders, withdrawals to registered addresses, and deposits."""

# Over 400 lines on purpose: one fake exchange whose parts (auth, balances, orders, wallets)
# share one state; split up, each part would reach into the others' dicts.

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_DOWN, Decimal
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from rebalancer.accounts import Accounts
from rebalancer.exchanges.live import Credentials
from rebalancer.exchanges.upbit import UpbitExchange
from tests.support.venues.chain import Chain
from tests.support.venues.http import Fault, Request, Response, Wire, install

KST = timezone(timedelta(hours=9))
VOLUME_STEP = Decimal("0.00000001")

# Upbit's KRW price units (lowest price, unit), written down here apart from the connector's
# table so that one checks the other.
_KRW_UNITS = ((1_000_000, "1000"), (500_000, "500"), (100_000, "100"), (50_000, "50"),
              (10_000, "10"), (5_000, "5"), (100, "1"), (10, "0.1"), (1, "0.01"), (0, "0.0001"))


def krw_unit(price: Decimal) -> Decimal:
    return next(Decimal(unit) for floor, unit in _KRW_UNITS if price >= floor)


def num(value: Decimal) -> str:
    """A number as Upbit writes it: a plain decimal string."""
    text = format(value.normalize(), "f")
    return text if "." in text else text + ".0"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UpbitError(Exception):
    def __init__(self, status: int, name: str, message: str) -> None:
        super().__init__(name)
        self.response = Response(status, {"error": {"name": name, "message": message}},
                                 "Bad Request" if status == 400 else "Error")


@dataclass
class WithdrawalRule:
    fee: Decimal
    minimum: Decimal
    fixed: int  # decimal places an amount may have


@dataclass
class UpbitAccount:
    id: str
    api_key: str
    secret: str
    balances: dict[str, list[Decimal]] = field(default_factory=dict)  # [free, locked]
    registered: set[tuple[str, str, str, str | None]] = field(default_factory=set)
    identifiers: set[str] = field(default_factory=set)  # every identifier ever sent
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)  # by uuid
    withdrawals: list[dict[str, Any]] = field(default_factory=list)
    deposits: list[dict[str, Any]] = field(default_factory=list)

    def held(self, currency: str) -> list[Decimal]:
        return self.balances.setdefault(currency, [Decimal(0), Decimal(0)])


class UpbitVenue:
    """Upbit as its REST API answers: market orders fill at once at the market's fixed price,
    a market buy spends KRW (`ord_type=price`) and ends `cancel` when KRW is left over;
    withdrawals advance one state each time the history is read, then reach the Chain."""

    def __init__(self, chain: Chain | None = None, *, fee: str = "0.0005",
                 min_total: str = "5000") -> None:
        self.chain = chain or Chain()
        self.fee = Decimal(fee)
        self.min_total = Decimal(min_total)
        self.prices: dict[str, Decimal] = {"KRW-ETH": Decimal("4321000"),
                                           "KRW-BTC": Decimal("140000000")}
        self.rules: dict[tuple[str, str], WithdrawalRule] = {
            ("ETH", "ETH"): WithdrawalRule(Decimal("0.01"), Decimal("0.02"), 4),
            ("BTC", "BTC"): WithdrawalRule(Decimal("0.0005"), Decimal("0.001"), 8),
        }
        self.accounts: dict[str, UpbitAccount] = {}
        self._nonces: set[str] = set()

    # -- arranging ---------------------------------------------------------------------------

    def add_account(self, account: str, api_key: str, secret: str) -> UpbitAccount:
        self.accounts[account] = UpbitAccount(account, api_key, secret)
        return self.accounts[account]

    def fund(self, account: str, currency: str, amount: Decimal | str) -> None:
        self.accounts[account].held(currency)[0] += Decimal(amount)

    def free(self, account: str, currency: str) -> Decimal:
        return self.accounts[account].held(currency)[0]

    def locked(self, account: str, currency: str) -> Decimal:
        return self.accounts[account].held(currency)[1]

    def register(self, account: str, currency: str, network: str, address: str,
                 tag: str | None = None) -> None:
        """An address registered for withdrawals (Upbit withdraws to registered ones only)."""
        self.accounts[account].registered.add((currency, network, address.lower(), tag))

    def credentials(self, account: str) -> Credentials:
        found = self.accounts[account]
        return Credentials(found.api_key, found.secret)

    def port(self, account: str, accounts: Accounts, *, faults: list[Fault] | None = None,
             read_only: bool = False) -> tuple[UpbitExchange, Wire]:
        """A connector for `account` with its HTTP layer routed here."""
        port = UpbitExchange(accounts.get(account), accounts, self.credentials(account),
                             read_only=read_only, options={"enableRateLimit": False})
        return port, install(port.client, self, faults)

    # -- the Chain delivers here -------------------------------------------------------------

    def credit_deposit(self, account: str, currency: str, amount: Decimal, *, network: str,
                       address: str, tag: str | None, txid: str, internal: bool) -> None:
        self.accounts[account].deposits.append({
            "type": "deposit", "uuid": str(uuid.uuid4()), "currency": currency,
            "net_type": network, "txid": txid, "state": "PROCESSING",
            "created_at": _now(), "done_at": None, "amount": num(amount), "fee": "0.0",
            "transaction_type": "internal" if internal else "default",
        })

    # -- the wire ----------------------------------------------------------------------------

    def too_many_requests(self) -> Response:
        # Upbit answers 429 with a plain-text body: no JSON error for ccxt to read, so its
        # HTTP status table decides (RateLimitExceeded).
        return Response(429, None, "Too Many Requests")

    def handle(self, request: Request) -> Response:
        route = (request.method, request.path)
        try:
            if request.path.startswith("/v1/market/all"):
                return Response(200, [{"market": m, "korean_name": m, "english_name": m}
                                      for m in self.prices])
            if route == ("GET", "/v1/ticker"):
                return Response(200, self._tickers(request.params["markets"]))
            account = self._authenticate(request)
            handler = self._routes().get(route)
            if handler is None:
                raise UpbitError(404, "not_found", f"no route {request.method} {request.path}")
            return Response(200, handler(account, request.params))
        except UpbitError as e:
            return e.response

    def _routes(self) -> dict[tuple[str, str], Any]:
        return {
            ("GET", "/v1/accounts"): self._balances,
            ("GET", "/v1/orders/chance"): self._order_chance,
            ("POST", "/v1/orders"): self._create_order,
            ("GET", "/v1/order"): self._get_order,
            ("DELETE", "/v1/order"): self._cancel_order,
            ("GET", "/v1/withdraws/chance"): self._withdraw_chance,
            ("POST", "/v1/withdraws/coin"): self._withdraw,
            ("GET", "/v1/withdraws"): self._withdraw_history,
            ("GET", "/v1/deposits"): self._deposit_history,
        }

    def _authenticate(self, request: Request) -> UpbitAccount:
        """The JWT verified against the account's secret, and its query hash against the
        parameters actually sent: proof that ccxt's real signing ran."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            head, body, signature = token.split(".")
            claims = json.loads(_unb64(body))
        except ValueError:
            raise UpbitError(401, "jwt_verification", "Jwt 토큰 검증에 실패했습니다.") from None
        account = next((a for a in self.accounts.values()
                        if a.api_key == claims.get("access_key")), None)
        if account is None:
            raise UpbitError(401, "invalid_access_key", "잘못된 엑세스 키입니다.")
        expected = hmac.new(account.secret.encode(), f"{head}.{body}".encode(),
                            hashlib.sha256).digest()
        if not hmac.compare_digest(_b64(expected), signature):
            raise UpbitError(401, "jwt_verification", "Jwt 토큰 검증에 실패했습니다.")
        nonce = str(claims.get("nonce"))
        if nonce in self._nonces:
            raise UpbitError(401, "jwt_verification", "nonce already used")
        self._nonces.add(nonce)
        if request.method == "POST":
            query = unquote(urlencode(json.loads(request.body or "{}"), quote_via=quote))
        else:
            query = unquote(urlsplit(request.url).query)
        if query:
            digest = hashlib.sha512(query.encode()).hexdigest()
            if claims.get("query_hash") != digest or claims.get("query_hash_alg") != "SHA512":
                raise UpbitError(401, "invalid_query_payload", "Jwt의 query를 검증하는데 "
                                 "실패하였습니다.")
        return account

    # -- market data and balances ------------------------------------------------------------

    def _tickers(self, markets: str) -> list[dict[str, Any]]:
        now = datetime.now(KST)
        out = []
        for market in markets.split(","):
            if market not in self.prices:
                raise UpbitError(404, "Code not found", "Code not found")
            price = self.prices[market]
            out.append({
                "market": market, "trade_date": now.strftime("%Y%m%d"),
                "trade_time": now.strftime("%H%M%S"), "trade_timestamp": _millis(),
                "opening_price": float(price), "high_price": float(price),
                "low_price": float(price), "trade_price": float(price),
                "prev_closing_price": float(price), "change": "EVEN", "change_price": 0.0,
                "change_rate": 0.0, "trade_volume": 1.0, "acc_trade_price_24h": 1.0,
                "acc_trade_volume_24h": 1.0, "timestamp": _millis(),
            })
        return out

    def _balances(self, account: UpbitAccount, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"currency": c, "balance": num(free), "locked": num(locked),
                 "avg_buy_price": "0", "avg_buy_price_modified": False, "unit_currency": "KRW"}
                for c, (free, locked) in account.balances.items()]

    def _market(self, market_id: object) -> tuple[str, str, Decimal]:
        if market_id not in self.prices:
            raise UpbitError(400, "market_does_not_exist", f"market {market_id} does not exist")
        quote_currency, base = str(market_id).split("-")
        return quote_currency, base, self.prices[str(market_id)]

    def _order_chance(self, account: UpbitAccount, params: dict[str, Any]) -> dict[str, Any]:
        quote_currency, base, _ = self._market(params.get("market"))

        def wallet(currency: str) -> dict[str, Any]:
            free, locked = account.held(currency)
            return {"currency": currency, "balance": num(free), "locked": num(locked),
                    "avg_buy_price": "0", "avg_buy_price_modified": False,
                    "unit_currency": "KRW"}

        fee = num(self.fee)
        return {
            "bid_fee": fee, "ask_fee": fee, "maker_bid_fee": fee, "maker_ask_fee": fee,
            "market": {
                "id": params["market"], "name": f"{base}/{quote_currency}",
                "order_types": ["limit"], "order_sides": ["ask", "bid"],
                "ask_types": ["limit", "market"], "bid_types": ["limit", "price"],
                "bid": {"currency": quote_currency, "min_total": num(self.min_total)},
                "ask": {"currency": base, "min_total": num(self.min_total)},
                "max_total": "1000000000.0", "state": "active",
            },
            "bid_account": wallet(quote_currency), "ask_account": wallet(base),
        }

    # -- orders ------------------------------------------------------------------------------

    def _create_order(self, account: UpbitAccount, params: dict[str, Any]) -> dict[str, Any]:
        identifier = params.get("identifier")
        if identifier is not None:
            if identifier in account.identifiers:
                raise UpbitError(400, "duplicate_identifier",
                                 "identifier already used: an identifier cannot be reused")
            account.identifiers.add(identifier)  # used, whether the order is taken or not
        quote_currency, base, market_price = self._market(params.get("market"))
        side, kind = params.get("side"), params.get("ord_type")
        suffix = "bid" if side == "bid" else "ask"
        if side not in ("bid", "ask") or kind not in ("limit", "price", "market") or (
                kind == "price" and side != "bid") or (kind == "market" and side != "ask"):
            raise UpbitError(400, "validation_error", "ord_type/side does not have a valid value")
        price = Decimal(str(params["price"])) if params.get("price") is not None else None
        volume = Decimal(str(params["volume"])) if params.get("volume") is not None else None
        if kind == "limit":
            assert price is not None and volume is not None
            if quote_currency == "KRW" and price % krw_unit(price) != 0:
                raise UpbitError(400, f"invalid_price_{suffix}",
                                 "주문가격 단위를 잘못 입력하셨습니다.")
            total = price * volume
        elif kind == "price":
            assert price is not None
            total = price
        else:
            assert volume is not None
            total = volume * market_price
        if total < self.min_total:
            raise UpbitError(400, f"under_min_total_{suffix}",
                             f"최소주문금액 이상으로 주문해주세요 ({num(self.min_total)} KRW)")
        pays, amount = (quote_currency, total * (1 + self.fee)) if side == "bid" else (
            base, volume or Decimal(0))
        wallet = account.held(pays)
        if wallet[0] < amount:
            raise UpbitError(400, f"insufficient_funds_{suffix}",
                             f"주문가능한 금액({pays})이 부족합니다.")
        wallet[0] -= amount
        wallet[1] += amount
        order: dict[str, Any] = {
            "uuid": str(uuid.uuid4()), "side": side, "ord_type": kind,
            "price": num(price) if price is not None else None, "state": "wait",
            "market": params["market"], "created_at": _now(),
            "volume": num(volume) if volume is not None else None,
            "remaining_volume": num(volume) if volume is not None else None,
            "reserved_fee": num(total * self.fee) if side == "bid" else "0.0",
            "remaining_fee": num(total * self.fee) if side == "bid" else "0.0",
            "paid_fee": "0.0", "locked": num(amount), "executed_volume": "0.0",
            "executed_funds": "0.0", "trades_count": 0, "identifier": identifier,
        }
        accepted = dict(order)  # the POST answers with the order as accepted
        crosses = kind != "limit" or (price is not None and (
            price >= market_price if side == "bid" else price <= market_price))
        if crosses:
            self._fill(account, order, base, quote_currency, market_price)
        account.orders[order["uuid"]] = order
        return {k: v for k, v in accepted.items() if k != "trades"}

    def _fill(self, account: UpbitAccount, order: dict[str, Any], base: str,
              quote_currency: str, price: Decimal) -> None:
        """Executes the whole order at `price`; a market buy refunds the KRW it could not
        spend and ends `cancel`, as Upbit's do."""
        locked = Decimal(order["locked"])
        if order["ord_type"] == "price":
            budget = Decimal(order["price"])
            volume = (budget / price).quantize(VOLUME_STEP, rounding=ROUND_DOWN)
        else:
            volume = Decimal(order["volume"])
        funds = volume * price
        fee = funds * self.fee
        if order["side"] == "bid":
            spent = funds + fee
            wallet = account.held(quote_currency)
            wallet[1] -= locked
            wallet[0] += locked - spent
            account.held(base)[0] += volume
            leftover = locked - spent
        else:
            account.held(base)[1] -= locked
            account.held(quote_currency)[0] += funds - fee
            leftover = Decimal(0)
        order.update({
            "state": "cancel" if order["ord_type"] == "price" and leftover > 0 else "done",
            "remaining_volume": None if order["ord_type"] == "price" else "0.0",
            "remaining_fee": "0.0", "paid_fee": num(fee), "locked": "0.0",
            "executed_volume": num(volume), "executed_funds": num(funds), "trades_count": 1,
            "trades": [{"market": order["market"], "uuid": str(uuid.uuid4()),
                        "price": num(price), "volume": num(volume), "funds": num(funds),
                        "trend": "up" if order["side"] == "bid" else "down",
                        "created_at": _now(), "side": order["side"]}],
        })

    def _get_order(self, account: UpbitAccount, params: dict[str, Any]) -> dict[str, Any]:
        if "uuid" in params:
            found = account.orders.get(params["uuid"])
        else:
            found = next((o for o in account.orders.values()
                          if o["identifier"] == params.get("identifier")), None)
        if found is None:
            raise UpbitError(404, "order_not_found", "주문을 찾지 못했습니다.")
        return found

    def _cancel_order(self, account: UpbitAccount, params: dict[str, Any]) -> dict[str, Any]:
        """DELETE /v1/order: answers with the order as it was (`wait`), then cancels it and
        frees what it held; an order that is not waiting is not found, as at Upbit."""
        order = self._get_order(account, params)
        if order["state"] != "wait":
            raise UpbitError(404, "order_not_found", "주문을 찾지 못했습니다.")
        answer = {k: v for k, v in order.items() if k != "trades"}
        base, quote_currency = str(order["market"]).split("-")[1], "KRW"
        locked = Decimal(order["locked"])
        wallet = account.held(quote_currency if order["side"] == "bid" else base)
        wallet[0] += locked
        wallet[1] -= locked
        order.update(state="cancel", locked="0.0")
        return answer

    # -- withdrawals and deposits ------------------------------------------------------------

    def _rule(self, currency: object, network: object) -> WithdrawalRule:
        rule = self.rules.get((str(currency), str(network)))
        if rule is None:
            raise UpbitError(400, "invalid_parameter", f"net_type {network} is not supported "
                             f"for {currency}")
        return rule

    def _withdraw_chance(self, account: UpbitAccount, params: dict[str, Any]) -> dict[str, Any]:
        currency = params.get("currency")
        rule = self._rule(currency, params.get("net_type"))
        free, locked = account.held(str(currency))
        return {
            "member_level": {"security_level": 4, "fee_level": 0, "email_verified": True,
                             "identity_auth_verified": True, "bank_account_verified": True,
                             "two_factor_auth_verified": True, "locked": False,
                             "wallet_locked": False},
            "currency": {"code": currency, "withdraw_fee": num(rule.fee), "is_coin": True,
                         "wallet_state": "working", "wallet_support": ["deposit", "withdraw"]},
            "account": {"currency": currency, "balance": num(free), "locked": num(locked),
                        "avg_buy_price": "0", "avg_buy_price_modified": False,
                        "unit_currency": "KRW"},
            "withdraw_limit": {"currency": currency, "minimum": num(rule.minimum),
                               "onetime": "1000.0", "daily": "10000.0",
                               "remaining_daily": "10000.0", "remaining_daily_krw": "0.0",
                               "fixed": rule.fixed, "can_withdraw": True},
        }

    def _withdraw(self, account: UpbitAccount, params: dict[str, Any]) -> dict[str, Any]:
        currency, network = str(params.get("currency")), params.get("net_type")
        if network is None:
            raise UpbitError(400, "validation_error", "net_type is missing")
        rule = self._rule(currency, network)
        amount = Decimal(str(params.get("amount")))
        tag = params.get("secondary_address")
        if (currency, str(network), str(params.get("address")).lower(),
                tag) not in account.registered:
            raise UpbitError(400, "withdraw_address_not_registerd", "등록된 출금 주소가 아닙니다.")
        if amount < rule.minimum:
            raise UpbitError(400, "under_min_amount",
                             f"최소 출금 수량은 {num(rule.minimum)} 입니다.")
        if amount != amount.quantize(Decimal(1).scaleb(-rule.fixed), rounding=ROUND_DOWN):
            raise UpbitError(400, "invalid_amount", f"소수점 {rule.fixed}자리까지 입력 가능합니다.")
        wallet = account.held(currency)
        if wallet[0] < amount + rule.fee:
            raise UpbitError(400, "insufficient_funds_withdraw", "출금가능 금액이 부족합니다.")
        wallet[0] -= amount + rule.fee
        wallet[1] += amount + rule.fee
        withdrawal = {
            "type": "withdraw", "uuid": str(uuid.uuid4()), "currency": currency,
            "net_type": network, "txid": None, "state": "WAITING", "created_at": _now(),
            "done_at": None, "amount": num(amount), "fee": num(rule.fee),
            "transaction_type": "default", "is_cancelable": True,
            # kept for delivery, not part of Upbit's payload
            "_address": params.get("address"), "_tag": tag,
        }
        account.withdrawals.append(withdrawal)
        return _public(withdrawal)

    def _withdraw_history(self, account: UpbitAccount,
                          params: dict[str, Any]) -> list[dict[str, Any]]:
        for withdrawal in account.withdrawals:
            self._advance(account, withdrawal)
        listed = [w for w in account.withdrawals if params.get("currency") in (None, w["currency"])]
        return [_public(w) for w in reversed(listed)][: int(params.get("limit", 100))]

    def _advance(self, account: UpbitAccount, withdrawal: dict[str, Any]) -> None:
        if withdrawal["state"] == "WAITING":
            withdrawal.update(state="PROCESSING", is_cancelable=False)
        elif withdrawal["state"] == "PROCESSING":
            total = Decimal(withdrawal["amount"]) + Decimal(withdrawal["fee"])
            account.held(withdrawal["currency"])[1] -= total
            txid = "0x" + hashlib.sha256(withdrawal["uuid"].encode()).hexdigest()
            withdrawal.update(state="DONE", txid=txid, done_at=_now())
            self.chain.deliver(withdrawal["currency"], Decimal(withdrawal["amount"]),
                               network=withdrawal["net_type"], address=withdrawal["_address"],
                               tag=withdrawal["_tag"], txid=txid)

    def _deposit_history(self, account: UpbitAccount,
                         params: dict[str, Any]) -> list[dict[str, Any]]:
        for deposit in account.deposits:
            if deposit["state"] == "PROCESSING":  # confirmed: credited on this read
                deposit.update(state="ACCEPTED", done_at=_now())
                account.held(deposit["currency"])[0] += Decimal(deposit["amount"])
        listed = [d for d in account.deposits if params.get("currency") in (None, d["currency"])]
        return [dict(d) for d in reversed(listed)][: int(params.get("limit", 100))]


def _public(withdrawal: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in withdrawal.items() if not k.startswith("_")}


def _now() -> str:
    return datetime.now(KST).replace(microsecond=0).isoformat()


def _millis() -> int:
    return int(datetime.now(KST).timestamp() * 1000)


__all__ = ["KST", "UpbitAccount", "UpbitError", "UpbitVenue", "krw_unit", "num"]
