"""The built-in spec, spec snapshots and loading of spec files."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from rebalancer.accounts import Accounts, load_accounts
from rebalancer.errors import SpecError
from rebalancer.machines import TaskKind
from rebalancer.specs import (
    BUILTIN_DIR,
    DepositConfig,
    InvalidSpecError,
    MasterTransferConfig,
    ParamSpec,
    TradeConfig,
    TransferConfig,
    TwapSpec,
    WithdrawConfig,
    WorkflowSpec,
    available_specs,
    builtin_specs,
    dump_params,
    list_specs,
    load_spec_file,
    load_specs,
    resolve_config,
    resolve_params,
    resolve_result,
    spec_from_data,
    task,
    twap_trade,
    validate_file,
    validate_spec,
    workflow,
)

SEED = "upbit_to_binance_sub_futures"
EXAMPLE_PARAMS = {
    "from_account": "upbit-personal",
    "to_account": "binance-corp-sub",
    "from_currency": "KRW",
    "interim_currency": "ETH",
    "to_currency": "USDT",
    "from_amount": "1000000",
}
# What each task of the built-in path records, as TaskStateChanged events store it (JSON strings).
EXAMPLE_RESULTS = {
    "buy_in_source_spot": {
        "refresh_result": {"extra": {"cumulative_amount_excluding_fee": "0.2174"}}
    },
    "withdraw_to_interim": {
        "refresh_result": {"result": {"txid": "9f2c", "amount": "0.2174", "received": "0.2164"}}
    },
    "await_deposit_interim": {"refresh_result": {"result": {"amount": "0.2164"}}},
    "withdraw_to_master": {
        "refresh_result": {"result": {"txid": "internal-41", "received": "0.2164"}}
    },
    "await_deposit_master": {"refresh_result": {"result": {"amount": "0.2164"}}},
    "master_to_sub": {"refresh_result": {"result": {"amount": "0.2164"}}},
    "sell_in_sub_spot": {
        "refresh_result": {"extra": {"cumulative_quote_received": "735.3121"}}
    },
    "sub_spot_to_futures": {"refresh_result": {"result": {"amount": "735.3121"}}},
}


@pytest.fixture(scope="module")
def accounts() -> Accounts:
    """The demo world's accounts from rebalancer/defaults/config.yaml."""
    return load_accounts()


@pytest.fixture(scope="module")
def seed() -> WorkflowSpec:
    """The built-in spec, loaded once."""
    return builtin_specs()[SEED]


def seed_in_python() -> WorkflowSpec:
    """The built-in spec written with the builders; must equal the YAML file."""
    return workflow(
        SEED,
        description=(
            "Buy the interim currency on the source account (TWAP), withdraw it to the source's"
            " interim account, then to the destination's master account, move it master -> sub,"
            " sell it there for the destination currency and move that from spot to futures."
        ),
        params={
            "from_account": ParamSpec(
                type="account", description="where the money starts, e.g. upbit-personal"
            ),
            "to_account": ParamSpec(
                type="account", description="a sub account with a master, e.g. binance-corp-sub"
            ),
            "from_currency": ParamSpec(
                type="currency", description="spent on the source, e.g. KRW"
            ),
            "interim_currency": ParamSpec(
                type="currency", description="what travels between exchanges, e.g. ETH"
            ),
            "to_currency": ParamSpec(
                type="currency", description="what lands in the sub's futures wallet, e.g. USDT"
            ),
            "from_amount": ParamSpec(type="amount", description="how much from_currency to spend"),
        },
        tasks=[
            twap_trade(
                "BUY_IN_SOURCE_SPOT",
                slices=4,
                interval_seconds=2,
                account="{from_account}",
                side="buy",
                order_type="market",
                base_currency="{interim_currency}",
                quote_currency="{from_currency}",
                quote_amount="{from_amount}",
            ),
            task(
                "withdraw_to_interim",
                TaskKind.WITHDRAW,
                from_account="{from_account}",
                to_account="{from_account.interim_account}",
                currency="{interim_currency}",
                amount="{$.buy_in_source_spot.refresh_result.extra.cumulative_amount_excluding_fee}",
                network="ETH",
            ),
            task(
                "await_deposit_interim",
                "deposit",
                account="{from_account.interim_account}",
                currency="{interim_currency}",
                from_account="{from_account}",
                txid="{$.withdraw_to_interim.refresh_result.result.txid}",
                amount="{$.withdraw_to_interim.refresh_result.result.received}",
            ),
            task(
                "withdraw_to_master",
                "withdraw",
                from_account="{from_account.interim_account}",
                to_account="{to_account.master_account}",
                currency="{interim_currency}",
                amount="{$.await_deposit_interim.refresh_result.result.amount}",
                network="ETH",
            ),
            task(
                "await_deposit_master",
                "deposit",
                account="{to_account.master_account}",
                currency="{interim_currency}",
                from_account="{from_account.interim_account}",
                txid="{$.withdraw_to_master.refresh_result.result.txid}",
                amount="{$.withdraw_to_master.refresh_result.result.received}",
            ),
            task(
                "master_to_sub",
                "master_transfer",
                master_account="{to_account.master_account}",
                from_account="{to_account.master_account}",
                to_account="{to_account}",
                currency="{interim_currency}",
                amount="{$.await_deposit_master.refresh_result.result.amount}",
                from_wallet="spot",
                to_wallet="spot",
            ),
            task(
                "sell_in_sub_spot",
                "trade",
                account="{to_account}",
                side="sell",
                order_type="market",
                base_currency="{interim_currency}",
                quote_currency="{to_currency}",
                amount="{$.master_to_sub.refresh_result.result.amount}",
            ),
            task(
                "sub_spot_to_futures",
                "transfer",
                account="{to_account}",
                currency="{to_currency}",
                amount="{$.sell_in_sub_spot.refresh_result.extra.cumulative_quote_received}",
                from_wallet="spot",
                to_wallet="futures",
            ),
        ],
        result={"to_amount": "{$.sub_spot_to_futures.refresh_result.result.amount}"},
    )


# --- the built-in spec -------------------------------------------------------------------------


def test_builtin_spec_validates_against_the_demo_accounts(
    seed: WorkflowSpec, accounts: Accounts
) -> None:
    validate_spec(seed, accounts)
    validate_file(BUILTIN_DIR / f"{SEED}.yaml", accounts)


def test_builtin_spec_follows_the_seed_path(seed: WorkflowSpec) -> None:
    assert [(t.name, t.kind) for t in seed.tasks] == [
        ("buy_in_source_spot", TaskKind.TRADE),
        ("withdraw_to_interim", TaskKind.WITHDRAW),
        ("await_deposit_interim", TaskKind.DEPOSIT),
        ("withdraw_to_master", TaskKind.WITHDRAW),
        ("await_deposit_master", TaskKind.DEPOSIT),
        ("master_to_sub", TaskKind.MASTER_TRANSFER),
        ("sell_in_sub_spot", TaskKind.TRADE),
        ("sub_spot_to_futures", TaskKind.TRANSFER),
    ]
    assert seed.tasks[0].twap == TwapSpec(slices=4, interval_seconds=2)
    assert all(t.twap is None for t in seed.tasks[1:])
    assert {name: p.type for name, p in seed.params.items()} == {
        "from_account": "account",
        "to_account": "account",
        "from_currency": "currency",
        "interim_currency": "currency",
        "to_currency": "currency",
        "from_amount": "amount",
    }


def test_builtin_spec_resolves_every_task_with_the_example_params(
    seed: WorkflowSpec, accounts: Accounts
) -> None:
    params = resolve_params(seed, EXAMPLE_PARAMS, accounts)
    assert params["from_account"] == accounts.get("upbit-personal")
    assert params["from_amount"] == Decimal("1000000")
    configs = [resolve_config(seed, i, params, EXAMPLE_RESULTS) for i in range(len(seed.tasks))]
    assert configs == [
        TradeConfig(
            account="upbit-personal",
            side="buy",
            order_type="market",
            base_currency="ETH",
            quote_currency="KRW",
            quote_amount=Decimal("1000000"),
        ),
        WithdrawConfig(
            from_account="upbit-personal",
            to_account="binance-personal",
            currency="ETH",
            amount=Decimal("0.2174"),
            network="ETH",
        ),
        DepositConfig(
            account="binance-personal",
            currency="ETH",
            txid="9f2c",
            amount=Decimal("0.2164"),
            from_account="upbit-personal",
        ),
        WithdrawConfig(
            from_account="binance-personal",
            to_account="binance-corp-master",
            currency="ETH",
            amount=Decimal("0.2164"),
            network="ETH",
        ),
        DepositConfig(
            account="binance-corp-master",
            currency="ETH",
            txid="internal-41",
            amount=Decimal("0.2164"),
            from_account="binance-personal",
        ),
        MasterTransferConfig(
            master_account="binance-corp-master",
            from_account="binance-corp-master",
            to_account="binance-corp-sub",
            currency="ETH",
            amount=Decimal("0.2164"),
        ),
        TradeConfig(
            account="binance-corp-sub",
            side="sell",
            base_currency="ETH",
            quote_currency="USDT",
            amount=Decimal("0.2164"),
        ),
        TransferConfig(
            account="binance-corp-sub",
            currency="USDT",
            amount=Decimal("735.3121"),
            from_wallet="spot",
            to_wallet="futures",
        ),
    ]
    # every amount a processor receives is a Decimal, never a float
    assert all(isinstance(c.amount, Decimal) for c in configs[1:])
    assert resolve_result(seed, params, EXAMPLE_RESULTS) == {"to_amount": "735.3121"}


def test_builtin_first_task_resolves_before_anything_is_recorded(
    seed: WorkflowSpec, accounts: Accounts
) -> None:
    params = resolve_params(seed, EXAMPLE_PARAMS, accounts)
    assert isinstance(resolve_config(seed, 0, params, {}), TradeConfig)
    # the second task needs the first task's results
    with pytest.raises(SpecError, match=r"withdraw_to_interim.*buy_in_source_spot.*recorded"):
        resolve_config(seed, 1, params, {})


def test_builtin_params_refuse_a_source_account_without_an_interim_account(
    seed: WorkflowSpec, accounts: Accounts
) -> None:
    raw = {**EXAMPLE_PARAMS, "from_account": "binance-corp-sub"}
    with pytest.raises(InvalidSpecError) as caught:
        resolve_params(seed, raw, accounts)
    message = str(caught.value)
    assert "task 'withdraw_to_interim'" in message
    assert "{from_account.interim_account}" in message
    assert "'binance-corp-sub' has no interim_account" in message


def test_builtin_params_refuse_a_destination_account_without_a_master(
    seed: WorkflowSpec, accounts: Accounts
) -> None:
    raw = {**EXAMPLE_PARAMS, "to_account": "binance-personal"}
    with pytest.raises(InvalidSpecError, match=r"master.*\{to_account.master_account\}"):
        resolve_params(seed, raw, accounts)


def test_builtin_yaml_equals_the_python_builders(seed: WorkflowSpec) -> None:
    assert seed_in_python() == seed


def test_builtin_spec_moves_what_the_sell_received_not_the_deprecated_alias() -> None:
    text = (Path(load_spec_file.__code__.co_filename).parent / "builtin" / f"{SEED}.yaml")
    yaml_text = text.read_text(encoding="utf-8")
    assert "extra.cumulative_quote_received}" in yaml_text
    assert "cumulative_cost_excluding_fee" not in yaml_text


def test_a_spec_still_on_the_deprecated_alias_validates(accounts: Accounts) -> None:
    data = seed_in_python().model_dump(mode="json")
    last = data["tasks"][-1]["config"]
    last["amount"] = "{$.sell_in_sub_spot.refresh_result.extra.cumulative_cost_excluding_fee}"
    validate_spec(spec_from_data(data), accounts)


def test_builtin_specs_are_listed() -> None:
    assert (SEED, builtin_specs()[SEED].description, 8) in list_specs()
    assert SEED in available_specs()


# --- snapshots ---------------------------------------------------------------------------------


def test_spec_survives_the_json_snapshot_of_workflow_created(seed: WorkflowSpec) -> None:
    stored = json.loads(json.dumps(seed.model_dump(mode="json")))
    assert spec_from_data(stored) == seed


def test_spec_with_decimal_literals_survives_the_snapshot() -> None:
    spec = workflow(
        "literal",
        params={"account": "account"},
        tasks=[
            task(
                "top_up",
                "transfer",
                account="{account}",
                currency="USDT",
                amount=Decimal("12.50"),
                from_wallet="spot",
                to_wallet="futures",
            )
        ],
    )
    stored = json.loads(json.dumps(spec.model_dump(mode="json")))
    assert stored["tasks"][0]["config"]["amount"] == "12.50"
    assert spec_from_data(stored) == spec


def test_params_dump_as_json_and_resolve_again(seed: WorkflowSpec, accounts: Accounts) -> None:
    params = resolve_params(seed, EXAMPLE_PARAMS, accounts)
    dumped = dump_params(params)
    assert dumped == EXAMPLE_PARAMS
    assert resolve_params(seed, json.loads(json.dumps(dumped)), accounts) == params


# --- loading -----------------------------------------------------------------------------------

SMALL = """
name: small
params:
  account: {type: account}
tasks:
  - name: TO_FUTURES
    kind: transfer
    config:
      account: "{account}"
      currency: USDT
      amount: "10"
      from_wallet: spot
      to_wallet: futures
  - name: back
    kind: transfer
    config:
      account: "{account}"
      currency: USDT
      amount: "{$.To_Futures.refresh_result.result.amount}"
      from_wallet: futures
      to_wallet: spot
"""


def test_yaml_task_names_are_stored_lower_case(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    spec = load_spec_file(path)
    assert [t.name for t in spec.tasks] == ["to_futures", "back"]


def test_yaml_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(SMALL.replace("currency: USDT\n", "currency: USDT\n      currency: ETH\n", 1))
    with pytest.raises(SpecError, match=r"twice\.yaml: line \d+, column \d+: duplicate key 'curr"):
        load_spec_file(path)


def test_spec_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(SMALL.replace("kind: transfer", "kind: teleport", 1))
    with pytest.raises(InvalidSpecError, match=r"bad\.yaml: 1 problem") as caught:
        load_spec_file(path)
    assert caught.value.problems == (
        "task 'to_futures': kind: unknown kind 'teleport'"
        " (kinds: trade, withdraw, deposit, transfer, master_transfer)",
    )
    with pytest.raises(SpecError, match=r"missing\.yaml: cannot read"):
        load_spec_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match=r"(?s)list\.yaml.*a spec is a mapping"):
        load_spec_file(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken\.yaml: line 2"):
        load_spec_file(tmp_path / "broken.yaml")


def test_validate_file_checks_literal_accounts(tmp_path: Path, accounts: Accounts) -> None:
    path = tmp_path / "literal.yaml"
    path.write_text(SMALL.replace('"{account}"', "binance-corp-nobody", 1))
    load_spec_file(path)  # without accounts only the shape and references are checked
    with pytest.raises(InvalidSpecError) as caught:
        validate_file(path, accounts)
    assert caught.value.problems == (
        "task 'to_futures': account: unknown account 'binance-corp-nobody'",
    )


def test_load_specs_reads_yaml_and_yml_and_refuses_a_name_twice(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SMALL)
    (tmp_path / "b.yml").write_text(SMALL.replace("name: small", "name: other", 1))
    (tmp_path / "notes.txt").write_text("not a spec")
    assert sorted(load_specs([tmp_path])) == ["other", "small"]
    assert [row[0] for row in list_specs([tmp_path])] == ["other", "small", SEED]
    (tmp_path / "c.yaml").write_text(SMALL)
    with pytest.raises(SpecError, match=r"c\.yaml: spec 'small' is already defined in .*a\.yaml"):
        load_specs([tmp_path])


def test_load_specs_reports_every_bad_file_and_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SMALL.replace("kind: transfer", "kind: nope", 1))
    (tmp_path / "b.yaml").write_text("name: [\n")
    with pytest.raises(InvalidSpecError) as caught:
        load_specs([tmp_path, tmp_path / "absent"])
    problems = caught.value.problems
    assert len(problems) == 3
    assert "a.yaml: task 'to_futures': kind: unknown kind 'nope'" in problems[0]
    assert "b.yaml: line" in problems[1]
    assert problems[2].endswith("absent: not a directory")
