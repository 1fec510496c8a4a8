"""`rebalancer demo --http`: it says where the dashboard is, the dashboard shows the demo's
workflow, and it stays up after the summary until interrupted."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp


async def test_the_demo_prints_the_dashboard_url_and_serves_it_until_interrupted(
        database_url: str, owner_database_url: str, nats_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env.update(REBALANCER_HOME=str(tmp_path / "home"), REBALANCER_DATABASE_URL=database_url,
               REBALANCER_MIGRATE_DATABASE_URL=owner_database_url,
               REBALANCER_NATS_URL=nats_url, REBALANCER_SIM_TIME_SCALE="1000")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rebalancer", "demo", "--json", "--http", "127.0.0.1:0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        lines: list[str] = []

        async def line_matching(pattern: str) -> re.Match[str]:
            while True:
                raw = await asyncio.wait_for(proc.stderr.readline(), 60)  # type: ignore[union-attr]
                assert raw, "the demo ended: " + "".join(lines)
                lines.append(raw.decode())
                found = re.search(pattern, lines[-1])
                if found:
                    return found

        url = (await line_matching(r"dashboard: (http://127\.0\.0\.1:\d+/)")).group(1)
        await line_matching(r"the dashboard stays up at ")
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                page = await response.text()
            assert response.status == 200
            found = re.search(r'href="/workflows/([0-9a-f-]{36})"', page)
            assert found, page[:2000]
            async with session.get(f"{url}workflows/{found.group(1)}") as response:
                assert response.status == 200
                assert "upbit_to_binance_sub_futures" in await response.text()
            async with session.get(f"{url}metrics") as response:
                assert response.status == 404  # the demo keeps no metrics
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, "".join(lines)
        assert json.loads(out)["state"] == "done"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
