"""`/readyz`: whether this process can do its work now, and if not, which part cannot.

Ready means PostgreSQL answers, NATS is connected (when the process relays), and the
projections and the relay are within their lag thresholds. Each check says what it found, so
the JSON body tells an operator (or an orchestrator's log) which one failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from events.errors import EventStoreError
from events.relay import Relay
from events.store import EventStore
from projections.runner import default_projections

CHECK_WITHIN = 2.0  # seconds a check may take before it counts as failed

# Per projection: how old its oldest unapplied event is (none: caught up). A projection with
# no checkpoint row yet (its runner never ran) is at the origin: behind by every event.
_PROJECTION_LAG = (
    "select n.name, c.error, (select min(e.recorded_at) from events e"
    " where (e.transaction_id, e.position) > (coalesce(c.transaction_id, '0'),"
    " coalesce(c.position, 0))) as oldest"
    " from unnest(%s::text[]) n(name) left join projection_checkpoints c on c.name = n.name"
    " order by n.name"
)
PROJECTIONS = tuple(p.name for p in default_projections())


@dataclass(frozen=True)
class Readiness:
    store: EventStore
    relay: Relay | None
    projection_lag_seconds: float
    relay_lag_seconds: float
    # Whether NATS is connected; None when this process runs without NATS.
    nats_connected: Callable[[], bool | None] = lambda: None

    async def check(self, now: datetime | None = None) -> tuple[bool, dict[str, Any]]:
        """(ready, the body): one entry per check with `ok` and what it found."""
        now = now or datetime.now(UTC)
        checks: dict[str, Any] = {"database": await self._database()}
        connected = self.nats_connected()
        if connected is not None:
            checks["nats"] = {"ok": connected,
                              **({} if connected else {"error": "not connected to NATS"})}
        if checks["database"]["ok"]:
            checks["projections"] = await self._projections(now)
            if self.relay is not None:
                checks["relay"] = await self._relay(now)
        else:
            why = {"ok": False, "error": "unknown: the database is unavailable"}
            checks["projections"] = why
            if self.relay is not None:
                checks["relay"] = why
        ready = all(c["ok"] for c in checks.values())
        return ready, {"ready": ready, "checks": checks}

    async def _database(self) -> dict[str, Any]:
        try:
            await asyncio.wait_for(self.store.fetch_rows("select 1", ()), CHECK_WITHIN)
        except TimeoutError:
            return {"ok": False, "error": f"no answer within {CHECK_WITHIN:g} s"}
        except EventStoreError as e:
            return {"ok": False, "error": str(e).splitlines()[0]}
        return {"ok": True}

    async def _projections(self, now: datetime) -> dict[str, Any]:
        try:
            rows = await asyncio.wait_for(self.store.fetch_dicts(_PROJECTION_LAG,
                                                                  (list(PROJECTIONS),)),
                                          CHECK_WITHIN)
        except (TimeoutError, EventStoreError) as e:
            return {"ok": False, "error": str(e).splitlines()[0] if str(e) else "timed out"}
        found: dict[str, Any] = {}
        for row in rows:
            lag = 0.0 if row["oldest"] is None else max(
                0.0, (now - row["oldest"]).total_seconds())
            entry: dict[str, Any] = {"lag_seconds": round(lag, 3),
                                     "ok": lag <= self.projection_lag_seconds}
            if row["error"]:
                entry.update(ok=False, error=f"stopped by a poison event: {row['error']}")
            elif not entry["ok"]:
                entry["error"] = (f"behind by more than {self.projection_lag_seconds:g} s")
            found[row["name"]] = entry
        return {"ok": all(e["ok"] for e in found.values()), "projections": found}

    async def _relay(self, now: datetime) -> dict[str, Any]:
        assert self.relay is not None
        try:
            lag = await asyncio.wait_for(self.relay.lag(), CHECK_WITHIN)
        except (TimeoutError, EventStoreError) as e:
            return {"ok": False, "error": str(e).splitlines()[0] if str(e) else "timed out"}
        oldest = lag.oldest_unpublished_at
        seconds = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        entry: dict[str, Any] = {"ok": seconds <= self.relay_lag_seconds,
                                 "events_behind": lag.events_behind,
                                 "lag_seconds": round(seconds, 3)}
        if not entry["ok"]:
            entry["error"] = f"behind by more than {self.relay_lag_seconds:g} s"
        return entry
