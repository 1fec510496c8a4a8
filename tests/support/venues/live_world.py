"""The built-in path's four accounts as live accounts on a fake Upbit and a fake Binance joined by
one Chain: the live connectors, ccxt's signing and parsing, only the HTTP layer replaced."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from rebalancer.accounts import DEFAULT_CONFIG, Accounts
from rebalancer.exchanges.ccxt_base import CcxtExchange
from rebalancer.exchanges.live import Credentials, LiveExchanges
from tests.support.venues.binance import FakeBinance, Market, Network
from tests.support.venues.chain import Chain
from tests.support.venues.http import Fault, Wire, install
from tests.support.venues.upbit import UpbitVenue

UPBIT_KEY, UPBIT_SECRET = "upbit-access-AKIA7Q2LIVEKEY", "upbit-secret-s3cr3t-9f2c41d"


def env_name(account: str, what: str) -> str:
    return f"RB_TEST_{account.upper().replace('-', '_')}_{what}"


def live_config() -> dict[str, Any]:
    """The default configuration with every account naming credentials in the environment."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    for name, account in data["accounts"].items():
        account["credentials"] = {"api_key_env": env_name(name, "KEY"),
                                  "secret_env": env_name(name, "SECRET")}
    return data


@dataclass
class LiveWorld:
    chain: Chain
    upbit: UpbitVenue
    binance: FakeBinance
    accounts: Accounts
    credentials: dict[str, Credentials]
    # Faults per account, played by the connector built for it; its requests land in `wires`.
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    wires: dict[str, Wire] = field(default_factory=dict)

    def exchanges(self) -> LiveExchanges:
        return LiveExchanges(self.accounts, credentials=self.credentials, prepare=self.prepare)

    def prepare(self, port: CcxtExchange) -> None:
        port.client.enableRateLimit = False
        venue = self.upbit if port.exchange == "upbit" else self.binance
        self.wires[port.account] = install(port.client, venue, self.faults.get(port.account))

    def environment(self) -> dict[str, str]:
        """The variables the live configuration names, set to these fake credentials."""
        env = {}
        for account, credentials in self.credentials.items():
            env[env_name(account, "KEY")] = credentials.api_key
            env[env_name(account, "SECRET")] = credentials.secret
        return env

    def config_file(self, folder: Path) -> Path:
        path = folder / "live-config.yaml"
        path.write_text(yaml.safe_dump(live_config()), encoding="utf-8")
        return path

    def secrets(self) -> list[str]:
        return [s for c in self.credentials.values() for s in c.secrets()]

    def signatures(self) -> set[str]:
        """Every request signature and bearer token the connectors sent."""
        found: set[str] = set()
        for wire in self.wires.values():
            for request in wire.sent:
                if request.params.get("signature"):
                    found.add(str(request.params["signature"]))
                token = request.headers.get("Authorization", "")
                if token.startswith("Bearer "):
                    found.add(token.removeprefix("Bearer "))
        return found


def live_world(krw: Decimal = Decimal("10000000")) -> LiveWorld:
    """Upbit KRW-ETH at 4,321,000 and Binance ETH/USDT at 2,000; `krw` on upbit-personal; every
    configured deposit address on the chain and every allowlisted address registered."""
    accounts = Accounts.model_validate({"accounts": live_config()["accounts"]})
    chain = Chain()
    upbit = UpbitVenue(chain)
    binance = FakeBinance(chain)
    binance.add_market(Market("ETH", "USDT", Decimal("2000")))
    binance.add_network(Network("ETH", "ETH", fee=Decimal("0.0016"), minimum=Decimal("0.0098")))
    binance.add_network(Network("USDT", "ETH", fee=Decimal("3.5"), minimum=Decimal("10"),
                                multiple=Decimal("0.000001")))
    credentials: dict[str, Credentials] = {}
    for account in accounts.accounts.values():
        if account.exchange == "upbit":
            upbit.add_account(account.id, UPBIT_KEY, UPBIT_SECRET)
            credentials[account.id] = Credentials(UPBIT_KEY, UPBIT_SECRET)
            venue: Any = upbit
            for allowed in account.withdrawal_allowlist:
                upbit.register(account.id, allowed.currency, allowed.network, allowed.address,
                               allowed.tag)
        else:
            credentials[account.id] = binance.add_account(
                account.id, email=account.email or f"{account.id}@example",
                master=account.master_account)
            venue = binance
            for allowed in account.withdrawal_allowlist:
                binance.allow(account.id, allowed.currency, allowed.network, allowed.address)
        for currency in account.deposit_addresses:
            for address in account.addresses(currency):
                chain.register(address.network, address.address, venue, account.id)
    upbit.fund("upbit-personal", "KRW", krw)
    return LiveWorld(chain, upbit, binance, accounts, credentials)
