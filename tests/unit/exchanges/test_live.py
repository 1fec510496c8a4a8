"""Live configuration: credentials only from env or files, never mixed with simulated accounts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rebalancer.accounts import load_accounts
from rebalancer.errors import SpecError
from rebalancer.exchanges.live import exchange_mode, exchange_options, read_credentials
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
    with pytest.raises(SpecError, match="readable by others; chmod 600"):
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
