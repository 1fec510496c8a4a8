"""Alert webhooks: every alert occurrence POSTed once to each sink that takes its kind.

The outbox (table webhook_deliveries, migration 015) has one row per (alert key, sink). A
round enqueues the alerts raised since the sink was first started, then claims due rows one
at a time: the claim counts the attempt and leases the row for the attempt's timeout (a second
`serve` skips it; a process that dies mid-POST leaves it to the lease's end). A 2xx records the
delivery; anything else is retried after a doubling backoff, up to the sink's `max_attempts`.
A crash between the receiver's 2xx and the record re-sends that one alert: the receiver can
tell by the `X-Rebalancer-Alert-Key` header (the same for every attempt of one occurrence).

Nothing here ends or blocks `serve`: every attempt is bounded by its timeout, a sink that
fails stops only its own round, and a failure is one WARNING line naming the sink and the
alert, never the URL (it carries the token).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from psycopg.rows import dict_row

from events.store import EventStore
from rebalancer.alerts import body_of, keep_going
from rebalancer.metrics import Metrics
from rebalancer.sinks import WebhookTarget

log = logging.getLogger(__name__)

MAX_BACKOFF = 600.0
# Deliveries one sink makes in one round: the others' rounds are not held up by a backlog.
ROUND_LIMIT = 50
_ALERTS = ("(select key, kind, workflow_id, task, message, since, details from alerts"
           " union all select key, kind, workflow_id, task, message, since, details"
           " from service_alerts)")

# A sink takes a kind from the moment it is first started with it; a kind it no longer takes
# is forgotten, so taking it again later starts afresh.
_REGISTER = ("insert into webhook_sinks (name, kind) select %s, unnest(%s::text[])"
             " on conflict (name, kind) do nothing")
_FORGET = "delete from webhook_sinks where name = %s and kind <> all(%s::text[])"
_ENQUEUE = (
    f"insert into webhook_deliveries (alert_key, sink) select a.key, s.name from {_ALERTS} a"
    " join webhook_sinks s on s.name = %s and s.kind = a.kind and a.since >= s.registered_at"
    " on conflict (alert_key, sink) do nothing"
)
_CLAIM = (
    "with claimed as ("
    " update webhook_deliveries d set attempts = d.attempts + 1,"
    " next_attempt_at = now() + make_interval(secs => %s)"
    " where (d.alert_key, d.sink) = (select alert_key, sink from webhook_deliveries"
    "  where sink = %s and delivered_at is null and gave_up_at is null"
    "  and next_attempt_at <= now()"
    # Only rows whose alert is there to send: one gone (the read model being rebuilt) waits,
    # instead of being claimed again and again, its attempts spent on nothing.
    f"  and exists (select 1 from {_ALERTS} x where x.key = webhook_deliveries.alert_key)"
    "  order by next_attempt_at, alert_key"
    "  limit 1 for update skip locked)"
    " returning d.alert_key, d.attempts)"
    " select c.attempts, a.key, a.kind, a.workflow_id::text as workflow_id, a.task, a.message,"
    f" a.since, a.details from claimed c join {_ALERTS} a on a.key = c.alert_key"
)
_DELIVERED = ("update webhook_deliveries set delivered_at = now(), last_error = null"
              " where alert_key = %s and sink = %s")
_FAILED = ("update webhook_deliveries set last_error = %s,"
           " next_attempt_at = now() + make_interval(secs => %s),"
           " gave_up_at = case when %s then now() end"
           " where alert_key = %s and sink = %s")


def slack_body(alert: dict[str, Any]) -> bytes:
    """A Slack incoming-webhook body: `text` (what notifications show) and blocks."""
    kind, workflow_id, task = alert["kind"], alert["workflow_id"], alert["task"]
    where = "the service"
    if workflow_id:
        where = f"workflow {workflow_id[:8]}" + (f" task {task}" if task else "")
    message = str(alert["message"])
    blocks: list[dict[str, Any]] = [{
        "type": "section",
        "text": {"type": "mrkdwn", "text": f"*{kind}* {_escape(where)}\n{_escape(message)}"},
    }]
    commands = (alert.get("details") or {}).get("commands") or []
    if commands:
        blocks.append({"type": "section", "text": {
            "type": "mrkdwn", "text": "```" + _escape("\n".join(map(str, commands))) + "```"}})
    blocks.append({"type": "context", "elements": [{
        "type": "mrkdwn",
        "text": _escape(f"since {alert['since'].isoformat()} · key {alert['key']}")}]})
    return json.dumps({"text": _escape(f"[{kind}] {where}: {message}"),
                       "blocks": blocks}).encode()


def _escape(text: str) -> str:
    # Slack's mrkdwn reads <...> as links and mentions: what we quote stays text.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def backoff(base: float, failures: int) -> float:
    return float(min(MAX_BACKOFF, base * 2 ** max(0, failures - 1)))


class WebhookDispatcher:
    """Delivers the outbox to every target; `deliver_pending` is one round, `run` loops."""

    def __init__(self, store: EventStore, targets: list[WebhookTarget],
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.targets = targets
        self.metrics = metrics or Metrics()
        self._session: aiohttp.ClientSession | None = None
        self._registered = False

    async def deliver_pending(self) -> int:
        """Enqueue what is new, then deliver what is due; the number delivered."""
        async with self.store.connection() as conn:
            for target in self.targets:
                if not self._registered:
                    kinds = list(target.sink.taken())
                    await conn.execute(_FORGET, (target.name, kinds))
                    await conn.execute(_REGISTER, (target.name, kinds))
                await conn.execute(_ENQUEUE, (target.name,))
        self._registered = True
        # Every sink's round ends before the next round begins, even when one of them raised
        # (the database away): never two rounds of one sink at once.
        done = await asyncio.gather(*(self._round(t) for t in self.targets),
                                    return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        return sum(n for n in done if isinstance(n, int))

    async def _round(self, target: WebhookTarget) -> int:
        delivered = 0
        sink = target.sink
        # The lease outlasts the attempt's own timeout: nobody else takes it meanwhile.
        lease = sink.timeout_seconds + 10
        for _ in range(ROUND_LIMIT):
            async with self.store.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(_CLAIM, (lease, target.name))
                alert = await cur.fetchone()
            if alert is None:
                break
            error = await self._post(target, alert)
            key, attempts = alert["key"], int(alert["attempts"])
            if error is None:
                async with self.store.connection() as conn:
                    await conn.execute(_DELIVERED, (key, target.name))
                self.metrics.webhook_deliveries.labels(target.name, "delivered").inc()
                delivered += 1
                continue
            give_up = attempts >= sink.max_attempts
            delay = backoff(sink.backoff_seconds, attempts)
            async with self.store.connection() as conn:
                await conn.execute(_FAILED, (error, delay, give_up, key, target.name))
            if give_up:
                self.metrics.webhook_deliveries.labels(target.name, "gave_up").inc()
                log.warning("webhook %s: gave up on alert %s after %d attempts: %s",
                            target.name, key, attempts, error)
            else:
                self.metrics.webhook_deliveries.labels(target.name, "failed").inc()
                log.warning("webhook %s: alert %s not delivered (attempt %d of %d): %s;"
                            " next in %.1f s", target.name, key, attempts, sink.max_attempts,
                            error, delay)
            # A sink that failed once is likely down: the rest of its round waits for the next.
            break
        return delivered

    async def _post(self, target: WebhookTarget, alert: dict[str, Any]) -> str | None:
        """None when the receiver took it (2xx); else what went wrong, without the URL."""
        body = slack_body(alert) if target.sink.format == "slack" else body_of(alert)
        headers = {"Content-Type": "application/json", "X-Rebalancer-Alert-Key": alert["key"]}
        timeout = aiohttp.ClientTimeout(total=target.sink.timeout_seconds)
        try:
            async with self.session.post(target.url, data=body, headers=headers,
                                         timeout=timeout, allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {target.sink.timeout_seconds:g} s"
        except aiohttp.ClientConnectorError as e:
            # The class and the OS's reason only: aiohttp's own text quotes host and URL.
            return f"cannot connect: {e.os_error.strerror or type(e.os_error).__name__}"
        except Exception as e:
            return type(e).__name__

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Deliver every `interval` until `stop`; never ends for a failure."""
        try:
            await keep_going("alert webhooks not delivered", self.deliver_pending, stop,
                             interval)
        finally:
            await self.close()
