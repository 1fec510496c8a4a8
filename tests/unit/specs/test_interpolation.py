"""Templates in task configs: params, account attributes, earlier results, escapes, coercion."""

from __future__ import annotations

from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest

from rebalancer.accounts import Account, Accounts, load_accounts
from rebalancer.errors import SpecError
from rebalancer.specs import (
    Reference,
    ResolvedParams,
    TradeConfig,
    WithdrawConfig,
    references,
    render,
    resolve_config,
    spec_from_data,
)

ACCOUNTS: Accounts = load_accounts()
PARAMS: ResolvedParams = MappingProxyType(
    {
        "from_account": ACCOUNTS.get("upbit-personal"),
        "to_account": ACCOUNTS.get("binance-corp-sub"),
        "interim_currency": "ETH",
        "from_currency": "KRW",
        "from_amount": Decimal("1000000"),
        "slices": 4,
    }
)
RESULTS: dict[str, dict[str, Any]] = {
    "buy_in_source_spot": {
        "request_params": {"account": "upbit-personal", "client_id": "wf-1-buy-0"},
        "request_result": {"order_id": "o-17"},
        "refresh_result": {
            "result": {"amount": "0.2174", "fee": "500", "status": "closed"},
            "extra": {"cumulative_amount_excluding_fee": "0.2174", "remainders": [{"a": "1"}]},
        },
    },
    "withdraw_to_interim": {"refresh_result": {"result": {"txid": None, "received": "0.2"}}},
}


def test_a_whole_param_template_yields_the_value_itself() -> None:
    assert render("{from_amount}", PARAMS, {}) == Decimal("1000000")
    assert render("{slices}", PARAMS, {}) == 4
    assert render("{interim_currency}", PARAMS, {}) == "ETH"


def test_an_account_param_renders_as_its_id() -> None:
    assert render("{from_account}", PARAMS, {}) == "upbit-personal"
    assert render("account {to_account}", PARAMS, {}) == "account binance-corp-sub"


def test_account_attributes_render_and_links_give_the_linked_id() -> None:
    assert render("{from_account.interim_account}", PARAMS, {}) == "binance-personal"
    assert render("{to_account.master_account}", PARAMS, {}) == "binance-corp-master"
    assert render("{to_account.email}", PARAMS, {}) == "sub@corp.example"
    assert render("{to_account.exchange}", PARAMS, {}) == "binance"
    assert render("{from_account.deposit_addresses}", PARAMS, {}) == {
        "ETH": {
            "address": "0x1f9840a85d5af5bf1d1762f925bdaddc4201f984",
            "network": "ETH",
            "tag": None,
        }
    }


def test_an_unset_account_attribute_is_an_error_naming_the_reference() -> None:
    with pytest.raises(SpecError, match=r"\{to_account.interim_account\}: account 'binance-corp-s"):
        render("{to_account.interim_account}", PARAMS, {})


def test_results_are_found_by_task_name_in_any_case() -> None:
    path = "refresh_result.extra.cumulative_amount_excluding_fee"
    assert render(f"{{$.buy_in_source_spot.{path}}}", PARAMS, RESULTS) == "0.2174"
    assert render(f"{{$.BUY_IN_SOURCE_SPOT.{path}}}", PARAMS, RESULTS) == "0.2174"
    assert render("{$.Buy_In_Source_Spot.request_result.order_id}", PARAMS, RESULTS) == "o-17"
    assert render("{$.buy_in_source_spot.refresh_result.extra.remainders.0.a}", {}, RESULTS) == "1"


def test_a_recorded_null_renders_as_none_when_it_is_the_whole_string() -> None:
    assert render("{$.withdraw_to_interim.refresh_result.result.txid}", PARAMS, RESULTS) is None
    with pytest.raises(SpecError, match="cannot be written into a string"):
        render("tx {$.withdraw_to_interim.refresh_result.result.txid}", PARAMS, RESULTS)


def test_a_missing_result_names_the_reference_and_the_task() -> None:
    with pytest.raises(
        SpecError, match=r"\{\$\.await_deposit\.refresh_result\.result\.amount\}: task 'await_d"
    ):
        render("{$.await_deposit.refresh_result.result.amount}", PARAMS, RESULTS)
    with pytest.raises(SpecError, match=r"has not recorded refresh_result\.result\.cost"):
        render("{$.buy_in_source_spot.refresh_result.result.cost}", PARAMS, RESULTS)


def test_an_unknown_param_at_run_time_is_an_error() -> None:
    with pytest.raises(SpecError, match=r"\{nope\}: no param 'nope'"):
        render("{nope}", PARAMS, {})


def test_templates_inside_longer_strings_are_formatted_in() -> None:
    assert render("{interim_currency}/{from_currency}", PARAMS, {}) == "ETH/KRW"
    assert render("spend {from_amount} {from_currency}", PARAMS, {}) == "spend 1000000 KRW"
    # a Decimal with an exponent is still written out in full
    assert render("{n} KRW", {"n": Decimal("1E+6")}, {}) == "1000000 KRW"
    assert render("{$.buy_in_source_spot.request_result.order_id}!", {}, RESULTS) == "o-17!"


def test_doubled_braces_are_literal_braces() -> None:
    assert render("{{from_amount}}", PARAMS, {}) == "{from_amount}"
    assert render("{{{interim_currency}}}", PARAMS, {}) == "{ETH}"
    assert render("}}{{", PARAMS, {}) == "}{"
    assert references("{{from_amount}} {{$.x.y}}") == []


def test_nested_config_is_walked() -> None:
    config = {
        "account": "{from_account}",
        "extra": {"memo": "rebalance {interim_currency}", "ids": ["{slices}", 7, None]},
    }
    assert render(config, PARAMS, {}) == {
        "account": "upbit-personal",
        "extra": {"memo": "rebalance ETH", "ids": [4, 7, None]},
    }
    assert [ref.text for ref in references(config)] == [
        "{from_account}",
        "{interim_currency}",
        "{slices}",
    ]


def test_references_tell_params_attributes_and_results_apart() -> None:
    found = references("{a} {b.interim_account} {$.Buy_It.refresh_result.result.amount}")
    assert found == [
        Reference("param", "a", "{a}"),
        Reference("attr", "b", "{b.interim_account}", attr="interim_account"),
        Reference(
            "result",
            "buy_it",
            "{$.Buy_It.refresh_result.result.amount}",
            path="refresh_result.result.amount",
        ),
    ]


@pytest.mark.parametrize(
    ("template", "complaint"),
    [
        ("{oops", "unmatched '{'"),
        ("oops}", "unmatched '}'"),
        ("{a b}", "bad template"),
        ("{}", "bad template"),
        ("{a.b.c}", "bad template"),
        ("{$.task}", "name a recorded field"),
        ("{$}", "bad result reference"),
        ("{$.task..x}", "bad result reference"),
    ],
)
def test_malformed_templates_are_refused(template: str, complaint: str) -> None:
    with pytest.raises(SpecError, match=complaint):
        references(template)


def test_non_strings_pass_through() -> None:
    assert render(Decimal("1.5"), PARAMS, {}) == Decimal("1.5")
    assert render(3, PARAMS, {}) == 3
    assert render(None, PARAMS, {}) is None


# --- coercion into the typed configs ----------------------------------------------------------

SPEC = spec_from_data(
    {
        "name": "coerce",
        "params": {
            "from_account": {"type": "account"},
            "interim_currency": {"type": "currency"},
            "from_currency": {"type": "currency"},
            "from_amount": {"type": "amount"},
        },
        "tasks": [
            {
                "name": "Buy_In_Source_Spot",
                "kind": "trade",
                "config": {
                    "account": "{from_account}",
                    "side": "buy",
                    "base_currency": "{interim_currency}",
                    "quote_currency": "{from_currency}",
                    "quote_amount": "{from_amount}",
                },
            },
            {
                "name": "withdraw",
                "kind": "withdraw",
                "config": {
                    "from_account": "{from_account}",
                    "to_account": "{from_account.interim_account}",
                    "currency": "{interim_currency}",
                    "amount": "{$.BUY_IN_SOURCE_SPOT.refresh_result.result.amount}",
                    "network": "ETH",
                },
            },
        ],
    }
)


def test_rendered_amounts_become_decimals_in_the_typed_config() -> None:
    trade = resolve_config(SPEC, 0, PARAMS, {})
    assert isinstance(trade, TradeConfig)
    assert trade.quote_amount == Decimal("1000000")
    results = {"buy_in_source_spot": {"refresh_result": {"result": {"amount": "0.2174"}}}}
    withdraw = resolve_config(SPEC, 1, PARAMS, results)
    assert withdraw == WithdrawConfig(
        from_account="upbit-personal",
        to_account="binance-personal",
        currency="ETH",
        amount=Decimal("0.2174"),
        network="ETH",
    )
    assert isinstance(withdraw.amount, Decimal)
    # a whole number recorded as an int is fine too
    whole = {"buy_in_source_spot": {"refresh_result": {"result": {"amount": 2}}}}
    assert resolve_config(SPEC, 1, PARAMS, whole).amount == Decimal(2)


@pytest.mark.parametrize(
    ("recorded", "complaint"),
    [
        (0.2174, "binary floats are not money"),
        ("-1", "greater than 0"),
        ("abc", "not a decimal number"),
        (None, "expected a decimal amount"),
    ],
)
def test_a_bad_recorded_value_names_the_task_and_field(recorded: object, complaint: str) -> None:
    results = {"buy_in_source_spot": {"refresh_result": {"result": {"amount": recorded}}}}
    with pytest.raises(SpecError, match=rf"task 'withdraw': amount: .*{complaint}") as caught:
        resolve_config(SPEC, 1, PARAMS, results)
    assert "{$.BUY_IN_SOURCE_SPOT.refresh_result.result.amount}" in str(caught.value)


def test_resolve_config_names_the_task_of_a_missing_result() -> None:
    with pytest.raises(SpecError, match=r"task 'withdraw': \{\$\.BUY_IN_SOURCE_SPOT"):
        resolve_config(SPEC, 1, PARAMS, {})
    with pytest.raises(SpecError, match="no task #5"):
        resolve_config(SPEC, 5, PARAMS, {})


def test_accounts_in_params_are_account_objects() -> None:
    assert isinstance(PARAMS["from_account"], Account)
