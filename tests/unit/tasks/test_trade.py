"""TWAP slicing: the count is capped by the minimum notional, the remainder folds into the last."""

from decimal import Decimal

import pytest

from rebalancer.tasks.trade import plan_slices

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
