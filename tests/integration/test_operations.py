"""Operator commands end to end: through the API, against an engine on the simulated world."""

from __future__ import annotations

import json
from typing import Any

from events.store import EventStore
from rebalancer.accounts import load_accounts
from rebalancer.api import Api
from rebalancer.engine import Engine
from rebalancer.exchanges.simulated import SimulatedWorld
from rebalancer.specs.builders import task, workflow
from rebalancer.specs.loading import builtin_specs
from rebalancer.specs.models import WorkflowSpec
from rebalancer.workflow import Workflow
from tests.support import SEED_PARAMS, eventually, load


def await_never(accounts: Any) -> WorkflowSpec:
    """A deposit that never arrives, with a short deadline: it ends in needs_attention."""
    return workflow(
        "await_never", {"account": "account"},
        [task("await_ghost", "deposit", deadline_seconds=0.3, account="{account}",
              currency="ETH", amount="123.45678")],
        accounts=accounts,
    )


async def ask(api: Api, command: str, **body: Any) -> dict[str, Any]:
    return await api.handle(f"rebalancer.cmd.{command}", json.dumps(body).encode())


async def drive(engine: Engine, store: EventStore, workflow_id: str, until: set[str],
                timeout: float = 30.0) -> Workflow:
    async def passed() -> Workflow:
        await engine.run_pass()
        return await load(store, workflow_id)

    return await eventually(passed, lambda flow: flow.state in until, timeout=timeout,
                            interval=0, what=f"workflow {workflow_id} reaching {until}")


async def test_pause_resume_and_resolve_on_a_running_world(database_url: str,
                                                           store: EventStore) -> None:
    accounts = load_accounts()
    specs = {**builtin_specs(), "await_never": await_never(accounts)}
    api = Api(store, accounts, lambda: specs)
    async with await SimulatedWorld.open(database_url, time_scale=1000, faults="") as world:
        engine = Engine(store, world, accounts, owner="ops-test")

        # Paused: the worker takes no step; resumed: it runs to the end.
        reply = await ask(api, "start", command_id="s1", spec="upbit_to_binance_sub_futures",
                          params={**SEED_PARAMS, "from_amount": "300000"})
        seed_id = reply["workflow_id"]
        await engine.run_pass()  # started
        assert (await ask(api, "pause", command_id="p1", workflow_id=seed_id))["state"] == "paused"
        version = (await load(store, seed_id)).version
        for _ in range(5):
            await engine.run_pass()
        assert (await load(store, seed_id)).version == version
        assert (await ask(api, "resume", command_id="r1", workflow_id=seed_id))["state"] == (
            "running")
        done = await drive(engine, store, seed_id, {"done", "failed", "needs_attention"})
        assert done.state == "done"

        # Past its deadline the deposit needs attention; resolving it lets the workflow end.
        reply = await ask(api, "start", command_id="s2", spec="await_never",
                          params={"account": "binance-personal"})
        stuck_id = reply["workflow_id"]
        stuck = await drive(engine, store, stuck_id, {"needs_attention"})
        assert stuck.state == "needs_attention"
        assert stuck.tasks[0].state == "needs_attention"
        assert stuck.tasks[0].error is not None and stuck.tasks[0].error["code"] == "deadline"
        # Retry is refused while the task still needs attention: resolving it is the answer.
        refused = await ask(api, "retry", command_id="x1", workflow_id=stuck_id)
        assert refused["error"]["code"] == "conflict"
        assert "await_ghost" in refused["error"]["message"]
        reply = await ask(api, "resolve", command_id="v1", workflow_id=stuck_id,
                          task="await_ghost", outcome="failed", note="never sent, checked")
        assert reply["state"] == "failed"
        # Nothing needs attention now: the operator's retry puts the workflow back to running.
        reply = await ask(api, "retry", command_id="x2", workflow_id=stuck_id)
        assert reply == {"ok": True, "workflow_id": stuck_id, "state": "running"}
        ended = await drive(engine, store, stuck_id, {"failed", "done"})
        assert ended.state == "failed"
        assert world is not None and (await world.check())[0]


async def test_cancel_before_anything_moved_and_not_while_money_is_in_flight(
    database_url: str, store: EventStore,
) -> None:
    accounts = load_accounts()
    api = Api(store, accounts, builtin_specs)
    async with await SimulatedWorld.open(database_url, time_scale=1000, faults="") as world:
        engine = Engine(store, world, accounts, owner="ops-test")
        reply = await ask(api, "start", command_id="s1", spec="upbit_to_binance_sub_futures",
                          params={**SEED_PARAMS, "from_amount": "300000"})
        workflow_id = reply["workflow_id"]
        assert (await ask(api, "cancel", command_id="c1", workflow_id=workflow_id,
                          reason="changed my mind"))["state"] == "canceled"
        for _ in range(3):
            await engine.run_pass()
        canceled = await load(store, workflow_id)
        assert canceled.state == "canceled" and canceled.tasks[0].state == "canceled"
        assert await world.ledger() == []  # nothing was ever sent
