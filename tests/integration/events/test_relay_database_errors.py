"""The relay and the database: an outage is waited out; a statement PostgreSQL refuses is an
ERROR in the log, retried with backoff, and the relay goes on once it is fixed."""

from __future__ import annotations

import asyncio
import logging
import random

import psycopg
import pytest

from events.errors import StoreQueryError, StoreUnavailableError
from events.relay import Relay
from events.store import EventStore
from tests.integration.projections.test_runner import append_all
from tests.support import eventually
from tests.support.synthetic import make_history


async def break_checkpoint_table(database_url: str) -> None:
    """A schema the relay's SQL does not match: every checkpoint read is a SQL bug now."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("alter table relay_checkpoints rename column position to pos")


async def test_a_sql_bug_in_the_relay_is_a_query_error_not_an_outage(
    store: EventStore, owner_database_url: str, nats_url: str
) -> None:
    await break_checkpoint_table(owner_database_url)
    async with Relay(store, nats_url, name="sql-bug") as relay:
        with pytest.raises(StoreQueryError) as caught:
            await relay.relay_once()
    assert not isinstance(caught.value, StoreUnavailableError)
    assert caught.value.sqlstate == "42703"  # undefined column


async def test_the_relay_loop_logs_a_sql_bug_as_an_error_and_recovers_once_fixed(
    store: EventStore, owner_database_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await break_checkpoint_table(owner_database_url)
    history = make_history(random.Random(9))
    await append_all(store, [history])
    relay = Relay(store, nats_url, name="sql-bug-loop", poll_interval=0.05, max_backoff=0.2)
    stop = asyncio.Event()
    caplog.set_level(logging.ERROR, logger="events.relay.publisher")
    task = asyncio.create_task(relay.run(stop))
    try:
        # Before, this ended the loop (and with it `serve`).
        await eventually(lambda: [r for r in caplog.records if "42703" in r.getMessage()],
                         timeout=10, what="an ERROR naming the SQLSTATE")
        assert not task.done()
        async with await psycopg.AsyncConnection.connect(owner_database_url, autocommit=True) as c:
            await c.execute("alter table relay_checkpoints rename column pos to position")
        await eventually(relay.lag, lambda lag: lag.events_behind == 0, timeout=10,
                         what="the relay catching up once the schema is fixed")
        assert await relay.checkpoint() == await store.head()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_killed_checkpoint_connection_is_an_outage_and_the_relay_recovers(
    store: EventStore, database_url: str, nats_url: str
) -> None:
    async with Relay(store, nats_url, name="killed") as relay:
        assert await relay.relay_once() == 0
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            cur = await c.execute(
                # The relay's checkpoint connection: the one holding its advisory lock.
                "select pg_terminate_backend(pid) from pg_locks where locktype = 'advisory'"
                " and database = (select oid from pg_database where datname = current_database())"
            )
            assert [row[0] for row in await cur.fetchall()] == [True]
        with pytest.raises(StoreUnavailableError):
            await relay.relay_once()
        assert await relay.relay_once() == 0  # a new checkpoint connection
