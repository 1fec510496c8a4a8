"""The Binance accounts of the default config on one FakeBinance, arranged for the tests."""

from __future__ import annotations

from decimal import Decimal

from rebalancer.accounts import Accounts, load_accounts
from tests.support.venues.binance import FakeBinance, Market, Network
from tests.support.venues.chain import Chain

ACCOUNTS: Accounts = load_accounts()
EXTERNAL = "0x00000000219ab540356cbb839cbe05303d7705fa"  # on nobody's allowlist


def arranged(chain: Chain | None = None) -> FakeBinance:
    """ETH/USDT at 2000; the personal account trades and withdraws to the corp master, which
    holds ETH for its sub; every account's ETH address registered on the chain."""
    fake = FakeBinance(chain)
    fake.add_market(Market("ETH", "USDT", Decimal("2000")))
    fake.add_network(Network("ETH", "ETH", fee=Decimal("0.0016"), minimum=Decimal("0.0098")))
    fake.add_network(Network("USDT", "ETH", fee=Decimal("3.5"), minimum=Decimal("10"),
                             multiple=Decimal("0.000001")))
    for account in ACCOUNTS.accounts.values():
        if account.exchange != "binance":
            continue
        master = account.master_account
        fake.add_account(account.id, email=account.email or f"{account.id}@example",
                         master=master)
        for address in account.deposit_addresses.values():
            fake.chain.register(address.network, address.address, fake, account.id)
        for allowed in account.withdrawal_allowlist:
            fake.allow(account.id, allowed.currency, allowed.network, allowed.address)
    fake.fund("binance-personal", "ETH", Decimal(10))
    fake.fund("binance-personal", "USDT", Decimal(10000))
    fake.fund("binance-corp-master", "ETH", Decimal(5))
    return fake
