"""The live exchanges: which process talks to which venue, credentials read at start, and one
connector per configured account."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rebalancer.accounts import (
    DEFAULT_CONFIG,
    Account,
    Accounts,
    CredentialSource,
    load_config_file,
    validation_text,
)
from rebalancer.budgets import BucketOption, bucket_options, budget_rates
from rebalancer.errors import SpecError
from rebalancer.exchanges.base import Exchange
from rebalancer.secret_files import read_secret_file
from rebalancer.settings import Settings, environment_variable

if TYPE_CHECKING:  # ccxt takes most of a second to import: only a live process loads it
    from rebalancer.exchanges.ccxt_base import CcxtExchange

Mode = Literal["simulated", "live"]

# Connector classes by exchange, imported when first used (ccxt's modules are large).
CONNECTORS: dict[str, tuple[str, str]] = {
    "upbit": ("rebalancer.exchanges.upbit", "UpbitExchange"),
    "binance": ("rebalancer.exchanges.binance", "BinanceExchange"),
}


@dataclass(frozen=True, repr=False)
class Credentials:
    """An API key pair, read from the environment or a file the config names; never printed."""

    api_key: str
    secret: str

    def __repr__(self) -> str:
        return "Credentials(***)"

    def secrets(self) -> tuple[str, str]:
        return self.api_key, self.secret


class ExchangeOptions(BaseModel):
    """The `exchanges:` section of the configuration, per exchange."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    testnet: bool = False  # Binance's spot testnet (it has no withdrawals or transfers)
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Request budgets by bucket over the published defaults (rebalancer/budgets.py); the
    # whole exchange or one bucket may be `unlimited` (benchmarks).
    budgets: dict[str, BucketOption] = Field(default_factory=dict)

    @field_validator("budgets", mode="before")
    @classmethod
    def _unlimited(cls, value: object) -> object:
        return bucket_options(value)


def exchange_options(path: Path | None) -> dict[str, ExchangeOptions]:
    """The configuration's `exchanges:` section; raises SpecError naming the file and the key."""
    try:
        return _exchange_options(path)
    except SpecError as e:
        text = str(e)
        where = f"configuration {path or DEFAULT_CONFIG}: "
        raise SpecError(text if text.startswith("configuration ") else where + text) from None


def _exchange_options(path: Path | None) -> dict[str, ExchangeOptions]:
    section = load_config_file(path).get("exchanges") or {}
    if not isinstance(section, dict):
        raise SpecError("exchanges: must map exchange names to options")
    options: dict[str, ExchangeOptions] = {}
    for name, values in section.items():
        if name not in CONNECTORS and name != "simulated":
            raise SpecError(
                f"exchanges: unknown exchange {name!r} (known: upbit, binance, simulated)")
        try:
            options[name] = ExchangeOptions.model_validate(values or {})
        except ValidationError as e:
            raise SpecError(f"exchanges.{name}: {validation_text(e)}") from None
        if name == "simulated" and options[name].model_fields_set - {"budgets"}:
            raise SpecError("exchanges.simulated: only `budgets` applies to the simulated world")
        try:
            budget_rates(name, options[name].budgets)
        except ValueError as e:
            raise SpecError(f"exchanges.{name}.budgets.{e}") from None
    if options.get("upbit", ExchangeOptions()).testnet:
        raise SpecError("exchanges.upbit: Upbit has no testnet")
    return options


def exchange_mode(settings: Settings, accounts: Accounts) -> Mode:
    """`live` or `simulated` for this process; raises SpecError when the configuration mixes
    accounts with and without credentials (a live order on one account and a simulated
    withdrawal on the next would lose track of real money)."""
    live = sorted(a.id for a in accounts.accounts.values() if a.credentials is not None)
    simulated = sorted(a.id for a in accounts.accounts.values() if a.credentials is None)
    mode: Mode = settings.exchanges or ("live" if live else "simulated")
    if mode == "live" and simulated:
        raise SpecError(
            f"live exchanges, but {', '.join(simulated)} name no credentials: simulated and"
            " live accounts cannot be mixed (give each account its credentials, or run with"
            " REBALANCER_EXCHANGES=simulated)")
    return mode


def read_credentials(account: Account) -> Credentials:
    """The account's key pair from the environment or files its configuration names; raises
    SpecError naming the source, never the value."""
    source = account.credentials
    if source is None:
        raise SpecError(f"account {account.id} names no credentials")
    return Credentials(_read(account.id, source, "api_key"), _read(account.id, source, "secret"))


def _read(account: str, source: CredentialSource, what: str) -> str:
    variable: str | None = getattr(source, f"{what}_env")
    if variable is not None:
        value = environment_variable(variable)
        if not value or not value.strip():
            raise SpecError(f"account {account}: {what}_env {variable} is not set")
        return value.strip()
    path: Path = getattr(source, f"{what}_file")
    text = read_secret_file(path, f"{what}_file", where=f"account {account}: ")
    if not text:
        raise SpecError(f"account {account}: {what}_file {path} is empty")
    return text


class LiveExchanges:
    """The ports of the configured accounts, each a connector with its own key pair, built on
    first use. `prepare` sees each new connector before its first call (tests use it to put a
    fake venue behind ccxt's HTTP layer). `paced`: every call goes through the request budgets
    (the engine's), so ccxt's own limiter, one fixed interval per client whatever the bucket,
    is turned off rather than left as a second, tighter and unconfigurable limit."""

    def __init__(self, accounts: Accounts, *, options: Mapping[str, ExchangeOptions] | None = None,
                 credentials: Mapping[str, Credentials] | None = None,
                 prepare: Callable[[CcxtExchange], None] | None = None,
                 paced: bool = False) -> None:
        self.accounts = accounts
        self.paced = paced
        self._options = dict(options or {})
        self._credentials = dict(credentials or {})
        self._prepare = prepare
        self._ports: dict[str, CcxtExchange] = {}

    @classmethod
    def from_config(cls, accounts: Accounts, config: Path | None, **kwargs: Any) -> LiveExchanges:
        """Every account's credentials read now, so a missing one stops the start, not a step."""
        credentials = {a.id: read_credentials(a) for a in accounts.accounts.values()}
        return cls(accounts, options=exchange_options(config), credentials=credentials, **kwargs)

    def for_account(self, account: str) -> Exchange:
        port = self._ports.get(account)
        if port is None:
            port = self._ports[account] = self._connect(self.accounts.get(account))
        # Each connector implements the whole port (its contract suite checks it).
        return cast(Exchange, port)

    def connector(self, account: str) -> CcxtExchange:
        """The account's connector itself (balances of every currency, its client)."""
        self.for_account(account)
        return self._ports[account]

    def _connect(self, account: Account) -> CcxtExchange:
        module, name = CONNECTORS[account.exchange]
        connector: type[CcxtExchange] = getattr(importlib.import_module(module), name)
        options = self._options.get(account.exchange, ExchangeOptions())
        port = connector(account, self.accounts, self._credentials.get(account.id),
                         read_only=account.read_only, testnet=options.testnet,
                         options={"timeout": int(options.timeout_seconds * 1000),
                                  "enableRateLimit": not self.paced})
        if self._prepare is not None:
            self._prepare(port)
        return port

    async def close(self) -> None:
        for port in self._ports.values():
            await port.close()
        self._ports.clear()


__all__ = [
    "CONNECTORS",
    "Credentials",
    "ExchangeOptions",
    "LiveExchanges",
    "Mode",
    "exchange_mode",
    "exchange_options",
    "read_credentials",
]
