"""The store while PostgreSQL is away: one WARNING when the outage begins, one when it ends."""

from __future__ import annotations

import asyncio
import logging

import pytest

from events.errors import StoreUnavailableError
from events.migrations import migrate
from events.store import EventStore
from tests.support import eventually
from tests.support.cluster import Cluster


async def test_a_postgresql_outage_is_one_warning_down_and_one_back_with_its_duration(
    cluster: Cluster, caplog: pytest.LogCaptureFixture,
) -> None:
    await migrate(cluster.url)
    store = await EventStore.open(cluster.url, max_size=2, connect_timeout=2)
    try:
        await store.head()
        caplog.set_level(logging.DEBUG, logger="events.store")
        await asyncio.to_thread(cluster.crash)
        failures = 0
        for _ in range(6):  # every follower's retry goes through the store: said once
            with pytest.raises(StoreUnavailableError):
                await store.head()
            failures += 1
            await asyncio.sleep(0.4)
        await asyncio.to_thread(cluster.start)
        # The pool reconnects with its own backoff: the first blocks may still fail, unsaid.
        await eventually(store.head, lambda _: True, timeout=30, what="the store again",
                         ignoring=(StoreUnavailableError,))
        for _ in range(3):
            await store.head()
    finally:
        await store.close()
    said = [r for r in caplog.records if r.name == "events.store" and r.levelno >= logging.WARNING]
    text = [r.getMessage() for r in said]
    assert failures == 6 and len(said) == 2, text
    assert "unreachable" in text[0] and cluster.url.split("port=")[1].split()[0] in text[0]
    assert float(text[1].split(" back after ")[1].removesuffix(" s")) >= 2.0, text
    assert not [r for r in said if r.exc_info]
