"""`rebalancer serve`: worker, projections, relay, command API and alerts in one process.

Money keeps moving when NATS is away: the worker and projections need only PostgreSQL; the
relay catches up and the API answers again once NATS is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from events.database import first_line
from events.relay import Relay
from events.relay.anchors import load_key
from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import Accounts, load_accounts, spec_dirs
from rebalancer.alerts import AlertPublisher, RelayLagWatch
from rebalancer.api import Api, NatsUnavailableError, connect, serve_api, where
from rebalancer.budgets import BudgetedExchanges, Budgets
from rebalancer.engine import Engine
from rebalancer.errors import ComponentFailedError
from rebalancer.exchanges.base import Exchanges
from rebalancer.exchanges.live import LiveExchanges, exchange_mode
from rebalancer.metrics import MeteredExchanges, Metrics, MetricsSampler
from rebalancer.settings import Settings, chain_key_path
from rebalancer.sinks import webhook_targets
from rebalancer.specs.loading import SpecCatalogue, available_specs
from rebalancer.web import Bind, Dashboard, listen
from rebalancer.web.app import Exposition
from rebalancer.web.operator import operator_token
from rebalancer.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)

# The relay's checkpoint row (relay_checkpoints.name); its lag is a metric from the start.
RELAY_NAME = "jetstream"


@dataclass
class Runtime:
    """What a running process holds: the store, the exchanges and the accounts."""

    store: EventStore
    exchanges: Exchanges
    accounts: Accounts
    settings: Settings
    budgets: Budgets
    # Poll intervals are shrunk by this for a simulated world whose clock runs faster.
    poll_scale: float = 1.0

    def engine(self, owner: str | None = None, *, follow_projections: bool = False,
               metrics: Metrics | None = None) -> Engine:
        """The worker for these exchanges and accounts, as the settings size it."""
        return Engine(
            self.store, self.exchanges, self.accounts, owner=owner,
            follow_projections=follow_projections, poll_scale=self.poll_scale,
            concurrency=self.settings.worker_concurrency,
            lease_seconds=self.settings.claim_seconds, max_failures=self.settings.max_failures,
            budgets=self.budgets, metrics=metrics,
        )


@contextlib.asynccontextmanager
async def runtime(settings: Settings, database_url: str) -> AsyncIterator[Runtime]:
    """Open every resource in one exit stack, closed in reverse order whatever happens."""
    async with contextlib.AsyncExitStack() as stack:
        store = await EventStore.open(database_url, max_size=12)
        stack.push_async_callback(store.close)
        accounts = load_accounts(settings.config)
        # The engine's request budgets pace every call the service makes (Runtime.engine).
        exchanges = await open_exchanges(settings, database_url, accounts, stack, paced=True)
        live = isinstance(exchanges, LiveExchanges)
        yield Runtime(store, exchanges, accounts, settings,
                      Budgets.from_settings(settings, accounts),
                      1.0 if live else 1 / settings.sim_time_scale)


async def open_exchanges(
    settings: Settings, database_url: str, accounts: Accounts, stack: contextlib.AsyncExitStack,
    *, paced: bool = False,
) -> Exchanges:
    """The live connectors or the simulated world, as the configuration says (never both);
    raises SpecError for a configuration that mixes them or misses a credential. `paced`: the
    caller puts every call through request budgets (ccxt's own limiter is then off)."""
    if exchange_mode(settings, accounts) == "live":
        live = LiveExchanges.from_config(accounts, settings.config, paced=paced)
        stack.push_async_callback(live.close)
        return live
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


# A component is a name and the coroutine that runs it until `stop`.
Component = tuple[str, Callable[[], Awaitable[None]]]


async def serve(settings: Settings, database_url: str, nats_url: str | None, *,
                tick: float = 0.5, stop: asyncio.Event | None = None,
                metrics: Metrics | None = None, http: Bind | None = None,
                listener: socket.socket | None = None,
                on_dashboard: Callable[[Dashboard], None] | None = None) -> None:
    """Run everything until SIGTERM/SIGINT (or `stop`); steps in flight finish, NATS is drained.

    Without `nats_url` only the worker, the projections, the metrics sampler and the alert
    webhooks run (nothing is relayed). `metrics`: the process's (the HTTP side serves its
    `exposition()`); made here when not given. With `http`, the dashboard, /healthz, /readyz
    and /metrics listen there (on `listener` when the caller bound it already); `on_dashboard`
    is told of it once built. Raises SpecError for a bad `alerts:` section, operator token or an
    address that cannot be bound before anything starts, and ComponentFailedError, after
    stopping the others, when one component ends unexpectedly.
    """
    metrics = metrics or Metrics()
    # Read before anything runs: a webhook whose URL is missing is a configuration error now,
    # not a WARNING an hour later when the first alert cannot go out.
    targets = webhook_targets(settings.config)
    token = operator_token(settings) if http is not None else None
    # Bound before any component starts: a port in use is refused with nothing to stop.
    if http is not None and listener is None:
        listener = listen(http)
    # One stack for every resource, closed in reverse: NATS drained (its subscriptions, the
    # API's among them, end with it), then the relay, then the exchanges and the store.
    async with contextlib.AsyncExitStack() as stack:
        if listener is not None:
            # Last to close (the dashboard's server closes it too; not when it never ran).
            stack.callback(listener.close)
        if stop is None:
            stop = asyncio.Event()
            stop_on_signals(stop)
        rt = await stack.enter_async_context(runtime(settings, database_url))
        engine = rt.engine(metrics=metrics)
        runner = ProjectionRunner(rt.store, default_projections())
        sampler = MetricsSampler(rt.store, metrics,
                                 relays=(RELAY_NAME,) if nats_url is not None else ())
        log.info("serving as %s", engine.owner)
        components: list[Component] = [
            ("worker", lambda: engine.run(stop, tick=tick)),
            ("projections", lambda: runner.run(stop)),
            ("metrics", lambda: sampler.run(stop)),
        ]
        if targets:
            webhooks = WebhookDispatcher(rt.store, targets, metrics)
            components.append(("webhooks", lambda: webhooks.run(stop)))
        relay: Relay | None = None
        if nats_url is not None:
            key = load_key(chain_key_path(settings), create=True)
            relay = Relay(rt.store, nats_url, chain_key=key, name=RELAY_NAME,
                          replicas=settings.nats_stream_replicas)
            stack.push_async_callback(relay.close)
            components += [
                ("relay", lambda: relay.run(stop)),
                ("nats", lambda: _nats_side(settings, rt, nats_url, relay, stop, stack,
                                            metrics)),
            ]
        if http is not None:
            dashboard = build_dashboard(settings, rt, http, token=token, relay=relay,
                                        metrics=metrics, listener=listener)
            if on_dashboard is not None:
                on_dashboard(dashboard)
            components.append(("http", lambda: dashboard.run(stop)))
        await run_components(components, stop)
    log.info("stopped")


async def run_components(components: list[Component], stop: asyncio.Event) -> None:
    """Run every component in one TaskGroup until `stop`; if one raises, or returns before
    `stop`, the others are cancelled and ComponentFailedError names it."""
    try:
        async with asyncio.TaskGroup() as group:
            for name, run in components:
                group.create_task(_supervised(name, run, stop), name=name)
    except* ComponentFailedError as failed:
        # The first to fail is the cause; the others were cancelled because of it.
        raise failed.exceptions[0] from None


async def _supervised(name: str, run: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
    log.info("%s started", name)
    try:
        await run()
    except asyncio.CancelledError:
        log.info("%s canceled", name)
        raise
    except Exception as e:
        log.error("%s failed", name, exc_info=True)
        raise ComponentFailedError(f"{name} failed: {first_line(e)}") from e
    if not stop.is_set():
        raise ComponentFailedError(f"{name} stopped before it was asked to")
    log.info("%s stopped", name)


async def _nats_side(settings: Settings, rt: Runtime, nats_url: str, relay: Relay,
                     stop: asyncio.Event, stack: contextlib.AsyncExitStack,
                     metrics: Metrics) -> None:
    """The command API, alerts and the relay-lag watch, once NATS can be reached."""
    nc = None
    attempts = 0
    while nc is None and not stop.is_set():
        # The client retries a first connect for ever: race it against the stop, so that a
        # SIGTERM while NATS has never answered still ends `serve`.
        attempt = asyncio.ensure_future(connect(nats_url, name="rebalancer-serve"))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
        if not attempt.done():
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
            return
        try:
            nc = attempt.result()
        except NatsUnavailableError as e:
            attempts += 1  # said once: the attempts every 2 s after it are DEBUG
            log.log(logging.WARNING if attempts == 1 else logging.DEBUG,
                    "%s; the worker goes on, the API waits", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=2.0)
    if nc is None:
        return
    if attempts:
        log.warning("NATS at %s reached after %d attempts; the API serves", where(nats_url),
                    attempts + 1)
    stack.push_async_callback(_drain, nc)
    # The engine's buckets; its calls counted in the same metrics as the worker's.
    api = Api(rt.store, rt.accounts, WarnedSpecs(settings, rt.accounts),
              exchanges=BudgetedExchanges(MeteredExchanges(rt.exchanges, metrics), rt.budgets))
    await serve_api(api, nc)
    # Makes its stream on its first round.
    publisher = AlertPublisher(rt.store, nc.jetstream(), metrics,
                               replicas=settings.nats_stream_replicas)
    watch = RelayLagWatch(rt.store, relay, threshold=timedelta(seconds=settings.relay_lag_seconds))
    await asyncio.gather(publisher.run(stop), watch.run(stop))


async def _drain(nc: Any) -> None:
    """Drain the connection; a stop while NATS is away cannot drain it, so it is closed."""
    try:
        await nc.drain()
    except Exception as e:  # nats-py raises several unrelated types for "not connected"
        log.info("NATS connection closed without draining: %s", type(e).__name__)
        await nc.close()


def build_dashboard(settings: Settings, rt: Runtime, bind: Bind, *, token: str | None,
                    relay: Relay | None, metrics: Metrics | None = None,
                    listener: socket.socket | None = None) -> Dashboard:
    """The dashboard on this process's store, accounts and exchanges (the engine's budgets;
    its calls counted in `metrics`, whose exposition it serves at /metrics). NATS counts as
    connected when the relay's connection is up: the relay is what must reach it."""
    exchanges = rt.exchanges if metrics is None else MeteredExchanges(rt.exchanges, metrics)
    exposition: Exposition | None = None if metrics is None else metrics.exposition
    return Dashboard(
        rt.store, rt.accounts, WarnedSpecs(settings, rt.accounts),
        BudgetedExchanges(exchanges, rt.budgets), bind, token=token, relay=relay,
        nats_connected=(lambda: None) if relay is None else (lambda: relay.connected),
        projection_lag_seconds=settings.projection_lag_seconds,
        relay_lag_seconds=settings.relay_lag_seconds, metrics=exposition, listener=listener,
        hosts=frozenset(h.strip().lower() for h in settings.http_hosts.split(",") if h.strip()))


def configured_specs(settings: Settings, accounts: Accounts) -> SpecCatalogue:
    """The built-in specs and those in the configuration's `specs:` directories; a broken file
    is in `.broken` and leaves the others usable."""
    return available_specs(spec_dirs(settings.config), accounts)


class WarnedSpecs:
    """The API's `specs`: read afresh on every request (a fixed file is picked up without a
    restart), each broken file logged once as a WARNING rather than on every request."""

    def __init__(self, settings: Settings, accounts: Accounts) -> None:
        self.settings = settings
        self.accounts = accounts
        self._warned: set[tuple[str, str]] = set()

    def __call__(self) -> SpecCatalogue:
        catalogue = configured_specs(self.settings, self.accounts)
        for broken in catalogue.broken:
            key = (str(broken.file), broken.error)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("spec file %s is broken, skipped: %s", broken.file, broken.error)
        return catalogue
