"""The relay and the database: an outage is retried, a statement PostgreSQL refuses is not."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from events.errors import StoreQueryError, StoreUnavailableError
from events.relay import Relay
from events.store import EventStore


async def break_checkpoint_table(database_url: str) -> None:
    """A schema the relay's SQL does not match: every checkpoint read is a SQL bug now."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("alter table relay_checkpoints rename column position to pos")


async def test_a_sql_bug_in_the_relay_is_a_query_error_not_an_outage(
    store: EventStore, database_url: str, nats_url: str
) -> None:
    await break_checkpoint_table(database_url)
    async with Relay(store, nats_url, name="sql-bug") as relay:
        with pytest.raises(StoreQueryError) as caught:
            await relay.relay_once()
    assert not isinstance(caught.value, StoreUnavailableError)
    assert caught.value.sqlstate == "42703"  # undefined column


async def test_the_relay_loop_stops_on_a_sql_bug_instead_of_retrying_it(
    store: EventStore, database_url: str, nats_url: str
) -> None:
    await break_checkpoint_table(database_url)
    relay = Relay(store, nats_url, name="sql-bug-loop", poll_interval=0.05)
    with pytest.raises(StoreQueryError):
        # Before, this was taken for an outage and retried with backoff until stopped.
        await asyncio.wait_for(relay.run(asyncio.Event()), 20)


async def test_a_killed_checkpoint_connection_is_an_outage_and_the_relay_recovers(
    store: EventStore, database_url: str, nats_url: str
) -> None:
    async with Relay(store, nats_url, name="killed") as relay:
        assert await relay.relay_once() == 0
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            cur = await c.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where datname = current_database() and pid <> pg_backend_pid()"
                " and query like '%pg_advisory_unlock%'"
            )
            assert [row[0] for row in await cur.fetchall()] == [True]
        with pytest.raises(StoreUnavailableError):
            await relay.relay_once()
        assert await relay.relay_once() == 0  # a new checkpoint connection
