"""Alerts: each kind is raised from its occurrence and received on its subject exactly once."""

from __future__ import annotations

import json
import random
import uuid
from datetime import timedelta

import nats

from events.catalogue import TaskStateChanged, WorkflowStateChanged
from events.relay import Relay
from events.store import EventStore
from projections.alerts import list_alerts, mark_delivered, pending_alerts
from projections.runner import ProjectionRunner, default_projections
from rebalancer.alerts import STREAM, AlertPublisher, RelayLagWatch
from tests.support.synthetic import make_history


async def one_history(store: EventStore, seed: int) -> str:
    # Fresh stream ids each run: alert keys name the workflow, and the session's JetStream
    # remembers keys it has seen (its dedupe window) across test runs.
    history = make_history(random.Random(f"{seed}-{uuid.uuid4()}"))
    version = 0
    # Only its creation and start: the test appends the moves that raise alerts itself.
    await store.append(history.stream_id, history.appends[0], version)
    return history.stream_id


async def escalate(store: EventStore, stream: str, code: str, message: str) -> None:
    version = await store.stream_version(stream)
    await store.append(stream, [
        TaskStateChanged(task_index=0, task_name="buy_in_source_spot", kind="trade",
                         trigger="submit", source="created", dest="submitting",
                         request_params={"client_id": "c"}),
        TaskStateChanged(task_index=0, task_name="buy_in_source_spot", kind="trade",
                         trigger="escalate", source="submitting", dest="needs_attention",
                         error={"code": code, "message": message}),
        WorkflowStateChanged(trigger="escalate", source="running", dest="needs_attention"),
    ], version)


async def fail(store: EventStore, stream: str) -> None:
    version = await store.stream_version(stream)
    await store.append(stream, [
        TaskStateChanged(task_index=0, task_name="buy_in_source_spot", kind="trade",
                         trigger="fail", source="created", dest="failed",
                         error={"code": "rejected", "message": "insufficient funds"}),
        WorkflowStateChanged(trigger="fail", source="running", dest="failed",
                             reason="task buy_in_source_spot failed: insufficient funds"),
    ], version)


async def test_each_alert_kind_arrives_once_on_its_subject(store: EventStore,
                                                            nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        publisher = AlertPublisher(store, js)
        await publisher.ensure_stream()
        await js.purge_stream(STREAM)
        failed, stuck, unknown = [await one_history(store, s) for s in (1, 2, 3)]
        await fail(store, failed)
        await escalate(store, stuck, "deadline", "withdraw_to_interim passed its deadline")
        await escalate(store, unknown, "unknown_outcome", "the exchange cannot tell")
        # A relay that has published nothing is behind; with no threshold it is lagging.
        relay = Relay(store, nats_url)
        watch = RelayLagWatch(store, relay, threshold=timedelta(0))
        assert await watch.check() is True
        assert await watch.check() is False  # the same episode fires once
        await ProjectionRunner(store, default_projections()).catch_up()

        assert await publisher.publish_pending() == 4
        assert await publisher.publish_pending() == 0
        # A crash between publishing and recording the delivery: sent again, deduplicated.
        pending = await list_alerts(store)
        await _forget_delivery(store, pending[0]["key"])
        assert await publisher.publish_pending() == 1

        received: dict[str, list[dict[str, object]]] = {}
        sub = await js.subscribe("rebalancer.alerts.>", ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    break
                received.setdefault(msg.subject, []).append(json.loads(msg.data))
        finally:
            await sub.unsubscribe()
        assert {s: len(v) for s, v in received.items()} == {
            "rebalancer.alerts.workflow_failed": 1, "rebalancer.alerts.task_stuck": 1,
            "rebalancer.alerts.needs_attention": 1, "rebalancer.alerts.relay_lag": 1}
        assert received["rebalancer.alerts.workflow_failed"][0]["workflow_id"] == (
            failed.removeprefix("workflow-"))
        assert received["rebalancer.alerts.task_stuck"][0]["task"] == "buy_in_source_spot"
        await relay.close()
    finally:
        await nc.drain()


async def test_a_rebuild_does_not_send_an_alert_again(store: EventStore) -> None:
    stream = await one_history(store, 4)
    await fail(store, stream)
    runner = ProjectionRunner(store, default_projections())
    await runner.catch_up()
    [alert] = await pending_alerts(store)
    await mark_delivered(store, alert["key"])
    from projections.replay import rebuild

    await rebuild(store)
    assert await pending_alerts(store) == []
    assert [a["kind"] for a in await list_alerts(store)] == ["workflow_failed"]


async def _forget_delivery(store: EventStore, key: str) -> None:
    async with store.connection() as conn:
        await conn.execute("delete from alert_deliveries where key = %s", (key,))
