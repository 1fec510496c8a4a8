"""`rebalancer serve`: the worker and the projections in one process, one exit stack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import Accounts, load_accounts
from rebalancer.engine import Engine
from rebalancer.errors import InfraError
from rebalancer.exchanges.base import Exchanges
from rebalancer.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a running process holds: the store, the exchanges and the accounts."""

    store: EventStore
    exchanges: Exchanges
    accounts: Accounts


@contextlib.asynccontextmanager
async def runtime(settings: Settings, database_url: str) -> AsyncIterator[Runtime]:
    """Open every resource in one exit stack, closed in reverse order whatever happens."""
    async with contextlib.AsyncExitStack() as stack:
        store = await EventStore.open(database_url, max_size=12)
        stack.push_async_callback(store.close)
        accounts = load_accounts(settings.config)
        exchanges = await open_exchanges(settings, database_url, accounts, stack)
        yield Runtime(store, exchanges, accounts)


async def open_exchanges(
    settings: Settings, database_url: str, accounts: Accounts, stack: contextlib.AsyncExitStack
) -> Exchanges:
    if settings.exchanges != "simulated":
        raise InfraError(
            f"REBALANCER_EXCHANGES={settings.exchanges!r}: only the simulated world is wired yet"
        )
    from rebalancer.exchanges.simulated import SimulatedWorld

    world = await SimulatedWorld.open(database_url, accounts=accounts, world=settings.sim_world)
    stack.push_async_callback(world.close)
    return world


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`: the pass in flight finishes, then the process exits."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(settings: Settings, database_url: str, *, tick: float = 0.5) -> None:
    """Run the worker and the projection runner until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    async with runtime(settings, database_url) as rt:
        engine = Engine(rt.store, rt.exchanges, rt.accounts)
        runner = ProjectionRunner(rt.store, default_projections())
        log.info("serving as %s", engine.owner)
        await asyncio.gather(engine.run(stop, tick=tick), runner.run(stop))
    log.info("stopped")
