"""`serve --http` in-process on real PostgreSQL, NATS and the simulated world, and a headless
Chromium (Debian's, driven by Playwright) to look at its dashboard."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from rebalancer.service import serve
from rebalancer.settings import Settings
from rebalancer.web import Bind, Dashboard
from tests.support import eventually

TOKEN = "op-token-3b9f1c7d2e8a4f60b5c1"  # the tests' operator token: never in a page
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@dataclass
class Served:
    dashboard: Dashboard
    settings: Settings
    database_url: str
    nats_url: str | None

    @property
    def url(self) -> str:
        return self.dashboard.url


@contextlib.asynccontextmanager
async def serving(settings: Settings, database_url: str, nats_url: str | None,
                  **options: Any) -> AsyncIterator[Served]:
    """`serve` with its dashboard on an ephemeral loopback port, stopped at the end."""
    built: list[Dashboard] = []
    stop = asyncio.Event()
    running = asyncio.create_task(serve(settings, database_url, nats_url, tick=0.05, stop=stop,
                                        http=Bind("127.0.0.1", 0), on_dashboard=built.append,
                                        **options))

    async def listening() -> bool:
        if running.done():
            running.result()  # raises what ended it
        return bool(built) and built[0].started.is_set()

    try:
        await eventually(listening, timeout=30, what="the dashboard listening")
        yield Served(built[0], settings, database_url, nats_url)
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)


def settings_for(tmp_path: Path, *, token: str | None = TOKEN, time_scale: float = 1000.0,
                 **more: Any) -> Settings:
    return Settings(sim_time_scale=time_scale, home=tmp_path / "home",
                    operator_token=SecretStr(token) if token else None, **more)


@pytest.fixture
async def served(database_url: str, nats_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    async with serving(settings_for(tmp_path), database_url, nats_url) as found:
        yield found


def _require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (make test does)")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium headless (no browser download: the system binary)."""
    _require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


Probe = Callable[[], Any]
