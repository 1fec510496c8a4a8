"""`serve` in-process on real PostgreSQL and NATS: a clean stop, and a component's death."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from events.migrations import migrate
from events.relay import Relay
from events.store import EventStore
from rebalancer.accounts import load_accounts
from rebalancer.commands import start_workflow
from rebalancer.errors import ComponentFailedError
from rebalancer.service import serve
from rebalancer.settings import Settings
from rebalancer.specs.loading import builtin_specs
from tests.support import SEED_PARAMS, SEED_SPEC, eventually, load

SETTINGS = Settings(sim_time_scale=1000.0)


async def _other_sessions(database_url: str) -> int:
    """Sessions on the test database other than this query's own."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "select count(*) from pg_stat_activity"
            " where datname = current_database() and pid <> pg_backend_pid()"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _no_sessions_left(database_url: str) -> None:
    # A closed connection's server process ends a moment after the client let go of it; a
    # leaked one never does.
    await eventually(lambda: _other_sessions(database_url), lambda n: n == 0, timeout=5,
                     what="sessions left after serve returned")


async def test_serve_stops_cleanly_and_leaves_no_session_behind(
    database_url: str, nats_url: str
) -> None:
    await migrate(database_url)
    stop = asyncio.Event()
    running = asyncio.create_task(serve(SETTINGS, database_url, nats_url, tick=0.05, stop=stop))
    # Up: the store, the world and the relay hold their connections.
    await eventually(lambda: _other_sessions(database_url), what="serve's sessions")
    stop.set()
    await asyncio.wait_for(running, 30)
    await _no_sessions_left(database_url)


async def test_a_component_that_dies_stops_serve_with_its_name(
    database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrate(database_url)

    async def broken(self: Relay, stop: asyncio.Event) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("JetStream said no")

    monkeypatch.setattr(Relay, "run", broken)
    stop = asyncio.Event()
    with pytest.raises(ComponentFailedError, match=r"^relay failed: JetStream said no$"):
        await asyncio.wait_for(serve(SETTINGS, database_url, nats_url, tick=0.05, stop=stop), 30)
    # Never half alive: the worker, projections and NATS side were stopped, everything closed.
    assert not stop.is_set()
    await _no_sessions_left(database_url)


async def test_a_read_model_gone_stops_its_projection_not_the_money(
    database_url: str, owner_database_url: str, store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(owner_database_url, autocommit=True) as conn:
        # A read model gone (a botched manual change): its projection stops at the first event
        # and says so; the worker finds work in the schedule, so workflows still move.
        await conn.execute("drop table workflows")
    accounts = load_accounts()
    workflow_id, _ = await start_workflow(store, builtin_specs()[SEED_SPEC],
                                          {**SEED_PARAMS, "from_amount": "200000"}, accounts)
    stop = asyncio.Event()
    running = asyncio.create_task(serve(SETTINGS, database_url, None, tick=0.05, stop=stop))
    try:
        flow = await eventually(lambda: load(store, workflow_id), lambda f: f.state == "done",
                                timeout=60, what="the workflow ending while a read model is gone")
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
    assert flow.state == "done"
    assert any("projection workflows stopped" in r.getMessage() for r in caplog.records)


async def test_serve_stops_cleanly_while_nats_has_never_answered(database_url: str) -> None:
    # The NATS client retries a first connect forever: a stop must not wait for it.
    await migrate(database_url)
    stop = asyncio.Event()
    running = asyncio.create_task(
        serve(SETTINGS, database_url, "nats://127.0.0.1:9", tick=0.05, stop=stop))
    await eventually(lambda: _other_sessions(database_url), what="serve's sessions")
    await asyncio.sleep(1.0)  # long enough for the first connect attempt to be under way
    stop.set()
    await asyncio.wait_for(running, 15)
    await _no_sessions_left(database_url)
