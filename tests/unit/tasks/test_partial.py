"""The partial-fill decision: figures in the plan's unit, the threshold compared exactly, the
policy applied only below it, and what stays unspent."""

from decimal import Decimal

import pytest
import yaml

from rebalancer.specs.loading import spec_from_data
from rebalancer.specs.models import (
    DEFAULT_MIN_FILLED_FRACTION,
    PartialPolicy,
    TaskSpec,
    TradeConfig,
)
from rebalancer.tasks.partial import Fill, decide, measure, message, remainder

D = Decimal
PARAMS = {"base_currency": "ETH", "quote_currency": "KRW"}


def slices(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"filled": filled, "cost": cost, "status": "closed"} for filled, cost in pairs]


def buy(quote_amount: str = "1000000") -> TradeConfig:
    return TradeConfig(account="upbit-personal", side="buy", base_currency="ETH",
                       quote_currency="KRW", quote_amount=quote_amount)


def test_a_buy_by_quote_is_measured_by_its_cost_and_a_base_plan_by_the_base_filled() -> None:
    recorded = slices(("0.0625", "249975"), ("0", "0"))
    quote = measure("quote", D("999600"), PARAMS, recorded)
    assert (quote.currency, quote.filled, quote.unfilled) == ("KRW", D("249975"), D("749625"))
    assert quote.fraction == D("0.2501")
    base = measure("base", D("0.25"), PARAMS, recorded)
    assert (base.currency, base.filled, base.unfilled) == ("ETH", D("0.0625"), D("0.1875"))
    assert base.to_extra() == {
        "amount_unit": "base", "amount_currency": "ETH", "planned_amount": "0.25",
        "filled_amount": "0.0625", "unfilled_amount": "0.1875", "filled_fraction": "0.2500"}


@pytest.mark.parametrize("policy", ["continue", "fail", "needs_attention"])
def test_below_the_threshold_the_policy_decides_at_or_above_it_the_trade_is_filled(
    policy: PartialPolicy,
) -> None:
    threshold = DEFAULT_MIN_FILLED_FRACTION
    assert decide(Fill("quote", "KRW", D(100), D("25")), policy, threshold) == policy
    assert decide(Fill("quote", "KRW", D(100), D("99")), policy, threshold) == "filled"
    assert decide(Fill("quote", "KRW", D(100), D(100)), policy, threshold) == "filled"
    # Exact amounts decide, not the rounded fraction (98.99999 shows as 0.9900).
    just_under = Fill("quote", "KRW", D(100), D("98.99999"))
    assert just_under.fraction == D("0.9900")
    assert decide(just_under, policy, threshold) == policy
    assert decide(just_under, policy, D("0.5")) == "filled"


def test_a_market_buys_step_dust_counts_as_filled_by_default() -> None:
    # 250,000 KRW at 4,123,457 KRW/ETH floored to 1e-8 ETH leaves under 0.05 KRW unspent.
    dust = Fill("quote", "KRW", D(250000), D("249999.96"))
    assert dust.unfilled == D("0.04")
    assert decide(dust, "needs_attention", DEFAULT_MIN_FILLED_FRACTION) == "filled"


def test_unfilled_is_never_negative() -> None:
    assert Fill("base", "ETH", D(1), D("1.0000001")).unfilled == 0


def test_the_remainder_is_what_the_trade_was_given_and_did_not_spend() -> None:
    fill = Fill("quote", "KRW", D("999500"), D("249875"))
    # A buy by quote: the spec's amount less what left the account, fee included.
    extra = {"cumulative_quote_spent": "250000", "cumulative_cost": "249875"}
    assert remainder(fill, buy(), extra, None) == {
        "account": "upbit-personal", "currency": "KRW", "amount": "750000",
        "reason": "partial_fill"}
    # A sell: the base not sold.
    sell = TradeConfig(account="binance-corp-sub", side="sell", base_currency="ETH",
                       quote_currency="USDT", amount="0.4")
    sold = Fill("base", "ETH", D("0.4"), D("0.1"))
    assert remainder(sold, sell, {}, None) == {
        "account": "binance-corp-sub", "currency": "ETH", "amount": "0.3",
        "reason": "partial_fill"}
    # A buy by base amount: the quote the unfilled part would have cost, an estimate.
    limit = TradeConfig(account="binance-corp-sub", side="buy", order_type="limit",
                        base_currency="ETH", quote_currency="USDT", amount="0.4", price="3000")
    assert remainder(sold, limit, {}, D("3000")) == {
        "account": "binance-corp-sub", "currency": "USDT", "amount": "900",
        "reason": "partial_fill", "estimated": True}
    # Nothing unspent: no remainder.
    assert remainder(fill, buy("250000"), extra, None) is None


def test_the_message_says_planned_filled_unfilled_and_what_stays() -> None:
    fill = Fill("quote", "KRW", D("999500"), D("249875"))
    extra = {"partial_fill": {"slices": 4, "slices_filled": 1, "min_filled_fraction": "0.99"},
             "remainders": [{"account": "upbit-personal", "currency": "KRW",
                             "amount": "750000"}]}
    assert message("buy", fill, extra) == (
        "buy filled 249875 of 999500 KRW planned (25%, 1 of 4 orders); 749625 KRW unfilled,"
        " below the 99% required; 750000 KRW stays unspent on upbit-personal")


def test_on_partial_and_the_fraction_belong_to_trades_and_have_bounds() -> None:
    trade = TaskSpec(name="t", kind="trade", on_partial="continue", min_filled_fraction="0.5")
    assert (trade.on_partial, trade.min_filled_fraction) == ("continue", D("0.5"))
    assert TaskSpec(name="t", kind="trade").on_partial is None  # the default applies at run time
    with pytest.raises(ValueError, match="on_partial is only for trade tasks"):
        TaskSpec(name="w", kind="withdraw", on_partial="fail")
    with pytest.raises(ValueError, match="min_filled_fraction is only for trade tasks"):
        TaskSpec(name="w", kind="withdraw", min_filled_fraction="0.5")
    for bad in ("0", "1.5", "-1"):
        with pytest.raises(ValueError, match="min_filled_fraction"):
            TaskSpec(name="t", kind="trade", min_filled_fraction=bad)
    with pytest.raises(ValueError, match="on_partial"):
        TaskSpec(name="t", kind="trade", on_partial="ignore")
    # The spec snapshot stores it as a string and reads it back the same.
    dumped = trade.model_dump(mode="json")
    assert dumped["min_filled_fraction"] == "0.5"
    assert TaskSpec.model_validate(dumped) == trade


def test_a_yaml_spec_sets_them_next_to_twap() -> None:
    data = yaml.safe_load("""
name: partial_yaml
params: {budget: {type: amount}}
tasks:
  - name: buy
    kind: trade
    twap: {slices: 4, interval_seconds: 2}
    on_partial: continue
    min_filled_fraction: 0.9
    config: {account: upbit-personal, side: buy, base_currency: ETH, quote_currency: KRW,
             quote_amount: "{budget}"}
""")
    [buy] = spec_from_data(data).tasks
    assert (buy.on_partial, buy.min_filled_fraction) == ("continue", D("0.9"))
