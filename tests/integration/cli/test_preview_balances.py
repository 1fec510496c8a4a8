"""`rebalancer preview` and `balances` on the simulated world: the preview tells the outcome
and touches nothing real; balances read every wallet."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import psycopg
import pytest

from rebalancer.cli.main import main
from rebalancer.exchanges.simulated import SimulatedWorld

SEED_PATH = ["upbit_to_binance_sub_futures", "--param", "from_account=upbit-personal",
             "--param", "to_account=binance-corp-sub", "--param", "from_currency=KRW",
             "--param", "interim_currency=ETH", "--param", "to_currency=USDT"]


@pytest.fixture
def cli_env(database_url: str, owner_database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in ("REBALANCER_NATS_URL", "REBALANCER_EXCHANGES", "REBALANCER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REBALANCER_DATABASE_URL", database_url)
    # preview's throwaway database is made by the owner role (the service may not).
    monkeypatch.setenv("REBALANCER_MIGRATE_DATABASE_URL", owner_database_url)
    return database_url


async def world_state(url: str) -> tuple[dict[str, dict[str, Decimal]], int, int]:
    async with await SimulatedWorld.open(url) as world:
        balances = await world.balances()
        operations = len(await world.ledger())
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("select count(*) from events")
        row = await cur.fetchone()
    assert row is not None
    return balances, operations, row[0]


def preview_databases(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("select datname from pg_database"
                            " where datname like 'rebalancer_preview_%'").fetchall()
    return [r[0] for r in rows]


async def test_a_preview_of_the_seed_path_tells_the_result_and_touches_nothing_real(
    cli_env: str, capsys: pytest.CaptureFixture[str],
) -> None:
    before = await world_state(cli_env)
    code = await _main(["preview", *SEED_PATH, "--param", "from_amount=1000000", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["state"] == "done", report
    assert report["source"] == "a copy of the simulated world"
    assert Decimal(report["result"]["to_amount"]) > 600  # ~0.24 ETH at 2,900 USDT
    futures = [b for b in report["balances"] if b["account"] == "binance-corp-sub:futures"]
    assert futures and futures[0]["change"] == report["result"]["to_amount"]
    assert {f["exchange"] for f in report["fees"]} == {"upbit", "binance"}
    assert [t["state"] for t in report["tasks"]] == ["done"] * 8
    # The real world, its ledger and the event store are as they were; the throwaway is gone.
    assert await world_state(cli_env) == before
    assert preview_databases(cli_env) == []


async def test_a_preview_names_the_first_task_that_would_fail(
    cli_env: str, capsys: pytest.CaptureFixture[str],
) -> None:
    # 100,000 KRW buys ~0.025 ETH; Upbit's fee of 0.01 on top leaves less than its minimum.
    code = await _main(["preview", *SEED_PATH, "--param", "from_amount=100000"])
    out = capsys.readouterr().out
    assert code == 1
    assert "it would end failed" in out
    assert "first task to stop: withdraw_to_interim (withdraw) -> failed" in out
    assert "below the withdrawal minimum" in out


async def test_start_with_confirm_preview_starts_nothing_without_an_answer(
    cli_env: str, capsys: pytest.CaptureFixture[str],
) -> None:
    before = await world_state(cli_env)
    code = await _main(["start", *SEED_PATH, "--param", "from_amount=1000000",
                        "--confirm-preview"])
    captured = capsys.readouterr()
    assert code == 1
    assert "it would end done" in captured.out
    assert "needs a terminal to answer on, or --yes" in captured.err
    failing = await _main(["start", *SEED_PATH, "--param", "from_amount=100000",
                           "--confirm-preview", "--yes"])
    assert failing == 1
    assert "not started: the preview does not end done" in capsys.readouterr().err
    assert await world_state(cli_env) == before


async def test_balances_lists_every_wallet_of_every_account(
    cli_env: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert await _main(["balances", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    async with await SimulatedWorld.open(cli_env) as world:
        held = await world.balances()
    rows = {(b["account"], b["wallet"], b["currency"]): b for b in listed["balances"]}
    assert Decimal(rows[("upbit-personal", "spot", "KRW")]["total"]) == held["upbit-personal"][
        "KRW"]
    assert not any(a == "upbit-personal" and w == "futures" for a, w, _ in rows)
    assert listed["unreadable"] == []
    assert {a for a, _, _ in rows} <= {"upbit-personal", "binance-personal",
                                        "binance-corp-master", "binance-corp-sub"}
    assert await _main(["balances", "upbit-personal"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["account", "exchange", "wallet", "currency", "free",
                                            "total"]
    assert "binance" not in text


async def _main(argv: list[str]) -> int:
    """The CLI runs its own event loop: off this test's loop, in a thread."""
    return await asyncio.to_thread(main, argv)


SEED_FILE = "rebalancer/specs/builtin/upbit_to_binance_sub_futures.yaml"


@pytest.mark.parametrize(("amount", "code", "expected"), [
    ("1000000", 0, "the pre-flight on the simulated exchanges finds nothing to refuse"),
    ("100000", 2, "task 'withdraw_to_interim': about"),
    ("90000000000", 2, "task 'buy_in_source_spot': upbit-personal holds"),
])
async def test_specs_validate_with_params_walks_the_preflight(
    cli_env: str, capsys: pytest.CaptureFixture[str], amount: str, code: int, expected: str,
) -> None:
    before = await world_state(cli_env)
    params = [arg for arg in SEED_PATH[1:] if arg != SEED_PATH[0]]
    status = await _main(["specs", "validate", SEED_FILE, *params,
                          "--param", f"from_amount={amount}"])
    out, err = capsys.readouterr()
    assert status == code, (out, err)
    assert expected in (out if code == 0 else err)
    assert await world_state(cli_env) == before  # read-only: nothing moved, nothing appended
    status = await _main(["specs", "validate", SEED_FILE, *params,
                          "--param", f"from_amount={amount}", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == code and report["valid"] is (code == 0)
    assert report["preflight"]["exchanges"] == "simulated"
    assert bool(report["preflight"]["problems"]) is (code != 0)


async def test_specs_validate_with_a_bad_param_names_it_before_any_walk(
    cli_env: str, capsys: pytest.CaptureFixture[str],
) -> None:
    params = [arg for arg in SEED_PATH[1:] if arg != SEED_PATH[0]]
    status = await _main(["specs", "validate", SEED_FILE, *params, "--param", "from_amount=1e999"])
    err = capsys.readouterr().err
    assert status == 2 and "from_amount" in err and "Traceback" not in err
