"""`/readyz` while PostgreSQL is down and while NATS is away: 503 naming the part, and ready
again once it is back; `/healthz` answers throughout (the process is up)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from events.migrations import migrate
from tests.integration.web.conftest import serving, settings_for
from tests.support import NatsServer, eventually
from tests.support.cluster import Cluster


async def probe(url: str) -> tuple[int, dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as r:
        return r.status, json.loads(await r.text())


async def test_readyz_fails_while_postgresql_is_down_or_nats_is_away(
        cluster: Cluster, tmp_path: Path) -> None:
    await migrate(cluster.url)
    with NatsServer.jetstream(tmp_path / "js") as nats:
        async with serving(settings_for(tmp_path), cluster.url, nats.url) as served:
            ready, health = served.url + "readyz", served.url + "healthz"
            await eventually(lambda: probe(ready), lambda r: r[0] == 200, timeout=30,
                             what="ready at first")

            await asyncio.to_thread(cluster.crash)
            _, body = await eventually(lambda: probe(ready), lambda r: r[0] == 503,
                                       timeout=20, what="not ready while PG is down")
            checks = body["checks"]
            assert body["ready"] is False and checks["database"]["ok"] is False
            assert checks["database"]["error"]
            assert checks["projections"]["ok"] is False  # unknown without the database
            assert checks["nats"]["ok"] is True  # the one that is fine says so
            assert await probe(health) == (200, {"ok": True})

            await asyncio.to_thread(cluster.start)
            await eventually(lambda: probe(ready), lambda r: r[0] == 200, timeout=60,
                             what="ready again once PG is back")

            nats.stop()
            _, body = await eventually(lambda: probe(ready), lambda r: r[0] == 503,
                                       timeout=20, what="not ready while NATS is away")
            assert body["checks"]["nats"] == {"ok": False, "error": "not connected to NATS"}
            assert body["checks"]["database"]["ok"] is True
            nats.start()
            await eventually(lambda: probe(ready), lambda r: r[0] == 200, timeout=60,
                             what="ready again once NATS is back")
