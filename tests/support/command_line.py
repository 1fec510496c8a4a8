"""The command line as an operator runs it: `python -m rebalancer ...` in a subprocess, against an
API answering on real NATS (the one `serve` would run), for tests of what a user types."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats

from events.store import EventStore
from rebalancer.accounts import Accounts, load_accounts
from rebalancer.api import Api, serve_api
from rebalancer.exchanges.base import Exchanges
from rebalancer.specs.loading import builtin_specs

ROOT = Path(__file__).resolve().parents[2]


async def cli(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """`rebalancer ARGS` with `env` over this process's: exit status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rebalancer", *args, env={**os.environ, **env}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_command(env: dict[str, str], command: str) -> tuple[int, str, str]:
    """A command exactly as the service printed it (an attention's `commands`)."""
    argv = shlex.split(command)
    assert argv[0] == "rebalancer"
    return await cli(env, *argv[1:])


@asynccontextmanager
async def api_on_nats(store: EventStore, database_url: str, nats_url: str, home: Path, *,
                      accounts: Accounts | None = None, exchanges: Exchanges | None = None,
                      specs: Callable[[], Any] = builtin_specs,
                      ) -> AsyncIterator[dict[str, str]]:
    """The command line's environment, with the API answering on NATS (and asking
    `exchanges` where a command looks something up)."""
    nc = await nats.connect(nats_url)
    api = Api(store, accounts or load_accounts(), specs, exchanges=exchanges)
    subscriptions = await serve_api(api, nc)
    try:
        yield {"REBALANCER_DATABASE_URL": database_url, "REBALANCER_NATS_URL": nats_url,
               "REBALANCER_HOME": str(home)}
    finally:
        for sub in subscriptions:
            await sub.unsubscribe()
        await nc.drain()
