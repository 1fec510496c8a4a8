"""Live configuration: credentials only from env or files, never mixed with simulated accounts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rebalancer.accounts import load_accounts
from rebalancer.budgets import Budgets
from rebalancer.errors import SpecError
from rebalancer.exchanges.live import (
    LiveExchanges,
    exchange_mode,
    exchange_options,
    read_credentials,
)
from rebalancer.settings import Settings


def config(tmp_path: Path, accounts: dict[str, object], **extra: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"accounts": accounts, **extra}), encoding="utf-8")
    return path


LIVE = {"exchange": "upbit", "credentials": {"api_key_env": "UP_KEY", "secret_env": "UP_SECRET"}}


def test_a_key_written_in_the_configuration_is_refused_and_not_echoed(tmp_path: Path) -> None:
    path = config(tmp_path, {"u": {"exchange": "upbit",
                                   "credentials": {"api_key": "AKIA-REAL", "secret_env": "S"}}})
    with pytest.raises(SpecError, match="never written in the configuration") as caught:
        load_accounts(path)
    assert "AKIA-REAL" not in str(caught.value)


@pytest.mark.parametrize("credentials", [
    {"api_key_env": "K"},  # no secret
    {"api_key_env": "K", "api_key_file": "/k", "secret_env": "S"},  # two sources of one key
])
def test_each_of_key_and_secret_needs_exactly_one_source(tmp_path: Path,
                                                         credentials: dict[str, str]) -> None:
    path = config(tmp_path, {"u": {"exchange": "upbit", "credentials": credentials}})
    with pytest.raises(SpecError, match="exactly one of"):
        load_accounts(path)


def test_credentials_come_from_the_named_variables(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = load_accounts(config(tmp_path, {"u": LIVE}))
    monkeypatch.setenv("UP_KEY", " key-1 ")
    monkeypatch.setenv("UP_SECRET", "secret-1")
    credentials = read_credentials(accounts.get("u"))
    assert credentials.secrets() == ("key-1", "secret-1")
    assert "key-1" not in repr(credentials) and "secret-1" not in repr(credentials)


def test_an_unset_variable_is_named_without_any_value(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = load_accounts(config(tmp_path, {"u": LIVE}))
    monkeypatch.setenv("UP_KEY", "key-1")
    monkeypatch.delenv("UP_SECRET", raising=False)
    with pytest.raises(SpecError, match="secret_env UP_SECRET is not set") as caught:
        read_credentials(accounts.get("u"))
    assert "key-1" not in str(caught.value)


def test_a_secret_file_must_be_private_to_its_owner(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "upbit.secret"
    secret.write_text("secret-2\n", encoding="utf-8")
    secret.chmod(0o644)
    accounts = load_accounts(config(tmp_path, {"u": {"exchange": "upbit", "credentials": {
        "api_key_env": "UP_KEY", "secret_file": str(secret)}}}))
    monkeypatch.setenv("UP_KEY", "key-1")
    with pytest.raises(SpecError,
                       match=r"readable or writable by others \(mode 0644\); chmod 600"):
        read_credentials(accounts.get("u"))
    secret.chmod(0o600)
    assert read_credentials(accounts.get("u")).secret == "secret-2"
    (tmp_path / "gone").mkdir()
    secret.unlink()
    with pytest.raises(SpecError, match="cannot read secret_file"):
        read_credentials(accounts.get("u"))


def test_live_and_simulated_accounts_are_not_mixed(tmp_path: Path) -> None:
    accounts = load_accounts(config(tmp_path, {"u": LIVE, "b": {"exchange": "binance"}}))
    with pytest.raises(SpecError, match="b name no credentials: simulated and live"):
        exchange_mode(Settings(), accounts)
    # Explicitly simulated, the credentials are simply not read.
    assert exchange_mode(Settings(exchanges="simulated"), accounts) == "simulated"


def test_the_mode_defaults_to_live_exactly_when_credentials_are_configured(tmp_path: Path) -> None:
    assert exchange_mode(Settings(), load_accounts(config(tmp_path, {"u": LIVE}))) == "live"
    sim = load_accounts(config(tmp_path, {"u": {"exchange": "upbit"}}))
    assert exchange_mode(Settings(), sim) == "simulated"
    with pytest.raises(SpecError, match="u name no credentials"):
        exchange_mode(Settings(exchanges="live"), sim)


def test_exchange_options_are_checked(tmp_path: Path) -> None:
    assert exchange_options(config(tmp_path, {}, exchanges={"binance": {"testnet": True}})
                            )["binance"].testnet
    for bad, message in (({"kraken": {}}, "unknown exchange 'kraken'"),
                         ({"upbit": {"testnet": True}}, "Upbit has no testnet"),
                         ({"binance": {"timeout_seconds": 0}}, "timeout_seconds")):
        with pytest.raises(SpecError, match=message):
            exchange_options(config(tmp_path, {}, exchanges=bad))


# -- request budgets -------------------------------------------------------------------------


def budgets_config(tmp_path: Path, exchanges: object) -> Path:
    return config(tmp_path, {"u": {"exchange": "upbit"}}, exchanges=exchanges)


def test_budgets_default_to_each_exchanges_published_limits_with_a_margin(
        tmp_path: Path) -> None:
    budgets = Budgets.from_options("live", exchange_options(budgets_config(tmp_path, {})))
    rates = {b.name: (b.per_second, b.burst) for exchange, method in (
        ("upbit", "create_order"), ("upbit", "ticker_price"),
        ("binance", "create_order"), ("binance", "withdraw"))
        for b, _ in budgets.charges(exchange, "a", method)}
    # Upbit: default 30/s, order 12/s, quotation 10/s; Binance: weight 6,000/min, orders
    # 100/10 s, wallet 10/s: 75% of each as the rate, 20% as the burst.
    assert rates == {
        "upbit/a/order": (9, 2), "upbit/a/default": (22.5, 6), "upbit/quotation": (7.5, 2),
        "binance/a/orders": (7.5, 20), "binance/weight": (75, 1200),
        "binance/a/wallet": (7.5, 2)}


def test_configured_budgets_replace_the_defaults_bucket_by_bucket(tmp_path: Path) -> None:
    path = budgets_config(tmp_path, {
        "upbit": {"budgets": {"default": {"per_second": 10, "burst": 3},
                              "order": {"per_second": 4}}},
        "binance": {"budgets": {"orders": "unlimited"}},
        "simulated": {"budgets": {"requests": {"per_second": 50, "burst": 5}}},
    })
    live = Budgets.from_options("live", exchange_options(path))
    (order, _), (default, _) = live.charges("upbit", "u", "create_order")
    assert (default.per_second, default.burst) == (10, 3)
    assert (order.per_second, order.burst) == (4, 2)  # burst kept from the default
    orders, weight = (b for b, _ in live.charges("binance", "b", "create_order"))
    assert orders.lifted and not weight.lifted
    simulated = Budgets.from_options("simulated", exchange_options(path))
    (requests, _), = simulated.charges("upbit", "u", "withdraw")
    assert (requests.per_second, requests.burst) == (50, 5)


def test_a_whole_exchange_can_be_lifted_for_benchmarks(tmp_path: Path) -> None:
    path = budgets_config(tmp_path, {"binance": {"budgets": "unlimited"},
                                     "simulated": {"budgets": "unlimited"}})
    live = Budgets.from_options("live", exchange_options(path))
    assert all(b.lifted for m in ("create_order", "withdraw", "balance")
               for b, _ in live.charges("binance", "b", m))
    assert not any(b.lifted for b, _ in live.charges("upbit", "u", "create_order"))
    simulated = Budgets.from_options("simulated", exchange_options(path))
    assert simulated.charges("upbit", "u", "withdraw")[0][0].lifted


@pytest.mark.parametrize(("budgets", "message"), [
    ({"default": {"per_second": -3}}, "budgets.default.per_second: Value error, must be a"
                                      " positive number or `unlimited`"),
    ({"default": {"per_second": 0}}, "budgets.default.per_second"),
    ({"default": {"per_second": float("inf")}}, "budgets.default.per_second"),
    ({"default": {"per_second": "98765fast"}}, "budgets.default.per_second"),
    ({"default": {"per_second": True}}, "budgets.default.per_second"),
    ({"default": {"per_second": 5, "burst": -98765}}, "budgets.default.burst: Value error"),
    ({"default": {"per_second": 5, "speed": 98765}}, "budgets.default.speed"),
    ({"default": 98765}, "budgets.default"),
    ({"ordr": {"per_second": 98765}}, "exchanges.upbit.budgets.ordr: unknown budget (known:"
                                      " default, order, quotation)"),
])
def test_a_bad_budget_is_named_by_its_key_without_echoing_the_value(
        tmp_path: Path, budgets: object, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)) as caught:
        exchange_options(budgets_config(tmp_path, {"upbit": {"budgets": budgets}}))
    assert "98765" not in str(caught.value) and "exchanges.upbit" in str(caught.value)


def test_a_burst_below_the_heaviest_call_is_refused(tmp_path: Path) -> None:
    path = budgets_config(tmp_path, {"binance": {"budgets": {"weight": {"per_second": 50,
                                                                        "burst": 10}}}})
    with pytest.raises(SpecError, match=r"exchanges\.binance\.budgets\.weight\.burst: must be"
                                        r" at least 20"):
        exchange_options(path)


def test_the_simulated_section_takes_budgets_only(tmp_path: Path) -> None:
    path = budgets_config(tmp_path, {"simulated": {"testnet": True}})
    with pytest.raises(SpecError, match="only `budgets` applies to the simulated world"):
        exchange_options(path)


def test_budgets_follow_the_mode_the_settings_give(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = budgets_config(tmp_path, {"simulated": {"budgets": {"requests": {"per_second": 7}}}})
    budgets = Budgets.from_settings(Settings(config=path))
    assert budgets.mode == "simulated"
    assert budgets.charges("upbit", "u", "withdraw")[0][0].per_second == 7


@pytest.mark.parametrize(("paced", "ccxt_limits"), [(True, False), (False, True)])
def test_ccxt_paces_only_the_calls_no_budget_paces(tmp_path: Path, paced: bool,
                                                   ccxt_limits: bool) -> None:
    # Under the service every call takes from a request budget, and ccxt's fixed interval per
    # client would be a second, tighter limit; a one-off CLI call keeps ccxt's.
    accounts = load_accounts(config(tmp_path, {"u": {"exchange": "upbit"}}))
    exchanges = LiveExchanges(accounts, paced=paced)
    assert exchanges.connector("u").client.enableRateLimit is ccxt_limits
