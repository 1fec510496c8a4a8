"""The pre-flight walk on the simulated world: the seed path passes, knowable failures are named
per task, and no exchange operation is made."""

from __future__ import annotations

import pytest

from rebalancer.accounts import load_accounts
from rebalancer.exchanges.simulated import SimulatedWorld
from rebalancer.preflight import preflight_problems
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.resolution import resolve_params
from tests.support import SEED_PARAMS, SEED_SPEC, operations


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
