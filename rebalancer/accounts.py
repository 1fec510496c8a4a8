"""Our exchange accounts, loaded from configuration: links between them and allowed addresses."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rebalancer.errors import SpecError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "defaults" / "config.yaml"


class Address(BaseModel):
    """A deposit address on one network."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str
    network: str
    tag: str | None = None


class AllowedAddress(Address):
    """An address a withdrawal from the owning account may go to."""

    currency: str


# Keys that would put a secret into the file itself.
_INLINE_SECRETS = ("api_key", "apiKey", "key", "secret", "password", "private_key")


class CredentialSource(BaseModel):
    """Where an account's API key pair is read from at start: an environment variable or a file
    (mode 600), one of each. The values themselves never appear in the configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key_env: str | None = None
    api_key_file: Path | None = None
    secret_env: str | None = None
    secret_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: object) -> object:
        if isinstance(data, dict):
            inline = [k for k in _INLINE_SECRETS if k in data]
            if inline:
                raise ValueError(
                    f"{', '.join(inline)}: a key or secret is never written in the configuration;"
                    " name where to read it with api_key_env/api_key_file and"
                    " secret_env/secret_file")
        return data

    @model_validator(mode="after")
    def _one_of_each(self) -> CredentialSource:
        for what in ("api_key", "secret"):
            given = [getattr(self, f"{what}_{where}") for where in ("env", "file")]
            if sum(g is not None for g in given) != 1:
                raise ValueError(f"give exactly one of {what}_env and {what}_file")
        return self


class Account(BaseModel):
    """One account on one exchange. Specs refer to its fields as `{param.field}`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    exchange: Literal["upbit", "binance"]
    # Live accounts name their API key pair; an account without credentials is simulated, and
    # one process never mixes the two (rebalancer/exchanges/live.py).
    credentials: CredentialSource | None = None
    read_only: bool = False  # balances and lookups only: every order, withdrawal or transfer
    # is refused before it is sent
    kind: Literal["personal", "master", "sub"] = "personal"
    interim_account: str | None = None  # where this account's money goes first on a path
    master_account: str | None = None  # for a sub account
    email: str | None = None  # Binance sub-account transfers name accounts by e-mail
    # By currency: one address, or a list of them on distinct networks (ETH on ETH and on
    # ARBITRUM). An address with a tag (memo) needs it: a deposit without it is lost.
    deposit_addresses: dict[str, Address | list[Address]] = Field(default_factory=dict)
    withdrawal_allowlist: list[AllowedAddress] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_address_per_network(self) -> Account:
        for currency, given in self.deposit_addresses.items():
            if isinstance(given, list) and not given:
                raise ValueError(f"account {self.id}: {currency} lists no deposit address")
            networks = [a.network for a in self.addresses(currency)]
            doubled = sorted({n for n in networks if networks.count(n) > 1})
            if doubled:
                raise ValueError(
                    f"account {self.id}: two {currency} deposit addresses on"
                    f" {', '.join(doubled)} (one per network)")
        return self

    def addresses(self, currency: str) -> list[Address]:
        """Every deposit address for `currency`, one per network (none: an empty list)."""
        given = self.deposit_addresses.get(currency)
        if given is None:
            return []
        return list(given) if isinstance(given, list) else [given]

    def deposit_address(self, currency: str, network: str) -> Address | None:
        """The deposit address for `currency` on `network`, or None."""
        return next((a for a in self.addresses(currency) if a.network == network), None)

    def allows(self, currency: str, address: str, network: str, tag: str | None = None) -> bool:
        return any(
            a.currency == currency and a.address == address and a.network == network
            and a.tag == tag
            for a in self.withdrawal_allowlist
        )


class Accounts(BaseModel):
    """Every configured account by id; links are checked to point at known accounts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accounts: dict[str, Account]

    @model_validator(mode="before")
    @classmethod
    def _ids_from_keys(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("accounts"), dict):
            data = dict(data)
            data["accounts"] = {
                key: {"id": key, **(value or {})} for key, value in data["accounts"].items()
            }
        return data

    @model_validator(mode="after")
    def _links_resolve(self) -> Accounts:
        for account in self.accounts.values():
            for link in ("interim_account", "master_account"):
                target = getattr(account, link)
                if target is not None and target not in self.accounts:
                    raise ValueError(f"account {account.id}: {link} {target!r} is not configured")
        return self

    def get(self, account_id: str) -> Account:
        try:
            return self.accounts[account_id]
        except KeyError:
            known = ", ".join(sorted(self.accounts))
            raise SpecError(f"unknown account {account_id!r} (known: {known})") from None

    def __contains__(self, account_id: object) -> bool:
        return account_id in self.accounts


def validation_text(error: ValidationError) -> str:
    """Where and what, for every problem, without the offending input values."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {_problem(e)}" for e in error.errors())


def _problem(item: Mapping[str, Any]) -> str:
    # pydantic's "Extra inputs are not permitted" hides that the key is a typo.
    return "unknown key" if item["type"] == "extra_forbidden" else str(item["msg"])


# The configuration's sections; any other top-level key is a typo that would be ignored.
CONFIG_KEYS = ("accounts", "alerts", "exchanges", "specs")


def load_config_file(path: Path | None = None) -> dict[str, object]:
    """The whole configuration file (accounts, spec directories) as plain data; every problem
    is one line naming the file, the key and what is wrong."""
    path = path or DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"configuration {path}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"configuration {path}: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"configuration {path}: must be a mapping of {', '.join(CONFIG_KEYS)}")
    unknown = sorted(str(key) for key in data if key not in CONFIG_KEYS)
    if unknown:
        raise SpecError(f"configuration {path}: {unknown[0]}: unknown key"
                        f" (known: {', '.join(CONFIG_KEYS)})")
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    return " ".join(str(error).split())


def load_accounts(path: Path | None = None) -> Accounts:
    """Accounts from the `accounts:` section of the configuration; raises SpecError."""
    data = load_config_file(path)
    try:
        return Accounts.model_validate({"accounts": data.get("accounts") or {}})
    except ValidationError as e:
        # Never pydantic's own text: it quotes the input, which may hold a pasted secret.
        raise SpecError(f"configuration {path or DEFAULT_CONFIG}: {validation_text(e)}"
                        ) from None


def spec_dirs(path: Path | None = None) -> list[Path]:
    """The configuration's `specs:` directories (relative to the file), besides the built-ins."""
    data = load_config_file(path)
    listed = data.get("specs") or []
    if not isinstance(listed, list):
        raise SpecError(f"configuration {path or DEFAULT_CONFIG}: specs: must be a list of"
                        " directories")
    base = (path or DEFAULT_CONFIG).resolve().parent
    return [base / str(d) for d in listed]
