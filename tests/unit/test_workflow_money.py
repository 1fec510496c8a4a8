"""projections/money.py: the read model fills the spec's result in as the service does, and
reads fills, fees, rate and remainders out of what tasks record, whatever they recorded."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from events.vocabulary import TaskState
from projections import money
from projections.workflows import TaskView
from rebalancer.accounts import load_accounts
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.resolution import dump_params, resolve_params, resolve_result

SPEC = builtin_specs()["upbit_to_binance_sub_futures"]
RAW = {"from_account": "upbit-personal", "to_account": "binance-corp-sub",
       "from_currency": "KRW", "interim_currency": "ETH", "to_currency": "USDT",
       "from_amount": "1000000"}
BUY = {"request_params": {"account": "upbit-personal", "side": "buy", "base_currency": "ETH",
                          "quote_currency": "KRW", "quote_amount": "1000000"},
       "request_result": {"order_id": "o1"},
       "refresh_result": {"result": {"amount": "0.25", "filled": "0.25", "cost": "999000",
                                     "average_price": "3996000"},
                          "extra": {"cumulative_amount": "0.25", "cumulative_cost": "999000",
                                    "cumulative_quote_spent": "999499.5",
                                    "fees": {"KRW": "499.5"}, "slices": [{}, {}]}}}
WITHDRAW = {"request_params": {"from_account": "upbit-personal", "currency": "ETH"},
            "request_result": {"id": "w1"},
            "refresh_result": {"result": {"txid": "0xabc", "fee": "0.01", "received": "0.24"},
                               "extra": {"remainders": [{"currency": "ETH", "amount": "0.0003",
                                                         "reason": "withdrawal_min_amount"}]}}}
TRANSFER = {"request_params": {"account": "binance-corp-sub"}, "request_result": {"id": "t1"},
            "refresh_result": {"result": {"amount": "700.5"}}}


def tasks(state: TaskState = TaskState.DONE, **recorded: dict[str, Any]) -> list[TaskView]:
    out = []
    for index, spec_task in enumerate(SPEC.tasks):
        found = recorded.get(spec_task.name.lower(), {})
        out.append(TaskView(index, spec_task.name.lower(), spec_task.kind,
                            state=state if found else TaskState.CREATED, **found))
    return out


TEMPLATES = {
    "to_amount": "{$.sub_spot_to_futures.refresh_result.result.amount}",
    "said": "{$.sub_spot_to_futures.refresh_result.result.amount} {to_currency} for"
            " {from_amount} {{KRW}}",
    "txid": "{$.withdraw_to_interim.refresh_result.result.txid}",
    "fee": "{$.buy_in_source_spot.refresh_result.extra.fees}",
    "source": "{from_account}",
}


def test_the_result_is_filled_in_as_the_service_resolves_it() -> None:
    spec = SPEC.model_copy(update={"result": TEMPLATES})
    params = resolve_params(spec, RAW, load_accounts())
    recorded = {"buy_in_source_spot": BUY, "withdraw_to_interim": WITHDRAW,
                "sub_spot_to_futures": TRANSFER}
    expected = resolve_result(spec, params, recorded)
    found = money.evaluate_result(spec.model_dump(mode="json"), dump_params(params),
                                  tasks(**recorded))
    assert found == expected
    assert found["said"] == "700.5 USDT for 1000000 {KRW}"


def test_a_result_entry_is_null_until_the_task_it_references_is_done() -> None:
    spec = SPEC.model_copy(update={"result": {
        **TEMPLATES, "linked": "{from_account.interim_account}"}}).model_dump(mode="json")
    found = money.evaluate_result(
        spec, RAW, tasks(TaskState.PROCESSING, sub_spot_to_futures=TRANSFER,
                         withdraw_to_interim=WITHDRAW))
    assert found == {"to_amount": None, "said": None, "txid": None, "fee": None,
                     "source": "upbit-personal", "linked": None}


def test_fills_fees_rate_and_remainders_from_what_tasks_recorded() -> None:
    done = tasks(buy_in_source_spot=BUY, withdraw_to_interim=WITHDRAW,
                 sub_spot_to_futures=TRANSFER)
    [fill] = money.fills(done)
    assert (fill["filled"], fill["cost"], fill["average_price"], fill["slices"]) == (
        "0.25", "999000", "3996000", 2)
    assert money.fees(done) == {"ETH": "0.01", "KRW": "499.5"}
    rate = money.rate(RAW, "700.5", done)
    assert rate is not None and rate["from_amount"] == "999499.5"
    assert Decimal(rate["rate"]) == (Decimal("700.5") / Decimal("999499.5")).quantize(
        Decimal(rate["rate"]))
    assert money.remainders(done) == [{"account": "upbit-personal", "currency": "ETH",
                                       "amount": "0.0003", "reason": "withdrawal_min_amount",
                                       "task": "withdraw_to_interim"}]
    # With no trade spending the source currency, the rate is over the from_amount param.
    moved = money.rate(RAW, "700.5", tasks(sub_spot_to_futures=TRANSFER))
    assert moved is not None and moved["from_amount"] == "1000000"
    assert money.rate(RAW, None, done) is None


@pytest.mark.parametrize("odd", [
    {"refresh_result": {"result": "x", "extra": ["y"]}},
    {"request_params": {"side": 3}, "refresh_result": {"extra": {"fees": {"KRW": "NaN"},
                                                                 "cumulative_amount": True}}},
    {"refresh_result": {"extra": {"remainders": [1, {"amount": "a lot"}, None]}}},
    {"request_params": [], "refresh_result": None},
])
def test_odd_recorded_data_is_skipped_not_raised(odd: dict[str, Any]) -> None:
    # A projection that raised would stop on the event: whatever a stream holds is read.
    odd_tasks = tasks(buy_in_source_spot=odd, withdraw_to_interim=odd)
    money.fills(odd_tasks)
    assert money.fees(odd_tasks) == {}
    assert money.remainders(odd_tasks) == []
    assert money.evaluate_result(SPEC.model_dump(mode="json"), RAW, odd_tasks) == {
        "to_amount": None}
