"""The pre-flight walk on the simulated world: the seed path passes, knowable failures are named
per task, and no exchange operation is made."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import nats
import psycopg
import pytest

from events.store import EventStore
from rebalancer.accounts import Accounts, load_accounts
from rebalancer.api import Api, serve_api
from rebalancer.exchanges.simulated import SimulatedWorld
from rebalancer.preflight import preflight_problems
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.resolution import resolve_params
from tests.support import SEED_PARAMS, SEED_SPEC, event_count, operations


async def test_the_seed_path_passes_the_preflight(database_url: str) -> None:
    accounts = load_accounts()
    sim = await SimulatedWorld.open(database_url, accounts=accounts)
    try:
        spec = builtin_specs()[SEED_SPEC]
        params = resolve_params(spec, {**SEED_PARAMS, "from_amount": "1000000"}, accounts)
        assert await preflight_problems(spec, params, accounts, sim) == []
    finally:
        await sim.close()


def _changed(accounts: Accounts, account: str, change: dict[str, object]) -> Accounts:
    return accounts.model_copy(update={"accounts": {
        **accounts.accounts, account: accounts.accounts[account].model_copy(update=change)}})


# Each problem knowable before any money moves: (params changed, account changed, the task
# the refusal must name, what it must say).
CASES = {
    "below the withdrawal minimum after fees": (
        {"from_amount": "100000"}, None, "withdraw_to_interim", "withdrawal minimum"),
    "unknown market": (
        {"interim_currency": "BTC"}, None, "buy_in_source_spot", "no market BTC/KRW"),
    "insufficient balance": (
        {"from_amount": "90000000000"}, None, "buy_in_source_spot",
        "holds 10000000000 KRW, less than"),
    "destination not on the allowlist": (
        {}, ("upbit-personal", {"withdrawal_allowlist": []}), "withdraw_to_interim",
        "not on upbit-personal's withdrawal allowlist"),
    "no deposit address on that network": (
        {}, ("binance-personal", {"deposit_addresses": {}}), "withdraw_to_interim",
        "has no ETH deposit address on ETH"),
}


@pytest.mark.parametrize("case", CASES)
async def test_start_is_refused_by_the_preflight_with_nothing_appended_or_called(
    database_url: str, store: EventStore, case: str
) -> None:
    change, account_change, task_name, expected = CASES[case]
    accounts = load_accounts()
    if account_change is not None:
        accounts = _changed(accounts, *account_change)
    sim = await SimulatedWorld.open(database_url, accounts=accounts)
    try:
        api = Api(store, accounts, builtin_specs, exchanges=sim)
        before = await operations(database_url)
        reply = await api.handle("rebalancer.cmd.start", json.dumps(
            {"command_id": f"refused-{case}", "spec": SEED_SPEC,
             "params": {**SEED_PARAMS, "from_amount": "1000000", **change}}).encode())
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_request", reply
        problems = reply["error"]["details"]["problems"]
        assert any(expected in p and f"task {task_name!r}" in p for p in problems), problems
        assert all(p.startswith("task ") for p in problems)
        # Nothing appended, no exchange operation made (the walk's calls are read-only).
        assert await event_count(store) == 0
        assert await operations(database_url) == before
    finally:
        await sim.close()


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


async def test_the_command_line_start_prints_one_line_per_problem(
    database_url: str, store: EventStore, nats_url: str
) -> None:
    accounts = load_accounts()
    sim = await SimulatedWorld.open(database_url, accounts=accounts)
    nc = await nats.connect(nats_url)
    try:
        await serve_api(Api(store, accounts, builtin_specs, exchanges=sim), nc)
        params = [arg for key, value in {**SEED_PARAMS, "from_amount": "100000"}.items()
                  for arg in ("--param", f"{key}={value}")]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rebalancer", "start", SEED_SPEC, *params,
            env={**os.environ, "REBALANCER_DATABASE_URL": database_url,
                 "REBALANCER_NATS_URL": nats_url},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        await nc.drain()
        await sim.close()
    lines = err.decode().splitlines()
    assert process.returncode == 2 and out == b""
    # One problem: one line, naming the task.
    assert len(lines) == 1 and lines[0].startswith(
        "rebalancer: invalid_request: the pre-flight refuses it: task 'withdraw_to_interim':"
        " about "), lines
    assert "Traceback" not in err.decode()
    assert await event_count(store) == 0


async def test_an_exchange_that_cannot_answer_now_makes_the_start_retryable_not_refused(
    database_url: str, store: EventStore
) -> None:
    # Found by the soak: a rate-limited read during the walk refused the start for good
    # (`invalid_request` naming the rate limit as the task's problem).
    accounts = load_accounts()
    await (await SimulatedWorld.open(database_url, accounts=accounts)).close()  # seeded
    sim = await SimulatedWorld.open(database_url, accounts=accounts, faults="rate_limit=1")
    try:
        api = Api(store, accounts, builtin_specs, exchanges=sim)
        body = json.dumps({"command_id": "limited", "spec": SEED_SPEC,
                           "params": {**SEED_PARAMS, "from_amount": "1000000"}}).encode()
        reply = await api.handle("rebalancer.cmd.start", body)
        assert reply["ok"] is False, reply
        assert reply["error"]["code"] == "internal", reply
        assert reply["error"]["details"]["retryable"] is True, reply
        assert "rate limit" in reply["error"]["message"], reply
        assert await event_count(store) == 0
    finally:
        await sim.close()
