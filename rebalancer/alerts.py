"""Alerts to NATS: `rebalancer.alerts.<kind>`, each occurrence delivered once.

The `alerts` read model holds one row per occurrence (a failed workflow, an escalated task,
a relay falling behind). This publisher sends the undelivered ones through a JetStream stream
with the occurrence key as `Nats-Msg-Id`, then records the delivery: a crash between the two
re-publishes, and JetStream drops the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from events.errors import StoreQueryError, StoreUnavailableError
from events.relay import Relay
from events.store import EventStore
from projections.alerts import mark_delivered, pending_alerts, raise_alert
from projections.runner import backoff

if TYPE_CHECKING:
    from rebalancer.metrics import Metrics

log = logging.getLogger(__name__)

STREAM = "REBALANCER_ALERTS"
SUBJECTS = "rebalancer.alerts.>"
MAX_BACKOFF = 30.0  # seconds between rounds after failures in a row


def alert_stream(replicas: int = 1) -> StreamConfig:
    """REBALANCER_ALERTS, with `replicas` copies on a cluster (Settings.nats_stream_replicas)."""
    return StreamConfig(
        name=STREAM, subjects=[SUBJECTS], storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS, duplicate_window=600.0,
        max_age=90 * 24 * 3600.0, num_replicas=replicas,
    )


def body_of(alert: dict[str, Any]) -> bytes:
    body = {
        "kind": alert["kind"], "workflow_id": alert["workflow_id"], "task": alert["task"],
        "message": alert["message"], "since": alert["since"].isoformat(), "key": alert["key"],
    }
    # Additive: a needs_attention's candidates and the commands that would settle it.
    body.update(alert.get("details") or {})
    return json.dumps(body).encode()


class AlertPublisher:
    """Sends undelivered alerts; `publish_pending` is one round, `run` loops until stopped."""

    def __init__(self, store: EventStore, js: JetStreamContext,
                 metrics: Metrics | None = None, *, replicas: int = 1) -> None:
        self.store = store
        self.js = js
        self.metrics = metrics
        self.replicas = replicas
        self._stream_ready = False

    async def ensure_stream(self) -> None:
        config = alert_stream(self.replicas)
        try:
            await self.js.add_stream(config)
        except Exception:
            await self.js.update_stream(config)
        self._stream_ready = True

    async def publish_pending(self) -> int:
        if not self._stream_ready:
            await self.ensure_stream()
        sent: list[str] = []
        try:
            for alert in await pending_alerts(self.store):
                await self.js.publish(f"rebalancer.alerts.{alert['kind']}", body_of(alert),
                                      headers={"Nats-Msg-Id": alert["key"]}, timeout=5)
                sent.append(alert["key"])
                if self.metrics is not None:
                    self.metrics.alerts_published.labels(alert["kind"]).inc()
        finally:
            # One statement for the round; what JetStream took is recorded even if a later
            # publish failed (a crash before this re-publishes, and JetStream drops the copy).
            if sent:
                await mark_delivered(self.store, *sent)
        return len(sent)

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Publish every `interval` until `stop`; never ends for a failure (see keep_going)."""
        await keep_going("alerts not published yet", self.publish_pending, stop, interval)


class RelayLagWatch:
    """Raises one `relay_lag` alert per episode of the relay being behind by more than
    `threshold`; the episode ends when the relay has caught up."""

    def __init__(self, store: EventStore, relay: Relay, threshold: timedelta) -> None:
        self.store = store
        self.relay = relay
        self.threshold = threshold
        self.episode: datetime | None = None

    async def check(self, now: datetime | None = None) -> bool:
        """True when this check raised a new alert."""
        lag = await self.relay.lag()
        now = now or datetime.now(UTC)
        oldest = lag.oldest_unpublished_at
        if lag.events_behind == 0 or oldest is None:
            self.episode = None
            return False
        if now - oldest < self.threshold or self.episode is not None:
            return False
        self.episode = oldest
        return await raise_alert(
            self.store, f"relay_lag:{oldest.isoformat()}", "relay_lag",
            f"the relay to NATS is {lag.events_behind} events behind; the oldest unpublished"
            f" was recorded at {oldest.isoformat()}", oldest)

    async def run(self, stop: asyncio.Event, interval: float = 5.0) -> None:
        """Check every `interval` until `stop`; never ends for a failure (see keep_going)."""
        await keep_going("relay lag not checked", self.check, stop, interval)


async def keep_going(what: str, once: Callable[[], Awaitable[object]], stop: asyncio.Event,
                      interval: float) -> None:
    # A follower that ended would end `serve` and the worker with it. NATS or PostgreSQL away
    # is a WARNING; a statement PostgreSQL refuses, or any other failure, is an ERROR with its
    # traceback. Either way the next round comes later and later (up to 30 s), and it comes.
    failures = 0
    while not stop.is_set():
        try:
            await once()
            failures = 0
        except StoreQueryError as e:
            failures += 1
            log.error("%s: PostgreSQL refused a statement (SQLSTATE %s): %s", what, e.sqlstate,
                      e, exc_info=True)
        except StoreUnavailableError as e:
            failures += 1
            log.warning("%s: %s", what, e)
        except Exception as e:  # NATS away, mostly: nothing is lost, try again
            failures += 1
            log.warning("%s: %s: %s", what, type(e).__name__, e)
        delay = backoff(interval, failures, MAX_BACKOFF) if failures else interval
        await _sleep_or_stop(stop, delay)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
