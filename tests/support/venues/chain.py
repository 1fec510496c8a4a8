"""The blockchain between fake venues: an address belongs to one venue's account, and a
withdrawal to it lands there as a deposit."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol


class Receiver(Protocol):
    def credit_deposit(self, account: str, currency: str, amount: Decimal, *, network: str,
                       address: str, tag: str | None, txid: str, internal: bool) -> None: ...


@dataclass
class Chain:
    """Who owns which deposit address; withdrawals to other addresses leave the venues."""

    owners: dict[tuple[str, str], tuple[Receiver, str]] = field(default_factory=dict)
    sent_out: list[tuple[str, Decimal, str]] = field(default_factory=list)  # to strangers

    def register(self, network: str, address: str, venue: Receiver, account: str) -> None:
        self.owners[(network, address.lower())] = (venue, account)

    def owner(self, network: str, address: str) -> tuple[Receiver, str] | None:
        return self.owners.get((network, address.lower()))

    def deliver(self, currency: str, amount: Decimal, *, network: str, address: str,
                tag: str | None, txid: str, internal: bool = False) -> None:
        found = self.owner(network, address)
        if found is None:
            self.sent_out.append((currency, amount, address))
            return
        venue, account = found
        venue.credit_deposit(account, currency, amount, network=network, address=address,
                             tag=tag, txid=txid, internal=internal)
