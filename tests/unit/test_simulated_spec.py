"""The world file's checks on a market's third fee currency (no database needed)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from rebalancer.accounts import load_accounts
from rebalancer.errors import SpecError
from rebalancer.exchanges.simulated.spec import DEFAULT_WORLD, WorldSpec, validate_world


def world(edit: Any) -> WorldSpec:
    data = yaml.safe_load(DEFAULT_WORLD.read_text(encoding="utf-8"))
    edit(data["exchanges"]["binance"]["markets"])
    return WorldSpec.model_validate(data)


def test_the_demo_world_charges_no_third_currency() -> None:
    spec = world(lambda markets: None)
    assert all(m.fee_currency is None for e in spec.exchanges.values() for m in e.markets.values())
    validate_world(spec, load_accounts())


def test_a_fee_currency_needs_a_market_to_price_it() -> None:
    def edit(markets: dict[str, Any]) -> None:
        markets["ETH/USDT"]["fee_currency"] = "BNB"

    with pytest.raises(SpecError, match="needs a BNB/USDT market"):
        validate_world(world(edit), load_accounts())


def test_a_fee_currency_must_be_neither_base_nor_quote() -> None:
    def edit(markets: dict[str, Any]) -> None:
        markets["ETH/USDT"]["fee_currency"] = "USDT"

    with pytest.raises(SpecError, match="third one"):
        validate_world(world(edit), load_accounts())
