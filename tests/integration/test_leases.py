"""Workflow leases, and the engine stopping on a SQL bug instead of waiting it out."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

from events.errors import StoreQueryError, StoreUnavailableError
from events.store import EventStore
from rebalancer.accounts import DEFAULT_CONFIG, load_accounts
from rebalancer.engine import Engine
from rebalancer.leases import Leases


class NoExchanges:
    """The engine under test never reaches an exchange."""

    def for_account(self, account: str) -> Any:
        raise AssertionError(f"no exchange expected, asked for {account}")


async def test_a_lease_is_one_owners_until_released(store: EventStore) -> None:
    workflow = str(uuid.uuid4())
    mine, theirs = Leases(store, "worker-a", 30), Leases(store, "worker-b", 30)
    assert await mine.acquire(workflow)
    assert not await theirs.acquire(workflow)
    assert await mine.acquire(workflow)  # taking our own again extends it
    assert await mine.holders() == {workflow: "worker-a"}
    assert await mine.renew(workflow)
    assert not await theirs.renew(workflow)
    await theirs.release(workflow)  # not theirs to give up
    assert await theirs.holders() == {workflow: "worker-a"}
    await mine.release(workflow)
    assert await mine.holders() == {}
    assert await theirs.acquire(workflow)


async def test_an_expired_lease_is_taken_over(store: EventStore) -> None:
    workflow = str(uuid.uuid4())
    dead = Leases(store, "worker-dead", 0.05)
    assert await dead.acquire(workflow)
    await asyncio.sleep(0.2)
    assert await dead.holders() == {}
    assert await Leases(store, "worker-alive", 30).acquire(workflow)
    assert not await dead.renew(workflow)


async def test_the_engine_stops_on_a_sql_bug_instead_of_retrying_it(
    store: EventStore, database_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # The engine's query of active workflows no longer matches the read model.
        await conn.execute("alter table workflows rename column updated_at to changed_at")
    engine = Engine(store, NoExchanges(), load_accounts(DEFAULT_CONFIG),  # type: ignore[arg-type]
                    follow_projections=False)
    with pytest.raises(StoreQueryError) as caught:
        await asyncio.wait_for(engine.run(asyncio.Event(), tick=0.05), 20)
    assert not isinstance(caught.value, StoreUnavailableError)
    assert caught.value.sqlstate == "42703"
