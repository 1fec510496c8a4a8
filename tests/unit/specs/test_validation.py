"""Static validation of specs, param resolution, typed configs, the recorded-field contract."""

from __future__ import annotations

import copy
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from rebalancer.accounts import Accounts, load_accounts
from rebalancer.errors import SpecError
from rebalancer.machines import TaskKind
from rebalancer.specs import (
    RECORDED_FIELDS,
    InvalidSpecError,
    MasterTransferConfig,
    TaskSpec,
    TradeConfig,
    TransferConfig,
    WorkflowSpec,
    resolve_params,
    result_path_ok,
    spec_from_data,
    validate_spec,
)
from rebalancer.specs.models import DepositConfig, WithdrawConfig

ACCOUNTS: Accounts = load_accounts()

Data = dict[str, Any]


def base() -> Data:
    """A small valid spec as plain data: buy, withdraw, await the deposit."""
    return {
        "name": "base",
        "params": {
            "src": {"type": "account"},
            "coin": {"type": "currency"},
            "fiat": {"type": "currency"},
            "budget": {"type": "amount"},
            "memo": {"type": "string"},
            "slices": {"type": "int"},
        },
        "tasks": [
            {
                "name": "BUY",
                "kind": "trade",
                "twap": {"slices": 2, "interval_seconds": 1},
                "config": {
                    "account": "{src}",
                    "side": "buy",
                    "base_currency": "{coin}",
                    "quote_currency": "{fiat}",
                    "quote_amount": "{budget}",
                },
            },
            {
                "name": "send",
                "kind": "withdraw",
                "config": {
                    "from_account": "{src}",
                    "to_account": "{src.interim_account}",
                    "currency": "{coin}",
                    "amount": "{$.buy.refresh_result.extra.cumulative_amount_excluding_fee}",
                    "network": "ETH",
                },
            },
            {
                "name": "arrive",
                "kind": "deposit",
                "config": {
                    "account": "{src.interim_account}",
                    "currency": "{coin}",
                    "txid": "{$.Send.refresh_result.result.txid}",
                },
            },
        ],
        "result": {"received": "{$.arrive.refresh_result.result.amount}"},
    }


def test_the_base_spec_is_valid() -> None:
    spec = spec_from_data(base(), ACCOUNTS)
    assert [t.name for t in spec.tasks] == ["buy", "send", "arrive"]


def _config(task: int, key: str, value: Any) -> Callable[[Data], None]:
    def change(data: Data) -> None:
        data["tasks"][task]["config"][key] = value

    return change


def _task(task: int, key: str, value: Any) -> Callable[[Data], None]:
    def change(data: Data) -> None:
        data["tasks"][task][key] = value

    return change


def _result(value: str) -> Callable[[Data], None]:
    def change(data: Data) -> None:
        data["result"]["received"] = value

    return change


# Each bad spec: the change to `base()` and what the one problem line must say.
BAD_SPECS: dict[str, tuple[Callable[[Data], None], list[str]]] = {
    "unknown param": (
        _config(1, "currency", "{token}"),
        ["task 'send': currency: {token}: unknown param 'token'"],
    ),
    "attribute accounts lack": (
        _config(1, "to_account", "{src.interim}"),
        ["task 'send': to_account: {src.interim}: accounts have no attribute 'interim'"],
    ),
    "attribute of a non-account": (
        _config(1, "to_account", "{coin.interim_account}"),
        ["task 'send': to_account: {coin.interim_account}: param 'coin' is of type currency"],
    ),
    "unknown task": (
        _config(2, "txid", "{$.sent.refresh_result.result.txid}"),
        ["task 'arrive': txid: {$.sent.refresh_result.result.txid}: unknown task 'sent'"],
    ),
    "own results": (
        _config(2, "txid", "{$.ARRIVE.refresh_result.result.txid}"),
        ["task 'arrive': txid: {$.ARRIVE.refresh_result.result.txid}: a task cannot use its own"],
    ),
    "later task": (
        _config(1, "amount", "{$.arrive.refresh_result.result.amount}"),
        [
            "task 'send': amount: {$.arrive.refresh_result.result.amount}: task 'arrive' (#3)"
            " comes later"
        ],
    ),
    "unrecorded path": (
        _config(2, "txid", "{$.send.refresh_result.result.hash}"),
        [
            "task 'arrive': txid: {$.send.refresh_result.result.hash}: a withdraw task never"
            " records 'refresh_result.result.hash'"
        ],
    ),
    "path a deposit does not record": (
        _result("{$.arrive.request_result.id}"),
        ["result 'received': {$.arrive.request_result.id}: a deposit task never records"],
    ),
    "unknown kind": (
        _task(2, "kind", "teleport"),
        ["task 'arrive': kind: unknown kind 'teleport' (kinds: trade, withdraw, deposit,"],
    ),
    "unknown config key": (
        _config(1, "memo", "hi"),
        ["task 'send': unknown config key 'memo' for a withdraw task"],
    ),
    "missing config key": (
        lambda data: data["tasks"][1]["config"].pop("network"),
        ["task 'send': missing config key 'network'"],
    ),
    "duplicate name": (
        lambda data: data["tasks"].append({**data["tasks"][2], "name": "Arrive"}),
        ["task 'arrive' (#4): duplicate task name (task #3 has it)"],
    ),
    "twap on a non-trade task": (
        _task(1, "twap", {"slices": 2, "interval_seconds": 1}),
        ["task 'send': twap is only for trade tasks, not withdraw"],
    ),
    "bad task name": (
        _task(1, "name", "send-it"),
        [
            "task 'send-it': name: task name 'send-it' must be a snake_case identifier",
            # and the reference to the task under its old name no longer resolves
            "task 'arrive': txid: {$.Send.refresh_result.result.txid}: unknown task 'send'",
        ],
    ),
    "float literal": (
        _config(1, "amount", 0.1),
        ["task 'send': amount: binary floats are not money"],
    ),
    "zero literal": (
        _config(1, "amount", "0"),
        ["task 'send': amount: amount must be greater than 0"],
    ),
    "literal of the wrong type": (
        _config(0, "side", "hold"),
        ["task 'buy': side: Input should be 'buy' or 'sell'"],
    ),
    "lower-case literal currency": (
        _config(2, "currency", "eth"),
        ["task 'arrive': currency: String should match pattern"],
    ),
    "unquoted YAML template": (
        _config(1, "currency", {"coin": None}),
        ['task \'send\': currency: Input should be a valid string (an unquoted template? in YAML'
         ' write "{coin}")'],
    ),
    "malformed template": (
        _config(1, "currency", "{coin"),
        ["task 'send': currency: '{coin': unmatched '{' at position 0"],
    ),
    "both amounts of a trade": (
        _config(0, "amount", "1"),
        ["task 'buy': give exactly one of amount, quote_amount (given: ['amount', 'quote_amo"],
    ),
    "price on a market order": (
        _config(0, "price", "5000"),
        ["task 'buy': price is only for limit orders"],
    ),
    "limit order without a price": (
        _config(0, "order_type", "limit"),
        ["task 'buy': a limit order needs a price"],
    ),
    "deposit with nothing to match": (
        lambda data: data["tasks"][2]["config"].pop("txid"),
        ["task 'arrive': a deposit needs a txid or an amount"],
    ),
    "result to an unknown task": (
        _result("{$.nowhere.refresh_result.result.amount}"),
        ["result 'received': {$.nowhere.refresh_result.result.amount}: unknown task 'nowhere'"],
    ),
    "result with an unknown param": (
        _result("{total}"),
        ["result 'received': {total}: unknown param 'total'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_each_bad_spec_is_refused_naming_the_task_and_the_reference(case: str) -> None:
    change, expected = BAD_SPECS[case]
    data = copy.deepcopy(base())
    change(data)
    with pytest.raises(InvalidSpecError) as caught:
        spec_from_data(data)
    problems = caught.value.problems
    assert len(problems) == len(expected), problems
    for line, fragment in zip(problems, expected, strict=True):
        assert line.startswith(fragment), (line, fragment)
    # the message lists every problem, one per line, under a heading naming the spec
    assert str(caught.value).splitlines()[1:] == [f"  {line}" for line in problems]
    assert str(caught.value).startswith("spec 'base': ")


def test_every_problem_is_reported_at_once() -> None:
    data = base()
    data["tasks"][0]["kind"] = "swap"  # a shape error does not hide the reference errors
    data["tasks"][1]["config"]["currency"] = "{token}"
    data["tasks"][1]["config"]["colour"] = "red"
    data["tasks"][2]["config"]["txid"] = "{$.arrive.refresh_result.result.txid}"
    data["result"]["received"] = "{$.nowhere.x}"
    with pytest.raises(InvalidSpecError) as caught:
        spec_from_data(data)
    assert len(caught.value.problems) == 5
    assert str(caught.value).startswith("spec 'base': 5 problems\n  task 'buy': kind: unknown kind")


def test_literal_account_ids_are_checked_when_accounts_are_given() -> None:
    data = base()
    data["tasks"][1]["config"]["to_account"] = "binance-nobody"
    spec = spec_from_data(data)  # no accounts: not checked
    with pytest.raises(InvalidSpecError) as caught:
        validate_spec(spec, ACCOUNTS)
    assert caught.value.problems == ("task 'send': to_account: unknown account 'binance-nobody'",)


def test_validate_spec_checks_a_spec_built_without_validation() -> None:
    spec = WorkflowSpec(
        name="raw",
        tasks=[TaskSpec(name="only", kind=TaskKind.DEPOSIT, config={"account": "{who}"})],
    )
    with pytest.raises(InvalidSpecError) as caught:
        validate_spec(spec)
    assert caught.value.problems == (
        "task 'only': account: {who}: unknown param 'who' (declared: none)",
        "task 'only': missing config key 'currency'",
        "task 'only': a deposit needs a txid or an amount to recognise it",
    )


def test_the_model_refuses_duplicate_names_and_twap_off_trades() -> None:
    deposit = TaskSpec(name="wait", kind=TaskKind.DEPOSIT)
    with pytest.raises(ValueError, match="duplicate task name"):
        WorkflowSpec(name="twice", tasks=[deposit, deposit])
    with pytest.raises(ValueError, match="twap is only for trade tasks"):
        TaskSpec(name="w", kind=TaskKind.WITHDRAW, twap={"slices": 2, "interval_seconds": 0})
    with pytest.raises(ValueError, match="at least 1"):
        WorkflowSpec(name="empty", tasks=[])


# --- params ------------------------------------------------------------------------------------

GOOD_PARAMS: dict[str, str | Decimal | int] = {
    "src": "upbit-personal",
    "coin": "ETH",
    "fiat": "KRW",
    "budget": "1000000",
    "memo": "monthly",
    "slices": 4,
}
SPEC = spec_from_data(base())


def test_params_resolve_to_typed_values() -> None:
    params = resolve_params(SPEC, GOOD_PARAMS, ACCOUNTS)
    assert params == {
        "src": ACCOUNTS.get("upbit-personal"),
        "coin": "ETH",
        "fiat": "KRW",
        "budget": Decimal("1000000"),
        "memo": "monthly",
        "slices": 4,
    }
    with pytest.raises(TypeError):
        params["coin"] = "BTC"  # type: ignore[index]


@pytest.mark.parametrize("budget", [Decimal("0.5"), 3, "12.5"])
def test_amount_params_take_decimals_ints_and_decimal_strings(budget: Decimal | int | str) -> None:
    params = resolve_params(SPEC, {**GOOD_PARAMS, "budget": budget}, ACCOUNTS)
    assert params["budget"] == Decimal(str(budget).strip())
    assert isinstance(params["budget"], Decimal)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"budget": 0.5}, "param 'budget': binary floats are not money"),
        ({"budget": "-3"}, "param 'budget': amount must be greater than 0"),
        ({"budget": "0"}, "param 'budget': amount must be greater than 0"),
        ({"budget": 0}, "param 'budget': amount must be greater than 0"),
        ({"budget": "NaN"}, "param 'budget': amount must be finite"),
        ({"budget": "inf"}, "param 'budget': amount must be finite"),
        ({"budget": "1,000"}, "param 'budget': not a decimal number"),
        ({"budget": True}, "param 'budget': expected a decimal amount"),
        ({"src": "kraken-personal"}, "param 'src': unknown account 'kraken-personal'"),
        ({"coin": "eth"}, "param 'coin': a currency is upper-case letters and digits"),
        ({"coin": 5}, "param 'coin': expected a string"),
        ({"slices": "four"}, "param 'slices': expected a whole number"),
        ({"slices": 2.0}, "param 'slices': expected a whole number"),
        ({"fee": "1"}, "param 'fee': unknown (declared: src, coin, fiat, budget, memo, slices)"),
    ],
)
def test_bad_params_are_refused(change: dict[str, Any], complaint: str) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        resolve_params(SPEC, {**GOOD_PARAMS, **change}, ACCOUNTS)
    assert caught.value.problems == (complaint,) or caught.value.problems[0].startswith(complaint)
    assert len(caught.value.problems) == 1


def test_missing_params_are_all_named() -> None:
    raw = {k: v for k, v in GOOD_PARAMS.items() if k not in ("coin", "budget")}
    with pytest.raises(InvalidSpecError) as caught:
        resolve_params(SPEC, raw, ACCOUNTS)
    assert caught.value.problems == ("param 'coin': missing", "param 'budget': missing")


def test_an_account_without_the_referenced_link_is_refused_before_start() -> None:
    with pytest.raises(InvalidSpecError) as caught:
        resolve_params(SPEC, {**GOOD_PARAMS, "src": "binance-corp-sub"}, ACCOUNTS)
    assert caught.value.problems == (
        "task 'send': to_account: {src.interim_account}: account 'binance-corp-sub' has no"
        " interim_account configured",
        "task 'arrive': account: {src.interim_account}: account 'binance-corp-sub' has no"
        " interim_account configured",
    )


def test_param_values_of_the_wrong_kind_for_a_field_are_refused_before_start() -> None:
    data = base()
    data["tasks"][1]["config"]["network"] = "{memo}"
    spec = spec_from_data(data)
    with pytest.raises(InvalidSpecError) as caught:
        resolve_params(spec, {**GOOD_PARAMS, "memo": "two words"}, ACCOUNTS)
    assert caught.value.problems[0].startswith("task 'send': network: String should match")
    assert "('{memo}' is 'two words')" in caught.value.problems[0]


# --- typed configs -----------------------------------------------------------------------------


def test_configs_accept_decimal_int_and_str_amounts_and_refuse_floats() -> None:
    fields = {"account": "a", "currency": "USDT", "from_wallet": "spot", "to_wallet": "futures"}
    for amount in (Decimal("1.5"), 2, "2.5"):
        transfer = TransferConfig(**fields, amount=amount)
        assert transfer.amount == Decimal(str(amount))
    with pytest.raises(ValueError, match="binary floats are not money"):
        TransferConfig(**fields, amount=1.5)
    with pytest.raises(ValueError, match="from_wallet and to_wallet are both"):
        TransferConfig(**{**fields, "to_wallet": "spot"}, amount=1)


def test_trade_config_rules() -> None:
    fields = {"account": "a", "side": "buy", "base_currency": "ETH", "quote_currency": "KRW"}
    with pytest.raises(ValueError, match="exactly one of amount, quote_amount"):
        TradeConfig(**fields)
    with pytest.raises(ValueError, match="a limit order needs a price"):
        TradeConfig(**fields, order_type="limit", amount="1")
    limit = TradeConfig(**fields, order_type="limit", amount="1", price="4000000")
    assert limit.price == Decimal("4000000")
    with pytest.raises(ValueError, match="base_currency and quote_currency are both"):
        TradeConfig(**{**fields, "quote_currency": "ETH"}, amount="1")


def test_transfer_configs_default_to_spot_wallets() -> None:
    config = MasterTransferConfig(
        master_account="m", from_account="m", to_account="s", currency="ETH", amount="1"
    )
    assert (config.from_wallet, config.to_wallet) == ("spot", "spot")
    with pytest.raises(ValueError, match="from_account and to_account are both"):
        WithdrawConfig(from_account="a", to_account="a", currency="ETH", amount=1, network="ETH")
    assert DepositConfig(account="a", currency="ETH", amount="1").txid is None


# --- the recorded-field contract ---------------------------------------------------------------


def _paths(prefix: str, names: str) -> set[str]:
    return {f"{prefix}.{name}" for name in names.split()}


def test_recorded_fields_are_the_contract_with_the_processors() -> None:
    common = {"request_params.client_id"}
    transfer = _paths("request_result", "id") | _paths("refresh_result.result", "id amount status")
    expected = {
        TaskKind.TRADE: _paths(
            "request_params",
            "account side order_type base_currency quote_currency amount quote_amount price",
        )
        | _paths("request_result", "order_id")
        | _paths(
            "refresh_result.result", "amount cost fee fee_currency average_price filled status"
        )
        | _paths(
            "refresh_result.extra",
            "cumulative_amount cumulative_amount_excluding_fee cumulative_cost"
            " cumulative_quote_spent cumulative_quote_received cumulative_cost_excluding_fee"
            " cumulative_fee fees status amount_unit amount_currency planned_amount filled_amount"
            " unfilled_amount filled_fraction remainders",
        ),
        TaskKind.WITHDRAW: _paths(
            "request_params", "from_account to_account currency amount network tag"
        )
        | _paths("request_result", "id")
        | _paths("refresh_result.result", "txid amount fee received network address status")
        | _paths("refresh_result.extra", "status remainders"),
        TaskKind.DEPOSIT: _paths("request_params", "account currency txid amount from_account")
        | _paths("refresh_result.result", "txid amount status internal"),
        TaskKind.TRANSFER: _paths(
            "request_params", "account currency amount from_wallet to_wallet"
        )
        | transfer,
        TaskKind.MASTER_TRANSFER: _paths(
            "request_params",
            "master_account from_account to_account currency amount from_wallet to_wallet",
        )
        | transfer,
    }
    assert {kind: set(paths) for kind, paths in RECORDED_FIELDS.items()} == {
        kind: paths | common for kind, paths in expected.items()
    }


def test_result_path_ok() -> None:
    assert result_path_ok(TaskKind.WITHDRAW, "refresh_result.result.txid")
    assert result_path_ok("trade", "request_params.client_id")
    assert not result_path_ok("deposit", "request_result.id")
    assert not result_path_ok("trade", "refresh_result.result")
    assert not result_path_ok("swap", "request_result.id")


def test_spec_errors_are_spec_errors() -> None:
    assert issubclass(InvalidSpecError, SpecError)


def test_escaped_braces_in_a_literal_are_checked_unescaped() -> None:
    data = base()
    data["tasks"][1]["config"]["tag"] = "{{memo}}"
    spec = spec_from_data(data)
    assert spec.tasks[1].config["tag"] == "{{memo}}"
    data["tasks"][1]["config"]["amount"] = "{{1}}"
    with pytest.raises(InvalidSpecError, match=r"'send': amount: not a decimal number: '\{1\}'"):
        spec_from_data(data)
