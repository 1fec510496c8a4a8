"""What the Upbit and Binance connectors share: one ccxt client per account, errors sorted and
scrubbed at the boundary, exact Decimals, status tables that never guess."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

import ccxt
import ccxt.async_support as ccxt_async

from rebalancer.accounts import Account, Accounts
from rebalancer.errors import NoSuchWalletError, RejectedError
from rebalancer.exchanges.base import Wallet, normalise_txid
from rebalancer.exchanges.errors import scrub, translate
from rebalancer.exchanges.live import Credentials

T = TypeVar("T")
S = TypeVar("S", bound=StrEnum)

# ccxt logs every request's headers at DEBUG: the API key, and Upbit's signed JWT. Whatever
# level the process runs at, its logger never says more than INFO.
logging.getLogger("ccxt").setLevel(logging.INFO)


def dec(value: object) -> Decimal:
    """An exact Decimal of a number ccxt or an exchange gave (strings: the client parses numbers
    as strings); None and "" are 0. Raises RejectedError on anything else."""
    if value is None or value == "":
        return Decimal(0)
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise RejectedError(f"the exchange sent {value!r} where a number belongs") from None


def opt_dec(value: object) -> Decimal | None:
    return None if value is None or value == "" else dec(value)


def from_millis(value: object) -> datetime:
    """An exchange timestamp in ms (or an ISO string) as an aware UTC datetime."""
    if isinstance(value, str) and not value.isdigit():
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.fromtimestamp(int(dec(value)) / 1000, tz=UTC)


def to_millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def lookup_status(table: Mapping[str, S], raw: object, unknown: S) -> S:
    """Our status for the exchange's raw one; a raw status the table does not list is `unknown`
    (the task keeps waiting and names it), never a guess."""
    return table.get(str(raw), unknown)


def _keep_http_status(base: type[ccxt_async.Exchange]) -> type[ccxt_async.Exchange]:
    """`base` whose errors carry the HTTP status they came with, so that a 5xx on a money call
    is an unknown outcome whatever ccxt made of the body."""

    class Client(base):  # type: ignore[misc]
        def handle_errors(self, code: int, *args: Any) -> Any:
            try:
                return super().handle_errors(code, *args)
            except ccxt.BaseError as e:
                e.http_status = code
                raise

        def handle_http_status_code(self, code: int, *args: Any) -> Any:
            try:
                return super().handle_http_status_code(code, *args)
            except ccxt.BaseError as e:
                e.http_status = code
                raise

    Client.__name__ = base.__name__
    return Client


class CcxtExchange:
    """One account on one exchange through its own ccxt client (one key pair per account).

    Subclasses implement the port of rebalancer/exchanges/base.py; every exchange call goes
    through `read` or `send`, which sort ccxt's errors (rebalancer/exchanges/errors.py) and take
    secrets out of their messages.
    """

    exchange: ClassVar[str]
    client_class: ClassVar[type[ccxt_async.Exchange]]
    has_testnet: ClassVar[bool] = False  # Upbit has none: its set_sandbox_mode raises TypeError

    def __init__(self, account: Account, accounts: Accounts, credentials: Credentials | None,
                 *, read_only: bool = False, testnet: bool = False,
                 options: Mapping[str, Any] | None = None) -> None:
        self.account = account.id
        self.profile = account
        self.accounts = accounts
        self.read_only = read_only or credentials is None
        self._secrets = credentials.secrets() if credentials else ()
        config: dict[str, Any] = {"enableRateLimit": True, "timeout": 10_000}
        if credentials is not None:
            config.update(apiKey=credentials.api_key, secret=credentials.secret)
        config.update(options or {})
        self.client = _keep_http_status(self.client_class)(config)
        # Numbers parsed as strings: Decimal(str) is exact, float is not.
        self.client.number = str
        self.client.verbose = False
        if testnet:
            if not self.has_testnet:
                raise RejectedError(f"{self.exchange} has no testnet")
            self.client.set_sandbox_mode(True)

    async def close(self) -> None:
        await self.client.close()

    async def read(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A call that moves nothing: any failure but a refusal is retryable."""
        try:
            return await call()
        except Exception as e:
            raise translate(e, what=self._what(what), moves_money=False,
                            secrets=self._secrets) from None

    async def send(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A call that moves money: refused when the account is read-only; a failure that may
        have followed execution is an unknown outcome (reconcile by client id, never resend)."""
        if self.read_only:
            raise RejectedError(f"{self.account} is read-only: {what} not sent")
        try:
            return await call()
        except Exception as e:
            raise translate(e, what=self._what(what), moves_money=True,
                            secrets=self._secrets) from None

    def scrubbed(self, text: str) -> str:
        return scrub(text, self._secrets)

    def _what(self, what: str) -> str:
        return f"{self.exchange} {self.account} {what}"

    async def markets(self) -> dict[str, Any]:
        # ccxt caches the markets on the client after the first load.
        return await self.read("load markets", lambda: self.client.load_markets())

    async def market_of(self, symbol: str) -> dict[str, Any]:
        markets = await self.markets()
        market = markets.get(symbol)
        if market is None or not market.get("spot", True):
            raise RejectedError(f"{self.exchange} has no spot market {symbol}")
        return dict(market)

    async def ticker_price(self, symbol: str) -> Decimal:
        await self.market_of(symbol)
        ticker = await self.read(f"ticker {symbol}", lambda: self.client.fetch_ticker(symbol))
        price = opt_dec(ticker.get("last")) or opt_dec(ticker.get("close"))
        if price is None or price <= 0:
            raise RejectedError(f"{self.exchange} gives no price for {symbol}")
        return price

    def wallet_params(self, wallet: Wallet) -> dict[str, Any]:
        """ccxt params selecting `wallet` on fetch_balance; the spot wallet needs none."""
        if wallet != Wallet.SPOT:
            raise NoSuchWalletError(f"{self.exchange} accounts have no {wallet} wallet")
        return {}

    async def balance(self, currency: str, wallet: Wallet = Wallet.SPOT) -> Decimal:
        """What is free to use now (held-back amounts of resting orders excluded)."""
        params = self.wallet_params(wallet)
        balances = await self.read(f"{wallet} balance",
                                   lambda: self.client.fetch_balance(params))
        return dec((balances.get(currency) or {}).get("free"))

    async def balances(self, wallet: Wallet = Wallet.SPOT) -> dict[str, tuple[Decimal, Decimal]]:
        """Every currency held in `wallet`: (free, total), zero balances left out."""
        params = self.wallet_params(wallet)
        balances = await self.read(f"{wallet} balances",
                                   lambda: self.client.fetch_balance(params))
        held: dict[str, tuple[Decimal, Decimal]] = {}
        for currency, total in (balances.get("total") or {}).items():
            if dec(total) != 0:
                held[currency] = (dec((balances.get("free") or {}).get(currency)), dec(total))
        return held


__all__ = [
    "CcxtExchange",
    "dec",
    "from_millis",
    "lookup_status",
    "normalise_txid",
    "opt_dec",
    "to_millis",
]
