"""Helpers for driving workflows end to end: worker processes, a world file, sim ledger queries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg.rows import dict_row

from events.store import EventStore, RecordedEvent
from rebalancer.accounts import DEFAULT_CONFIG, Accounts, load_accounts
from rebalancer.budgets import Budgets
from rebalancer.engine import Engine
from rebalancer.exchanges.simulated import DEFAULT_WORLD, SimulatedWorld
from rebalancer.specs.builders import task, workflow
from rebalancer.specs.models import WorkflowSpec
from rebalancer.workflow import Workflow, fold
from tests.support.waiting import eventually

SEED_SPEC = "upbit_to_binance_sub_futures"
SEED_PARAMS = {
    "from_account": "upbit-personal",
    "to_account": "binance-corp-sub",
    "from_currency": "KRW",
    "interim_currency": "ETH",
    "to_currency": "USDT",
}
MONEY_MOVES = ("order", "withdraw", "transfer", "master_transfer")


def write_world(
    directory: Path,
    *,
    balances: Mapping[str, Mapping[str, str]] | None = None,
    delays: Mapping[str, float] | None = None,
) -> Path:
    """The demo world with some balances and delays replaced, as a file to seed from."""
    data = yaml.safe_load(DEFAULT_WORLD.read_text(encoding="utf-8"))
    data["balances"].update({k: dict(v) for k, v in (balances or {}).items()})
    data["delays"].update(delays or {})
    path = directory / "world.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def write_accounts(directory: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the default accounts configuration, changed by `edit`, as a file."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    edit(data["accounts"])
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class Worker:
    """One worker process as a test sees it: its own store, world connection and engine.

    `restart` drops all of it and builds it again from nothing but the database, as a crashed
    and restarted process would.
    """

    def __init__(
        self,
        database_url: str,
        *,
        accounts: Accounts | None = None,
        world: Path | None = None,
        time_scale: float = 1000.0,
        faults: str = "",
        owner: str = "test-worker",
        clock: Callable[[], datetime] | None = None,
        seed: int = 11,
        concurrency: int = 256,
    ) -> None:
        self.database_url = database_url
        self.accounts = accounts or load_accounts()
        self.world_file = world
        self.time_scale = time_scale
        self.faults = faults
        self.owner = owner
        self.clock = clock
        self.seed = seed
        self.concurrency = concurrency
        self._store: EventStore | None = None
        self._world: SimulatedWorld | None = None
        self._engine: Engine | None = None

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._store = await EventStore.open(self.database_url, max_size=4)
        self._world = await SimulatedWorld.open(
            self.database_url,
            world=self.world_file,
            accounts=self.accounts,
            faults=self.faults,
            seed=self.seed,
            time_scale=self.time_scale,
            max_size=4,
        )
        # No budget: the tests' worlds answer in milliseconds.
        self._engine = Engine(
            self._store,
            self._world,
            self.accounts,
            owner=self.owner,
            budgets=Budgets.lifted(),
            clock=self.clock,
            poll_scale=1 / self.time_scale,
            concurrency=self.concurrency,
        )

    async def close(self) -> None:
        if self._world is not None:
            await self._world.close()
        if self._store is not None:
            await self._store.close()
        self._store = self._world = self._engine = None

    async def restart(self) -> None:
        await self.close()
        await self.start()

    @property
    def store(self) -> EventStore:
        assert self._store is not None
        return self._store

    @property
    def world(self) -> SimulatedWorld:
        assert self._world is not None
        return self._world

    @property
    def engine(self) -> Engine:
        assert self._engine is not None
        return self._engine

    async def step(self, workflow_id: str) -> str:
        return await self.engine.step(workflow_id)

    async def step_until_moved(
        self, workflow_id: str, timeout: float = 10.0
    ) -> list[RecordedEvent]:
        """Step until the stream grows (the world may still be busy); the new events."""
        stream = f"workflow-{workflow_id}"
        before = await self.store.stream_version(stream)

        async def moved() -> str:
            outcome = await self.step(workflow_id)
            assert outcome in ("moved", "idle", "retry"), f"step of {workflow_id}: {outcome}"
            return outcome

        await eventually(moved, lambda outcome: outcome == "moved", timeout=timeout,
                         interval=0.005, what=f"{workflow_id} moving")
        return await self.store.read_stream(stream, after_version=before)

    async def drive(
        self, workflow_id: str, until: Collection[str] = ("done", "failed"), timeout: float = 10.0
    ) -> Workflow:
        """Step the workflow until its stored state is one of `until`; the workflow then."""

        async def stepped() -> Workflow:
            flow = await load(self.store, workflow_id)
            if flow.state not in until:
                await self.step(workflow_id)
            return flow

        return await eventually(
            stepped, lambda flow: flow.state in until, timeout=timeout, interval=0,
            what=f"workflow {workflow_id} reaching {until}",
            describe=lambda flow: (flow.state, [t.state for t in flow.tasks], flow.reason),
        )


async def load(store: EventStore, workflow_id: str) -> Workflow:
    """The workflow as its stored events tell it (never what an engine holds in memory)."""
    return fold(await store.read_stream(f"workflow-{workflow_id}"))


@contextlib.asynccontextmanager
async def engine_running(engine: Engine) -> AsyncIterator[asyncio.Task[None]]:
    """`engine.run` in the background, as under `serve`; stopped (and checked to stop
    cleanly) afterwards."""
    stop = asyncio.Event()
    job = asyncio.create_task(engine.run(stop, tick=0.05))
    try:
        yield job
    finally:
        stop.set()
        await asyncio.wait_for(job, 20)


async def operations(database_url: str, *kinds: str) -> list[dict[str, Any]]:
    """Executed operations in `sim.operations` (of `kinds`, or all), oldest first."""
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as conn:
        cur = await conn.execute(
            "select * from sim.operations where cardinality(%s::text[]) = 0 or kind = any(%s)"
            " order by id",
            (list(kinds), list(kinds)),
        )
        return await cur.fetchall()


async def intents(database_url: str) -> list[dict[str, Any]]:
    """Every stored intent (submit / next_slice) with its stream, task and client id."""
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as conn:
        cur = await conn.execute(
            "select stream_id, data->>'task_name' as task, data->>'kind' as kind,"
            " data->'request_params'->>'client_id' as client_id from events"
            " where type = 'TaskStateChanged' and data->>'trigger' in ('submit', 'next_slice')"
            " order by position"
        )
        return await cur.fetchall()


def to_futures(accounts: Accounts) -> WorkflowSpec:
    """One spot -> futures transfer of `amount` ETH on `account`."""
    return workflow(
        "transfer_once",
        {"account": "account", "amount": "amount"},
        [task("move_to_futures", "transfer", account="{account}", currency="ETH",
              amount="{amount}", from_wallet="spot", to_wallet="futures")],
        accounts=accounts,
    )


def withdraw_once(accounts: Accounts) -> WorkflowSpec:
    """One withdrawal of `amount` ETH from `from_account` to `to_account`'s deposit address."""
    return workflow(
        "withdraw_once",
        {"from_account": "account", "to_account": "account", "amount": "amount"},
        [
            task(
                "withdraw_to_interim",
                "withdraw",
                from_account="{from_account}",
                to_account="{to_account}",
                currency="ETH",
                amount="{amount}",
                network="ETH",
            )
        ],
        accounts=accounts,
    )


def money(data: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """`data` with the money fields `keys` read as Decimals, so "0.19" equals "0.19000000"."""
    return {k: (Decimal(v) if k in keys and v is not None else v) for k, v in data.items()}
