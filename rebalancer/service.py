"""`rebalancer serve`: worker, projections, relay, command API and alerts in one process.

Money keeps moving when NATS is away: the worker and projections need only PostgreSQL; the
relay catches up and the API answers again once NATS is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from events.relay import Relay
from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import Accounts, load_accounts, spec_dirs
from rebalancer.alerts import AlertPublisher, RelayLagWatch
from rebalancer.api import Api, NatsUnavailableError, connect, serve_api
from rebalancer.engine import Engine
from rebalancer.errors import InfraError
from rebalancer.exchanges.base import Exchanges
from rebalancer.settings import Settings
from rebalancer.specs.loading import available_specs
from rebalancer.specs.models import WorkflowSpec

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

    world = await SimulatedWorld.open(
        database_url, accounts=accounts, world=settings.sim_world, faults=settings.sim_faults,
        seed=settings.sim_seed, time_scale=settings.sim_time_scale,
    )
    stack.push_async_callback(world.close)
    return world


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`: the pass in flight finishes, then the process exits."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(settings: Settings, database_url: str, nats_url: str | None, *,
                tick: float = 0.5) -> None:
    """Run everything until SIGTERM/SIGINT; steps in flight finish, NATS is drained.

    Without `nats_url` only the worker and the projections run (nothing is relayed)."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    async with runtime(settings, database_url) as rt:
        engine = Engine(rt.store, rt.exchanges, rt.accounts, follow_projections=False)
        runner = ProjectionRunner(rt.store, default_projections())
        log.info("serving as %s", engine.owner)
        if nats_url is None:
            await asyncio.gather(engine.run(stop, tick=tick), runner.run(stop))
            return
        relay = Relay(rt.store, nats_url)
        try:
            await asyncio.gather(
                engine.run(stop, tick=tick), runner.run(stop), relay.run(stop),
                _nats_side(settings, rt, nats_url, relay, stop),
            )
        finally:
            await relay.close()
    log.info("stopped")


async def _nats_side(settings: Settings, rt: Runtime, nats_url: str, relay: Relay,
                     stop: asyncio.Event) -> None:
    """The command API, alerts and the relay-lag watch, once NATS can be reached."""
    nc = None
    while nc is None and not stop.is_set():
        try:
            nc = await connect(nats_url, name="rebalancer-serve")
        except NatsUnavailableError as e:
            log.warning("%s; the worker goes on, the API waits", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=2.0)
    if nc is None:
        return
    try:
        api = Api(rt.store, rt.accounts, lambda: configured_specs(settings, rt.accounts))
        await serve_api(api, nc)
        publisher = AlertPublisher(rt.store, nc.jetstream())
        await publisher.ensure_stream()
        watch = RelayLagWatch(rt.store, relay,
                              threshold=timedelta(seconds=settings.relay_lag_seconds))
        await asyncio.gather(publisher.run(stop), watch.run(stop))
    finally:
        await nc.drain()


def configured_specs(settings: Settings, accounts: Accounts) -> dict[str, WorkflowSpec]:
    """The built-in specs and those in the configuration's `specs:` directories."""
    return available_specs(spec_dirs(settings.config), accounts)
