"""`balances`, `preview` and `start` on live accounts: the real configuration path (credentials
read from the variables it names) and the connectors, on the fake venues."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from rebalancer.cli.main import main
from rebalancer.exchanges.live import LiveExchanges
from tests.support.venues.live_world import LiveWorld, live_world

SEED_PATH = ["upbit_to_binance_sub_futures", "--param", "from_account=upbit-personal",
             "--param", "to_account=binance-corp-sub", "--param", "from_currency=KRW",
             "--param", "interim_currency=ETH", "--param", "to_currency=USDT"]


@pytest.fixture
def world(tmp_path: Path, database_url: str, owner_database_url: str,
          monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[LiveWorld]:
    arranged = live_world()
    for name, value in arranged.environment().items():
        monkeypatch.setenv(name, value)
    for name in ("REBALANCER_NATS_URL", "REBALANCER_EXCHANGES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REBALANCER_CONFIG", str(arranged.config_file(tmp_path)))
    monkeypatch.setenv("REBALANCER_DATABASE_URL", database_url)
    # preview's throwaway database is made by the owner role (the service may not).
    monkeypatch.setenv("REBALANCER_MIGRATE_DATABASE_URL", owner_database_url)
    configured = LiveExchanges.from_config.__func__  # type: ignore[attr-defined]

    def through_fakes(cls: type[LiveExchanges], *args: Any, **kwargs: Any) -> LiveExchanges:
        # The configured path (credentials from the environment), its HTTP layer on the fakes.
        return configured(cls, *args, prepare=arranged.prepare, **kwargs)

    monkeypatch.setattr(LiveExchanges, "from_config", classmethod(through_fakes))
    yield arranged


async def cli(argv: list[str]) -> int:
    return await asyncio.to_thread(main, argv)


async def test_balances_reads_every_wallet_with_read_only_calls(
    world: LiveWorld, capsys: pytest.CaptureFixture[str],
) -> None:
    world.binance.fund("binance-corp-sub", "USDT", Decimal("12.5"), futures=True)
    assert await cli(["balances", "--json"]) == 0
    out = capsys.readouterr().out
    listed = json.loads(out)
    rows = {(b["account"], b["wallet"], b["currency"]): b for b in listed["balances"]}
    assert rows[("upbit-personal", "spot", "KRW")]["free"] == "10000000"
    assert rows[("binance-corp-sub", "futures", "USDT")]["total"] == "12.5"
    assert listed["unreadable"] == []
    sent = [r for wire in world.wires.values() for r in wire.sent]
    assert sent and all(r.method == "GET" for r in sent)
    for secret in world.secrets() + sorted(world.signatures()):
        assert secret not in out


async def test_an_account_the_exchange_refuses_is_reported_and_exits_1(
    world: LiveWorld, capsys: pytest.CaptureFixture[str],
) -> None:
    world.binance.holders["binance-corp-master"].secret = "rotated-on-the-exchange"
    assert await cli(["balances"]) == 1
    captured = capsys.readouterr()
    assert "binance-corp-master (binance):" in captured.err
    assert "upbit-personal" in captured.out  # the other accounts are still shown
    for secret in world.secrets():
        assert secret not in captured.err + captured.out


async def test_a_preview_on_live_accounts_reads_only_and_predicts_the_path(
    world: LiveWorld, capsys: pytest.CaptureFixture[str],
) -> None:
    code = await cli(["preview", *SEED_PATH, "--param", "from_amount=1000000", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["source"] == "the live exchanges" and report["state"] == "done"
    # ~0.2314 ETH bought at 4,321,000, withdrawn twice, sold at 2,000 USDT.
    assert Decimal(400) < Decimal(report["result"]["to_amount"]) < Decimal(462)
    assert {f["exchange"] for f in report["fees"]} == {"upbit", "binance"}
    sent = [r for wire in world.wires.values() for r in wire.sent]
    assert sent and all(r.method == "GET" for r in sent), {(r.method, r.path) for r in sent}
    assert world.upbit.free("upbit-personal", "KRW") == Decimal(10_000_000)


async def test_a_live_start_prints_the_preview_and_refuses_one_that_would_fail(
    world: LiveWorld, capsys: pytest.CaptureFixture[str],
) -> None:
    # 100,000 KRW buys less ETH than Upbit's minimum withdrawal plus its fee.
    code = await cli(["start", *SEED_PATH, "--param", "from_amount=100000"])
    captured = capsys.readouterr()
    assert code == 1
    assert "on the live exchanges: it would end failed" in captured.out
    assert "first task to stop: withdraw_to_interim" in captured.out
    assert "not started: the preview does not end done" in captured.err
    assert all(r.method == "GET" for wire in world.wires.values() for r in wire.sent)


async def test_a_missing_credential_stops_the_command_naming_the_variable(
    world: LiveWorld, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RB_TEST_BINANCE_CORP_SUB_SECRET")
    assert await cli(["balances"]) == 2
    err = capsys.readouterr().err
    assert "binance-corp-sub: secret_env RB_TEST_BINANCE_CORP_SUB_SECRET is not set" in err
    assert world.wires == {}  # nothing was called
