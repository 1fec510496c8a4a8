"""The pre-flight walk on the simulated world: the seed path passes, knowable failures are named
per task, and no exchange operation is made."""

from __future__ import annotations

import json

import psycopg
import pytest

from events.store import EventStore
from rebalancer.accounts import load_accounts
from rebalancer.api import Api
from rebalancer.exchanges.simulated import SimulatedWorld
from rebalancer.preflight import preflight_problems
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.resolution import resolve_params
from tests.support import SEED_PARAMS, SEED_SPEC, event_count, operations


@pytest.mark.parametrize(("change", "expected"), [
    ({}, None),
    ({"from_amount": "100000"}, "withdrawal minimum"),
    ({"interim_currency": "BTC"}, "no market BTC/KRW"),
    ({"from_amount": "90000000000"}, "less than"),
])
async def test_preflight_names_each_knowable_problem(
    database_url: str, change: dict[str, str], expected: str | None
) -> None:
    accounts = load_accounts()
    sim = await SimulatedWorld.open(database_url, accounts=accounts)
    try:
        spec = builtin_specs()[SEED_SPEC]
        params = resolve_params(spec, {**SEED_PARAMS, "from_amount": "1000000", **change}, accounts)
        before = await operations(database_url)
        problems = await preflight_problems(spec, params, accounts, sim)
        assert await operations(database_url) == before
    finally:
        await sim.close()
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems
        assert all(p.startswith("task ") for p in problems)


async def test_start_refused_by_the_preflight_appends_nothing(
    database_url: str, store: EventStore
) -> None:
    accounts = load_accounts()
    sim = await SimulatedWorld.open(database_url, accounts=accounts)
    try:
        api = Api(store, accounts, builtin_specs, exchanges=sim)
        params = {**SEED_PARAMS, "from_amount": "100000"}
        reply = await api.handle("rebalancer.cmd.start", json.dumps(
            {"command_id": "p1", "spec": SEED_SPEC, "params": params}).encode())
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_request"
        assert reply["error"]["details"]["problems"]
        assert await event_count(store) == 0
        assert await operations(database_url) == []
        ok = await api.handle("rebalancer.cmd.start", json.dumps(
            {"command_id": "p2", "spec": SEED_SPEC,
             "params": {**SEED_PARAMS, "from_amount": "1000000"}}).encode())
        assert ok["ok"] is True, ok
        # The account emptied since (its money moved on, say): a repeat of the start that went
        # through is answered from the store, not refused by a second walk.
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute("update sim.balances set amount = 0"
                               " where account = 'upbit-personal'")
        again = await api.handle("rebalancer.cmd.start", json.dumps(
            {"command_id": "p2", "spec": SEED_SPEC,
             "params": {**SEED_PARAMS, "from_amount": "1000000"}}).encode())
        assert again == {**ok, "created": False}
        fresh = await api.handle("rebalancer.cmd.start", json.dumps(
            {"command_id": "p3", "spec": SEED_SPEC,
             "params": {**SEED_PARAMS, "from_amount": "1000000"}}).encode())
        assert fresh["ok"] is False and "holds 0 KRW" in fresh["error"]["message"], fresh
    finally:
        await sim.close()


@pytest.mark.parametrize(("account", "change", "expected"), [
    ("upbit-personal", {"withdrawal_allowlist": []},
     "not on upbit-personal's withdrawal allowlist"),
    ("binance-personal", {"deposit_addresses": {}}, "has no ETH deposit address on ETH"),
])
async def test_preflight_names_address_problems(
    database_url: str, account: str, change: dict[str, object], expected: str
) -> None:
    accounts = load_accounts()
    sim = await SimulatedWorld.open(database_url, accounts=accounts)
    changed = accounts.model_copy(update={"accounts": {
        **accounts.accounts, account: accounts.accounts[account].model_copy(update=change)}})
    try:
        spec = builtin_specs()[SEED_SPEC]
        params = resolve_params(spec, {**SEED_PARAMS, "from_amount": "1000000"}, changed)
        problems = await preflight_problems(spec, params, changed, sim)
        assert await operations(database_url) == []
    finally:
        await sim.close()
    assert any(expected in p and "withdraw_to_interim" in p for p in problems), problems
