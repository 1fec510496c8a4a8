"""The projection runner stops on a statement PostgreSQL refuses instead of retrying it."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from events.errors import StoreQueryError, StoreUnavailableError
from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections


async def test_the_runner_stops_on_a_sql_bug_in_its_checkpoint_query(
    store: EventStore, database_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "alter table projection_checkpoints rename column events_applied to applied"
        )
    runner = ProjectionRunner(store, default_projections(), poll_interval=0.05)
    with pytest.raises(StoreQueryError) as caught:
        await asyncio.wait_for(runner.run(asyncio.Event()), 20)
    assert not isinstance(caught.value, StoreUnavailableError)
    assert caught.value.sqlstate == "42703"
