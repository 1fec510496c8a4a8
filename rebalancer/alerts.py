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
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from events.errors import StoreQueryError
from events.relay import Relay
from events.store import EventStore
from projections.alerts import mark_delivered, pending_alerts, raise_alert

log = logging.getLogger(__name__)

STREAM = "REBALANCER_ALERTS"
SUBJECTS = "rebalancer.alerts.>"


def alert_stream() -> StreamConfig:
    return StreamConfig(
        name=STREAM, subjects=[SUBJECTS], storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS, duplicate_window=600.0,
        max_age=90 * 24 * 3600.0,
    )


def body_of(alert: dict[str, Any]) -> bytes:
    return json.dumps({
        "kind": alert["kind"], "workflow_id": alert["workflow_id"], "task": alert["task"],
        "message": alert["message"], "since": alert["since"].isoformat(), "key": alert["key"],
    }).encode()


class AlertPublisher:
    """Sends undelivered alerts; `publish_pending` is one round, `run` loops until stopped."""

    def __init__(self, store: EventStore, js: JetStreamContext) -> None:
        self.store = store
        self.js = js

    async def ensure_stream(self) -> None:
        try:
            await self.js.add_stream(alert_stream())
        except Exception:
            await self.js.update_stream(alert_stream())

    async def publish_pending(self) -> int:
        sent = 0
        for alert in await pending_alerts(self.store):
            await self.js.publish(f"rebalancer.alerts.{alert['kind']}", body_of(alert),
                                  headers={"Nats-Msg-Id": alert["key"]}, timeout=5)
            await mark_delivered(self.store, alert["key"])
            sent += 1
        return sent

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                await self.publish_pending()
            except StoreQueryError as e:  # a SQL bug: retrying would only hide it
                log.error("alerts: PostgreSQL refused a statement (SQLSTATE %s), stopping: %s",
                          e.sqlstate, e)
                raise
            except Exception as e:  # NATS or PostgreSQL away: nothing is lost, try again
                log.warning("alerts not published yet: %s", e)
            await _sleep_or_stop(stop, interval)


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
        while not stop.is_set():
            try:
                await self.check()
            except StoreQueryError as e:
                log.error("relay lag watch: PostgreSQL refused a statement (SQLSTATE %s),"
                          " stopping: %s", e.sqlstate, e)
                raise
            except Exception as e:
                log.warning("relay lag not checked: %s", e)
            await _sleep_or_stop(stop, interval)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
