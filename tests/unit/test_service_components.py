"""serve's supervision: one TaskGroup; a component that fails or quits early stops them all."""

from __future__ import annotations

import asyncio

import pytest

from rebalancer.errors import ComponentFailedError
from rebalancer.service import run_components


async def _until(stop: asyncio.Event, seen: list[str], name: str) -> None:
    try:
        await stop.wait()
        seen.append(f"{name} stopped")
    except asyncio.CancelledError:
        seen.append(f"{name} canceled")
        raise


async def test_every_component_runs_until_stop_and_returns_cleanly() -> None:
    stop, seen = asyncio.Event(), []
    asyncio.get_running_loop().call_later(0.05, stop.set)
    await run_components([("a", lambda: _until(stop, seen, "a")),
                          ("b", lambda: _until(stop, seen, "b"))], stop)
    assert sorted(seen) == ["a stopped", "b stopped"]


async def test_a_failing_component_cancels_the_others_and_is_named() -> None:
    stop, seen = asyncio.Event(), []

    async def broken() -> None:
        await asyncio.sleep(0.02)
        raise RuntimeError("boom\nsecond line")

    with pytest.raises(ComponentFailedError, match=r"^relay failed: boom$"):
        await asyncio.wait_for(run_components(
            [("worker", lambda: _until(stop, seen, "worker")), ("relay", broken)], stop), 5)
    assert seen == ["worker canceled"]
    assert not stop.is_set()


async def test_a_component_that_returns_before_stop_is_a_failure() -> None:
    stop, seen = asyncio.Event(), []

    async def quits() -> None:
        return None

    with pytest.raises(ComponentFailedError, match="projections stopped before it was asked to"):
        await asyncio.wait_for(run_components(
            [("worker", lambda: _until(stop, seen, "worker")), ("projections", quits)], stop), 5)
    assert seen == ["worker canceled"]
