"""`serve` while NATS goes away and comes back: one WARNING each way, no traceback per attempt."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import nats
import pytest

from events.migrations import migrate
from rebalancer.service import serve
from rebalancer.settings import Settings
from tests.support import NatsServer, eventually

SETTINGS = Settings(sim_time_scale=1000.0)


async def _api_answers(url: str) -> bool:
    try:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
    except Exception:
        return False
    try:
        msg = await nc.request("rebalancer.query.workflows", json.dumps({}).encode(), timeout=1)
        return bool(json.loads(msg.data).get("ok"))
    except Exception:
        return False
    finally:
        await nc.close()


async def test_a_nats_outage_is_one_warning_down_and_one_back_with_its_duration(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    await migrate(database_url)
    server = NatsServer.jetstream(tmp_path / "js")
    server.start()
    stop = asyncio.Event()
    running = asyncio.create_task(serve(SETTINGS, database_url, server.url, tick=0.05, stop=stop))
    try:
        await eventually(lambda: _api_answers(server.url), timeout=30, what="the API")
        caplog.clear()
        caplog.set_level(logging.DEBUG)
        server.stop()
        await asyncio.sleep(4)  # several reconnect attempts, each once a second
        server.start()
        await eventually(lambda: _api_answers(server.url), timeout=30, what="the API again")
        await asyncio.sleep(1.5)  # the relay's next round sees NATS back too
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        server.stop()
    during = [r for r in caplog.records if r.levelno >= logging.WARNING]
    text = [r.getMessage() for r in during]
    assert [t for t in text if "unreachable; reconnecting" in t] == [
        f"NATS at 127.0.0.1:{server.port} unreachable; reconnecting"], text
    back = [t for t in text if " back after " in t]
    assert len(back) == 1 and float(back[0].split(" back after ")[1].removesuffix(" s")) >= 3.5
    assert len(during) == 2, text
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records
                                                          if r.exc_info]
