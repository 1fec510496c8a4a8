"""TWAP slicing (the count capped by the minimum notional, the remainder in the last) and prices."""

from decimal import Decimal

import pytest

from rebalancer.exchanges.base import MarketRules, Side
from rebalancer.tasks.trade import plan_slices, round_price

D = Decimal


def test_slices_add_up_to_the_total_with_the_remainder_in_the_last() -> None:
    slices = plan_slices(D("1000000"), 3, D("5000"), D(1), D(1))
    assert slices == [D(333333), D(333333), D(333334)]
    assert sum(slices) == D("1000000")


def test_the_count_is_capped_so_no_slice_falls_under_the_minimum() -> None:
    # 12,000 KRW in 4 slices would be 3,000 each, under Upbit's 5,000 minimum: only 2 fit.
    slices = plan_slices(D("12000"), 4, D("5000"), D(1), D(1))
    assert slices == [D(6000), D(6000)]
    assert all(s >= D(5000) for s in slices)


def test_a_total_under_one_minimum_gives_no_slice() -> None:
    assert plan_slices(D("4999"), 4, D("5000"), D(1), D(1)) == []


def test_base_amounts_are_checked_in_notional_at_the_price() -> None:
    # 0.01 ETH at 2,900 USDT is 29 USDT: at a 10 USDT minimum only 2 slices fit.
    slices = plan_slices(D("0.01"), 5, D("10"), D("2900"), D("0.0001"))
    assert slices == [D("0.0050"), D("0.0050")]


def test_rounding_down_each_slice_keeps_the_total_exact() -> None:
    slices = plan_slices(D("1.00007"), 4, D("0.001"), D(1), D("0.0001"))
    assert slices[:3] == [D("0.2500")] * 3
    assert slices[-1] == D("0.25007")
    assert sum(slices) == D("1.00007")


@pytest.mark.parametrize("wanted", [1, 2, 7, 20])
def test_never_more_slices_than_asked(wanted: int) -> None:
    assert len(plan_slices(D("10000000"), wanted, D("5000"), D(1), D(1))) == wanted


def _rules(*ticks: tuple[str, str]) -> MarketRules:
    return MarketRules(
        symbol="ETH/KRW", base="ETH", quote="KRW", min_notional=D(0), amount_step=D(1),
        taker_fee=D(0), market_buy_by_quote_only=False,
        price_ticks=tuple((D(floor), D(tick)) for floor, tick in ticks),
    )


def test_a_buy_rounds_down_and_a_sell_up_so_the_limit_is_never_worse() -> None:
    rules = _rules(("0", "0.01"))
    assert round_price(rules, D("2950.009"), Side.BUY) == D("2950.00")
    assert round_price(rules, D("2950.001"), Side.SELL) == D("2950.01")
    assert round_price(rules, D("2950.01"), Side.SELL) == D("2950.01")


def test_a_price_already_on_the_tick_is_kept() -> None:
    rules = _rules(("1000000", "1000"), ("0", "1"))
    assert round_price(rules, D("4001000"), Side.BUY) == D("4001000")


def test_a_sell_rounded_up_into_a_coarser_band_lands_on_that_band_s_tick() -> None:
    rules = _rules(("100", "10"), ("0", "7"))
    # 99 up to the 7s is 105, which sits in the 10s band: 110.
    assert round_price(rules, D("99"), Side.SELL) == D("110")
    assert round_price(rules, D("99"), Side.BUY) == D("98")


def test_a_tiny_buy_price_rounds_to_zero() -> None:
    assert round_price(_rules(("0", "0.01")), D("0.004"), Side.BUY) == 0
