"""Deposit addresses per currency: one, or a list with one per network."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from rebalancer.accounts import Accounts, Address

ETH = {"address": "0xaa", "network": "ETH"}
ARB = {"address": "0xbb", "network": "ARBITRUM"}


def account(addresses: dict[str, Any]) -> Any:
    return Accounts.model_validate(
        {"accounts": {"a": {"exchange": "binance", "deposit_addresses": addresses}}}
    ).get("a")


def test_one_address_per_currency_still_reads_as_before() -> None:
    a = account({"ETH": ETH})
    assert a.deposit_addresses["ETH"] == Address(address="0xaa", network="ETH")
    assert a.addresses("ETH") == [Address(address="0xaa", network="ETH")]
    assert a.deposit_address("ETH", "ETH") == Address(address="0xaa", network="ETH")
    assert a.deposit_address("ETH", "ARBITRUM") is None


def test_a_list_gives_one_address_per_network() -> None:
    a = account({"ETH": [ETH, ARB], "XRP": {"address": "r1", "network": "XRP", "tag": "7"}})
    assert a.deposit_address("ETH", "ARBITRUM") == Address(address="0xbb", network="ARBITRUM")
    assert a.deposit_address("ETH", "ETH") == Address(address="0xaa", network="ETH")
    assert [x.network for x in a.addresses("ETH")] == ["ETH", "ARBITRUM"]
    assert a.deposit_address("XRP", "XRP") == Address(address="r1", network="XRP", tag="7")
    assert a.deposit_address("USDT", "ETH") is None and a.addresses("USDT") == []


def test_two_addresses_on_one_network_are_refused() -> None:
    with pytest.raises(ValidationError, match="two ETH deposit addresses on ETH"):
        account({"ETH": [ETH, {"address": "0xcc", "network": "ETH"}]})


def test_an_empty_list_is_refused() -> None:
    with pytest.raises(ValidationError, match="lists no deposit address"):
        account({"ETH": []})
