"""Where the money is: `status ID [--json]` carries the spec's result, fills, the effective rate,
fees and remainders; `exposure [--json]` shows what is in transit and what was left behind, as
the simulated world has it. The seed workflow runs on the simulated world, the CLI reads the
read models the projections wrote."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import load_accounts
from rebalancer.api import Api
from rebalancer.cli.main import main
from rebalancer.commands import start_workflow
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.resolution import resolve_params, resolve_result
from tests.support.waiting import eventually
from tests.support.worker import SEED_PARAMS, SEED_SPEC, Worker, load, write_world

D = Decimal
FEE_ACCOUNTS = ("upbit-fees", "binance-fees")
AMOUNT = "1234567"


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in ("REBALANCER_NATS_URL", "REBALANCER_EXCHANGES", "REBALANCER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REBALANCER_DATABASE_URL", database_url)
    return database_url


async def cli(capsys: pytest.CaptureFixture[str], *argv: str, note: str = "") -> tuple[int, str]:
    """`rebalancer ARGV` in a thread (it runs its own event loop): exit status and stdout;
    stderr must be empty or start with `note`."""
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    assert captured.err.startswith(note) and (captured.err == "") == (note == ""), captured.err
    return code, captured.out


async def project(store: EventStore) -> None:
    await ProjectionRunner(store, default_projections()).catch_up()


async def start_seed(store: EventStore, amount: str = AMOUNT) -> str:
    spec = builtin_specs()[SEED_SPEC]
    workflow_id, _ = await start_workflow(
        store, spec, {**SEED_PARAMS, "from_amount": amount}, load_accounts())
    return workflow_id


def changes(before: dict[str, dict[str, D]], after: dict[str, dict[str, D]],
            account: str) -> dict[str, D]:
    was, now = before.get(account, {}), after.get(account, {})
    return {c: now.get(c, D(0)) - was.get(c, D(0)) for c in set(was) | set(now)
            if now.get(c, D(0)) != was.get(c, D(0))}


async def test_status_json_carries_the_result_fills_rate_fees_and_remainders(
    cli_env: str, store: EventStore, capsys: pytest.CaptureFixture[str],
) -> None:
    async with Worker(cli_env) as worker:
        before = await worker.world.balances()
        workflow_id = await start_seed(store)
        flow = await worker.drive(workflow_id, timeout=30)
        assert flow.state == "done", flow.reason
        after = await worker.world.balances()
        orders = [o for o in await worker.world.ledger() if o["kind"] == "order"]
    await project(store)

    code, out = await cli(capsys, "status", workflow_id, "--json")
    assert code == 0
    shown = json.loads(out)

    # The spec's result, as the service itself resolves it; to_amount landed in futures.
    spec = builtin_specs()[SEED_SPEC]
    expected = resolve_result(spec, resolve_params(spec, flow.params, load_accounts()),
                              flow.results())
    assert shown["result"] == expected and D(shown["result"]["to_amount"]) > 0
    futures = changes(before, after, "binance-corp-sub:futures")
    assert futures == {"USDT": D(shown["result"]["to_amount"])}

    # Fills: one per trade, agreeing with the orders the world executed for that account.
    assert [f["task"] for f in shown["fills"]] == ["buy_in_source_spot", "sell_in_sub_spot"]
    for fill in shown["fills"]:
        executed = [o for o in orders if o["account"] == fill["account"]]
        filled = sum((D(o["amount"]) for o in executed), D(0))
        cost = sum((D(o["cost"]) for o in executed), D(0))
        assert (D(fill["filled"]), D(fill["cost"])) == (filled, cost), fill
        assert abs(D(fill["average_price"]) - cost / filled) < D("1e-12"), fill
    buy = shown["fills"][0]
    assert buy["side"] == "buy" and buy["slices"] == 4  # the TWAP's four slices

    # The rate: what arrived over the KRW that left upbit-personal.
    spent = -changes(before, after, "upbit-personal")["KRW"]
    rate = shown["rate"]
    assert (rate["from_currency"], rate["to_currency"]) == ("KRW", "USDT")
    assert (D(rate["from_amount"]), D(rate["to_amount"])) == (spent, futures["USDT"])
    assert abs(D(rate["rate"]) - futures["USDT"] / spent) < D("1e-15")

    # Fees per currency: exactly what the fee accounts received.
    received: dict[str, D] = {}
    for account in FEE_ACCOUNTS:
        for currency, amount in changes(before, after, account).items():
            received[currency] = received.get(currency, D(0)) + amount
    assert {c: D(v) for c, v in shown["fees"].items()} == received and received

    # What a withdrawal's multiple left behind stays on the account it was sent from (here the
    # interim account: Binance withdraws in steps of 0.0001 ETH... of what the deposit brought).
    assert shown["remainders"], "the amount should leave a remainder"
    for remainder in shown["remainders"]:
        task = next(t for t in flow.tasks if t.name == remainder["task"])
        assert task.kind == "withdraw" and remainder["reason"] == "withdrawal_min_amount"
        assert remainder["account"] == (task.request_params or {})["from_account"]
        assert changes(before, after, remainder["account"]) == {
            remainder["currency"]: D(remainder["amount"])}

    # The table shows the same; the read model's to_amount column is the result's.
    code, text = await cli(capsys, "status", workflow_id)
    assert code == 0
    assert f"result    to_amount = {D(shown['result']['to_amount']).normalize():f}" in text
    assert "USDT per KRW" in text and "fills" in text and "buy_in_source_spot" in text
    assert f"(withdrawal_min_amount, by {shown['remainders'][0]['task']})" in text
    with psycopg.connect(cli_env) as conn:
        row = conn.execute("select to_amount from workflows where workflow_id = %s",
                           (workflow_id,)).fetchone()
    assert row is not None and row[0] == D(shown["result"]["to_amount"])

    # The NATS query replies with the same read model.
    reply = await Api(store, load_accounts(), builtin_specs).handle(
        "rebalancer.query.workflow", json.dumps({"workflow_id": workflow_id}).encode())
    assert reply["ok"] and {k: reply["workflow"][k] for k in
                            ("result", "fills", "rate", "fees", "remainders")} == {
        k: shown[k] for k in ("result", "fills", "rate", "fees", "remainders")}

    # `status --at` folds the events: the same figures; a rebuild agrees with the live model.
    code, out = await cli(capsys, "status", workflow_id, "--at", str(shown["version"]), "--json",
                          note="rebalancer: as of version")
    assert {k: json.loads(out)[k] for k in ("result", "fills", "rate", "fees")} == {
        k: shown[k] for k in ("result", "fills", "rate", "fees")}
    code, out = await cli(capsys, "replay", "--verify", "--no-nats")
    assert code == 0, out


async def _in_transit(worker: Worker, workflow_id: str) -> None:
    """Step until the interim withdrawal is done and its deposit is being watched."""
    async def stepped() -> Any:
        flow = await load(worker.store, workflow_id)
        if flow.tasks[2].state not in ("requested", "processing"):
            await worker.step(workflow_id)
        return flow

    await eventually(stepped, lambda f: f.tasks[1].state == "done"
                     and f.tasks[2].state in ("requested", "processing"),
                     timeout=30, interval=0, what="the withdrawal in transit",
                     describe=lambda f: [t.state for t in f.tasks])


async def pending_deposits(url: str) -> dict[tuple[str, str], D]:
    """What the world has on its way: withdrawals executed, not yet credited."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("select account, currency, sum(amount) from sim.deposits"
                            " where status = 'pending' group by 1, 2").fetchall()
    return {(a, c): amount for a, c, amount in rows}


async def test_exposure_json_totals_match_the_worlds_money_in_transit(
    cli_env: str, store: EventStore, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    # Deposits take 1,000 s of the database clock to be confirmed: the money stays on its way.
    # Upbit withdraws in steps of 0.001 ETH here, so each withdrawal leaves a remainder.
    world = write_world(tmp_path, delays={"confirmation_seconds": 1_000_000})
    data = yaml.safe_load(world.read_text(encoding="utf-8"))
    data["exchanges"]["upbit"]["withdrawals"][0]["multiple"] = "0.001"
    world.write_text(yaml.safe_dump(data), encoding="utf-8")
    async with Worker(cli_env, world=world) as worker:
        first, second = await start_seed(store), await start_seed(store, "2000000")
        for workflow_id in (first, second):
            await _in_transit(worker, workflow_id)
        await project(store)
        in_world = await pending_deposits(cli_env)

        code, out = await cli(capsys, "exposure", "--json")
        assert code == 0
        shown = json.loads(out)
        totals = {(t["account"], t["currency"]): D(t["amount"]) for t in shown["totals"]}
        assert totals == in_world and set(in_world) == {("binance-personal", "ETH")}
        assert [t["items"] for t in shown["totals"]] == [2]
        by_workflow = {i["workflow_id"]: i for i in shown["in_transit"]}
        assert set(by_workflow) == {first, second}
        for item in by_workflow.values():
            assert (item["task"], item["kind"], item["from_account"], item["status"]) == (
                "withdraw_to_interim", "withdraw", "upbit-personal", "done")
        assert sum(D(i["amount"]) for i in by_workflow.values()) == totals[
            ("binance-personal", "ETH")]
        # Both withdrawals left a little behind on the source account.
        left = {(t["account"], t["currency"]): t for t in shown["remainder_totals"]}
        assert left[("upbit-personal", "ETH")]["items"] == 2
        assert D(left[("upbit-personal", "ETH")]["amount"]) == sum(
            D(r["amount"]) for r in shown["remainders"])

        code, text = await cli(capsys, "exposure")
        assert code == 0
        assert "in transit (by workflow)" in text and first in text and second in text
        assert "left behind (totals)" in text

        # Once the deposits are credited and the workflows carry on, nothing is in transit.
        with psycopg.connect(cli_env, autocommit=True) as conn:
            conn.execute("update sim.deposits set arrive_at = now() where status = 'pending'")
        for workflow_id in (first, second):
            assert (await worker.drive(workflow_id, timeout=30)).state == "done"
        await project(store)
        assert await pending_deposits(cli_env) == {}
        code, out = await cli(capsys, "exposure", "--json")
        assert json.loads(out)["totals"] == [] and json.loads(out)["in_transit"] == []


async def test_migration_013_refills_rows_written_before_it(
    cli_env: str, owner_database_url: str, store: EventStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from events.migrations import MIGRATIONS_DIR

    workflow_id = await start_seed(store)
    await project(store)
    # A row as written before 013: the money columns null.
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("update workflows set result = null, fills = null, rate = null,"
                     " fees = null, remainders = null")
        conn.execute((MIGRATIONS_DIR / "013_workflow_money.sql").read_text(encoding="utf-8"))
        assert conn.execute("select count(*) from workflows").fetchone() == (0,)
        assert conn.execute("select count(*) from projection_checkpoints"
                            " where name = 'workflows'").fetchone() == (0,)
    await project(store)
    with psycopg.connect(cli_env) as conn:
        row = conn.execute("select result, fills, fees, remainders from workflows"
                           " where workflow_id = %s", (workflow_id,)).fetchone()
    assert row == ({"to_amount": None}, [], {}, [])
    code, out = await cli(capsys, "replay", "--verify", "--no-nats")
    assert code == 0, out
