"""The store's database boundary on real PostgreSQL: SQL bugs and outages leave as our errors."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors

from events.errors import StoreQueryError, StoreUnavailableError, UndefinedTableError
from events.store import EventStore


async def terminate(database_url: str, pid: int) -> None:
    """Kill one server backend, as a crash or a DBA's pg_terminate_backend would."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        await admin.execute("select pg_terminate_backend(%s)", (pid,))


async def backend_pid(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("select pg_backend_pid()")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_a_query_against_a_missing_column_is_a_query_error(store: EventStore) -> None:
    with pytest.raises(StoreQueryError) as caught:
        async with store.connection() as conn:
            await conn.execute("select no_such_column from events")
    assert not isinstance(caught.value, StoreUnavailableError)
    assert caught.value.sqlstate == "42703"
    assert isinstance(caught.value.__cause__, pg_errors.UndefinedColumn)
    assert "no_such_column" in str(caught.value)


async def test_a_missing_table_can_be_told_from_other_query_errors(store: EventStore) -> None:
    with pytest.raises(UndefinedTableError):
        async with store.connection() as conn:
            await conn.execute("select 1 from no_such_table")


async def test_a_failed_transaction_is_rolled_back_and_a_query_error(store: EventStore) -> None:
    with pytest.raises(StoreQueryError) as caught:
        async with store.transaction() as conn:
            await conn.execute(
                "insert into command_outcomes (command_id, kind, reply) values ('c-1', 'k', '{}')"
            )
            await conn.execute("insert into command_outcomes (command_id) values ('c-2')")
    assert caught.value.sqlstate == "23502"  # not null violation
    assert await store.recall_outcome("c-1") is None


async def test_a_transaction_commits_when_its_block_ends(store: EventStore) -> None:
    async with store.transaction() as conn:
        await conn.execute(
            "insert into command_outcomes (command_id, kind, reply) values ('c-1', 'k', '{}')"
        )
    assert await store.recall_outcome("c-1") == {}


async def test_errors_that_are_not_the_databases_pass_through(store: EventStore) -> None:
    with pytest.raises(KeyError):
        async with store.transaction() as conn:
            await conn.execute(
                "insert into command_outcomes (command_id, kind, reply) values ('c-1', 'k', '{}')"
            )
            raise KeyError("a bug in the caller")
    assert await store.recall_outcome("c-1") is None


async def test_a_killed_connection_is_store_unavailable(
    store: EventStore, database_url: str
) -> None:
    with pytest.raises(StoreUnavailableError):
        async with store.connection() as conn:
            await terminate(database_url, await backend_pid(conn))
            await conn.execute("select 1")
    # The pool drops the dead connection; the next borrower gets a live one.
    async with store.connection() as conn:
        await conn.execute("select 1")


async def test_an_exhausted_pool_is_store_unavailable(database_url: str) -> None:
    small = await EventStore.open(database_url, max_size=1, connect_timeout=1)
    async with small, small.connection():
        with pytest.raises(StoreUnavailableError, match="no database connection"):
            async with small.connection():
                pass


async def test_a_closed_store_is_store_unavailable(database_url: str) -> None:
    closed = await EventStore.open(database_url, max_size=1)
    await closed.close()
    with pytest.raises(StoreUnavailableError):
        async with closed.connection():
            pass
    with pytest.raises(StoreUnavailableError):
        await closed.stream_version("workflow-00000000-0000-0000-0000-000000000000")


async def test_a_session_keeps_its_connection_and_reopens_it_when_lost(
    store: EventStore, database_url: str
) -> None:
    session = store.session()
    try:
        async with session.connection() as conn:
            first = await backend_pid(conn)
        async with session.connection() as conn:
            assert await backend_pid(conn) == first
        await terminate(database_url, first)
        with pytest.raises(StoreUnavailableError):
            async with session.connection() as conn:
                await conn.execute("select 1")
        assert not session.opened
        async with session.connection() as conn:
            assert await backend_pid(conn) != first
    finally:
        await session.close()


async def test_a_query_error_in_a_session_closes_it(store: EventStore) -> None:
    session = store.session()
    try:
        with pytest.raises(StoreQueryError):
            async with session.connection() as conn:
                await conn.execute("select no_such_column from events")
        assert not session.opened
    finally:
        await session.close()


async def test_a_listener_that_lost_its_connection_is_store_unavailable(
    store: EventStore, database_url: str
) -> None:
    async with store.listen() as notifications:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            await admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where datname = current_database() and pid <> pg_backend_pid()"
                " and query like 'listen %'"
            )
        with pytest.raises(StoreUnavailableError):
            await asyncio.wait_for(notifications.wait(5), 10)
