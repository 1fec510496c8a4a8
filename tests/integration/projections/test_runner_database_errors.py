"""The projection runner and a statement PostgreSQL refuses: logged as an ERROR, never an end.

A follower that stopped would stop `serve` (and the worker with it) for a read model falling
behind; instead it says so loudly, backs off, and picks up where it was once the cause is fixed.
"""

from __future__ import annotations

import asyncio
import logging
import random

import psycopg
import pytest

from events.errors import StoreQueryError, StoreUnavailableError
from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from tests.integration.projections.test_runner import append_all, read_model
from tests.support import eventually
from tests.support.synthetic import make_history


async def _rename(database_url: str, old: str, new: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(f"alter table projection_checkpoints rename column {old} to {new}")


async def test_a_sql_bug_in_the_checkpoint_query_is_a_query_error_from_catch_up(
    store: EventStore, database_url: str, owner_database_url: str
) -> None:
    await append_all(store, [make_history(random.Random(4))])
    await _rename(owner_database_url, "events_applied", "applied")
    with pytest.raises(StoreQueryError) as caught:
        await ProjectionRunner(store, default_projections()).catch_up()
    assert not isinstance(caught.value, StoreUnavailableError)
    assert caught.value.sqlstate == "42703"


async def test_the_running_runner_logs_a_sql_bug_as_an_error_and_recovers_once_fixed(
    store: EventStore, owner_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await _rename(owner_database_url, "events_applied", "applied")
    history = make_history(random.Random(6))
    await append_all(store, [history])
    runner = ProjectionRunner(store, default_projections(), poll_interval=0.05, max_backoff=0.2)
    stop = asyncio.Event()
    caplog.set_level(logging.ERROR, logger="projections.runner")
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(lambda: [r for r in caplog.records if "42703" in r.getMessage()],
                         timeout=10, what="an ERROR naming the SQLSTATE")
        assert not task.done()
        # No projection was taken for poisoned by the runner's own SQL failing.
        assert runner.stopped == {}
        await _rename(owner_database_url, "applied", "events_applied")

        async def versions() -> list[int]:
            return [row["version"] for row in (await read_model(store))["workflows"]]

        await eventually(versions, lambda seen: seen == [len(history.events)], timeout=10,
                         what="the runner catching up once the schema is fixed")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
