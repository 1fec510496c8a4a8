"""Prometheus metrics of one `serve` process (docs/contracts.md, "Metrics").

One `Metrics` per process, on a CollectorRegistry of its own: two services or two tests in one
interpreter never share or collide on a counter. What the process does itself (steps, exchange
calls, claims, webhook deliveries, alerts published) is counted where it happens. What the
database knows for every process at once (workflows by state, the schedule's backlog, the
followers' lag, alerts raised) is *sampled* by `MetricsSampler` every few seconds rather than
queried at scrape time: the exposition stays synchronous and cheap (prometheus-client's
collectors are synchronous, the store is async), scrapers never add load on PostgreSQL, and a
scrape during a database outage still answers, with the sample's age showing how stale it is.
Counting workflow transitions in-process instead would be wrong as soon as a second worker or
a restart is involved: the read model is the one place that knows every workflow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from events.store import EventStore
from events.vocabulary import WorkflowState
from projections.runner import default_projections
from rebalancer.alerts import keep_going
from rebalancer.exchanges.base import Exchange, Exchanges, WrappedPort

log = logging.getLogger(__name__)

# Steps run from a millisecond (the simulated world) to seconds (a live exchange, paced).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Counting a follower's tail stops here: after a long outage the number is "a lot", and a
# count of millions of rows every few seconds would itself slow the database down.
LAG_CAP = 1_000_000


@dataclass
class Sample:
    """What the sampler last read from the database; `at` 0: never."""

    at: float = 0.0
    workflows: dict[str, int] = field(default_factory=dict)
    backlog: int = 0
    claimed: int = 0
    projection_lag: dict[str, int] = field(default_factory=dict)
    relay_lag: dict[str, int] = field(default_factory=dict)
    alerts: dict[str, int] = field(default_factory=dict)


class Metrics:
    """Every metric of one process; `exposition()` is what /metrics serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = Counter("rebalancer_steps", "Steps the worker took, by task kind and"
                             " outcome", ["kind", "outcome"], registry=r)
        self.step_seconds = Histogram("rebalancer_step_seconds", "Duration of one step, by task"
                                      " kind", ["kind"], buckets=STEP_BUCKETS, registry=r)
        self.exchange_calls = Counter("rebalancer_exchange_calls", "Calls to an exchange port, by"
                                      " exchange and method", ["exchange", "method"], registry=r)
        self.exchange_errors = Counter("rebalancer_exchange_errors", "Exchange calls that raised,"
                                       " by exchange, method and error class",
                                       ["exchange", "method", "error"], registry=r)
        self.exchange_seconds = Histogram("rebalancer_exchange_call_seconds", "Duration of one"
                                          " exchange call (after its request budget)",
                                          ["exchange"], buckets=STEP_BUCKETS, registry=r)
        self.claims = Counter("rebalancer_schedule_claims", "Workflows this worker claimed from"
                              " the schedule", registry=r)
        self.alerts_published = Counter("rebalancer_alerts_published", "Alerts published to NATS"
                                        " by this process, by kind", ["kind"], registry=r)
        self.webhook_deliveries = Counter("rebalancer_webhook_deliveries", "Webhook attempts, by"
                                          " sink and outcome (delivered, failed, gave_up)",
                                          ["sink", "outcome"], registry=r)
        self.sample = Sample()
        r.register(_Sampled(self))

    def step(self, kind: str, outcome: str, seconds: float) -> None:
        self.steps.labels(kind, outcome).inc()
        self.step_seconds.labels(kind).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Sampled(Collector):
    """The database's numbers as the sampler last read them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        s = self.metrics.sample
        states = GaugeMetricFamily("rebalancer_workflows", "Workflows in the read model, by"
                                   " state", labels=["state"])
        # Every state, zeros included: a rate or an alert rule on a series that vanishes at 0
        # would see "no data" instead of 0.
        for state in WorkflowState:
            states.add_metric([state.value], s.workflows.get(state.value, 0))
        yield states
        yield GaugeMetricFamily("rebalancer_schedule_backlog", "Workflows due and not claimed by"
                                " any worker", value=s.backlog)
        yield GaugeMetricFamily("rebalancer_schedule_claimed", "Workflows held by a claim in force",
                                value=s.claimed)
        lag = GaugeMetricFamily("rebalancer_projection_lag_events", "Events stored after a"
                                " projection's checkpoint", labels=["projection"])
        for name, behind in sorted(s.projection_lag.items()):
            lag.add_metric([name], behind)
        yield lag
        relay = GaugeMetricFamily("rebalancer_relay_lag_events", "Events stored after the relay's"
                                  " checkpoint (not yet on NATS)", labels=["relay"])
        for name, behind in sorted(s.relay_lag.items()):
            relay.add_metric([name], behind)
        yield relay
        raised = CounterMetricFamily("rebalancer_alerts_raised", "Alert occurrences recorded in"
                                     " the database, by kind", labels=["kind"])
        for kind, count in sorted(s.alerts.items()):
            raised.add_metric([kind], count)
        yield raised
        yield GaugeMetricFamily("rebalancer_metrics_sampled_timestamp_seconds", "When the"
                                " database's numbers above were read (0: not yet)", value=s.at)


# -- the sampler --------------------------------------------------------------------------------

_BEHIND = (
    "select count(*) from (select 1 from events e"
    " where (e.transaction_id, e.position) > (%s::xid8, %s::bigint) limit %s) tail"
)


class MetricsSampler:
    """Reads the database's numbers into `metrics.sample`; `sample_once` is one round."""

    def __init__(self, store: EventStore, metrics: Metrics, relays: tuple[str, ...] = ()) -> None:
        self.store = store
        self.metrics = metrics
        # Relays reported even before their first checkpoint (everything is behind then).
        self.relays = relays

    async def sample_once(self) -> None:
        s = Sample()
        async with self.store.connection() as conn:
            cur = await conn.execute("select state, count(*) from workflows group by state")
            s.workflows = {str(state): int(n) for state, n in await cur.fetchall()}
            cur = await conn.execute(
                "select count(*) filter (where next_run_at <= now() and (claimed_by is null"
                " or claim_expires_at < now())),"
                " count(*) filter (where claimed_by is not null and claim_expires_at >= now())"
                " from workflow_schedule")
            row = await cur.fetchone()
            s.backlog, s.claimed = (int(row[0]), int(row[1])) if row else (0, 0)
            s.projection_lag = await self._lags(conn, "projection_checkpoints",
                                                tuple(p.name for p in default_projections()))
            s.relay_lag = await self._lags(conn, "relay_checkpoints", self.relays)
            cur = await conn.execute(
                "select kind, count(*) from (select kind from alerts"
                " union all select kind from service_alerts) a group by kind")
            s.alerts = {str(kind): int(n) for kind, n in await cur.fetchall()}
        s.at = time.time()
        self.metrics.sample = s

    async def _lags(self, conn: Any, table: str, expected: tuple[str, ...]) -> dict[str, int]:
        cur = await conn.execute(f"select name, transaction_id::text, position from {table}")
        marks = {str(n): (str(t), int(p)) for n, t, p in await cur.fetchall()}
        for name in expected:
            marks.setdefault(name, ("0", 0))
        lags: dict[str, int] = {}
        for name, (transaction_id, position) in marks.items():
            cur = await conn.execute(_BEHIND, (transaction_id, position, LAG_CAP))
            row = await cur.fetchone()
            lags[name] = int(row[0]) if row else 0
        return lags

    async def run(self, stop: asyncio.Event, interval: float = 5.0) -> None:
        """Sample every `interval` until `stop`; never ends for a failure."""
        await keep_going("metrics not sampled", self.sample_once, stop, interval)


# -- exchange calls -----------------------------------------------------------------------------


class MeteredExchanges:
    """Exchanges whose every async call is counted, timed, and on a raise counted by the
    error's class; results and exceptions pass through untouched."""

    def __init__(self, inner: Exchanges, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self._ports: dict[str, Exchange] = {}

    def for_account(self, account: str) -> Exchange:
        port = self._ports.get(account)
        if port is None:
            port = self._ports[account] = cast(
                Exchange, _MeteredPort(self.inner.for_account(account), self.metrics))
        return port


class _MeteredPort(WrappedPort):
    def __init__(self, inner: Exchange, metrics: Metrics) -> None:
        super().__init__(inner)
        self._metrics = metrics

    def wrap(self, name: str, target: Callable[..., Awaitable[Any]]
             ) -> Callable[..., Awaitable[Any]]:
        return _metered(target, self._metrics, self.exchange, name)


def _metered(target: Callable[..., Awaitable[Any]], metrics: Metrics, exchange: str,
             method: str) -> Callable[..., Awaitable[Any]]:
    calls = metrics.exchange_calls.labels(exchange, method)
    seconds = metrics.exchange_seconds.labels(exchange)

    async def call(*args: Any, **kwargs: Any) -> Any:
        calls.inc()
        started = time.perf_counter()
        try:
            return await target(*args, **kwargs)
        except Exception as e:
            # The class, never the message: messages may quote a URL or an amount, and the
            # classes are a small fixed set (rebalancer/errors.py), good labels.
            metrics.exchange_errors.labels(exchange, method, type(e).__name__).inc()
            raise
        finally:
            seconds.observe(time.perf_counter() - started)

    return call
