"""What the followers cost: SQL statements per appended event for runner, relay and alerts.

A private PostgreSQL with pg_stat_statements preloaded takes a steady stream of single-event
appends to many streams while `serve`'s followers (projection runner, relay, alert publisher,
relay-lag watch) keep up; every statement the server executed is then counted by what issued
it. Run: python -m tests.bench.bench_followers [--events N] [--rate R]; NATS from
REBALANCER_NATS_URL, else the embedded one under .rebalancer-bench.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

from events.migrations import migrate
from events.relay import Relay
from events.store import EventStore, NewEvent
from projections.runner import ProjectionRunner, default_projections
from tests.bench.common import HOME
from tests.support.cluster import Cluster

# Stream life: created, started, one spot<->futures transfer through its states, done.
TRANSFER = {"from_account": "a", "to_account": "b", "currency": "USDT", "amount": "10"}
STEPS: list[tuple[str, dict[str, Any]]] = [
    ("WorkflowStateChanged", {"trigger": "start", "source": "created", "dest": "running"}),
    ("TaskStateChanged", {"task_index": 0, "task_name": "move", "kind": "transfer",
                          "trigger": "submit", "source": "created", "dest": "submitting",
                          "request_params": TRANSFER}),
    ("TaskStateChanged", {"task_index": 0, "task_name": "move", "kind": "transfer",
                          "trigger": "accept", "source": "submitting", "dest": "requested",
                          "request_result": {"id": "x"}}),
    ("TaskStateChanged", {"task_index": 0, "task_name": "move", "kind": "transfer",
                          "trigger": "complete", "source": "requested", "dest": "done",
                          "refresh_result": {"result": {"amount": "10"}}}),
    ("WorkflowStateChanged", {"trigger": "complete", "source": "running", "dest": "done"}),
]


def created() -> NewEvent:
    return NewEvent("WorkflowCreated", {
        "spec_name": "bench", "spec": {"tasks": [{"name": "move", "kind": "transfer"}]},
        "params": {}, "command_id": str(uuid.uuid4())})


def kind_of(query: str) -> str:
    q = " ".join(query.lower().split())
    for marker, kind in (
        ("append_events", "append"), ("pg_notify", "append (notify)"),
        ("pg_stat_statements", "-"), ("projection_checkpoints", "projection checkpoints"),
        ("relay_checkpoints", "relay checkpoints"), ("advisory", "relay lock"),
        ("pg_snapshot_xmin", "global reads"), ("alert", "alerts"), ("listen", "listen"),
        ("workflows", "projection: workflows"), ("exposure", "projection: exposure"),
    ):
        if marker in q:
            return kind
    if q in ("begin", "commit", "rollback") or q.startswith(("savepoint", "release")):
        return "BEGIN/COMMIT"
    return q[:60]


async def measure(url: str, nats_url: str, events: int, rate: float) -> Counter[str]:
    from rebalancer.alerts import AlertPublisher, RelayLagWatch
    from rebalancer.api import connect

    await migrate(url)
    store = await EventStore.open(url, max_size=12)
    runner = ProjectionRunner(store, default_projections())
    relay = Relay(store, nats_url, name=f"bench-{uuid.uuid4().hex[:6]}")
    nc = await connect(nats_url, name="bench")
    publisher = AlertPublisher(store, nc.jetstream())
    await publisher.ensure_stream()
    watch = RelayLagWatch(store, relay, threshold=timedelta(seconds=30))
    stop = asyncio.Event()
    followers = [asyncio.create_task(c) for c in (
        runner.run(stop), relay.run(stop), publisher.run(stop), watch.run(stop))]
    await asyncio.sleep(1.0)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute("select pg_stat_statements_reset()")
        streams = [f"workflow-{uuid.uuid4()}" for _ in range(events // (len(STEPS) + 1) + 1)]
        versions = dict.fromkeys(streams, 0)
        sent, started = 0, time.monotonic()
        # Round-robin over the streams: each append is one event to a different stream.
        while sent < events:
            for stream in streams:
                v = versions[stream]
                if v > len(STEPS) or sent >= events:
                    continue
                event = created() if v == 0 else NewEvent(*STEPS[v - 1])
                await store.append(stream, [event], v)
                versions[stream] = v + 1
                sent += 1
                delay = started + sent / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        head = await store.head()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses = await runner.status()
            if all(s.checkpoint == head for s in statuses) and await relay.checkpoint() == head:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*followers)
        cur = await admin.execute(
            "select query, calls from pg_stat_statements"
            " where dbid = (select oid from pg_database where datname = current_database())")
        counts: Counter[str] = Counter()
        for query, calls in await cur.fetchall():
            counts[kind_of(query)] += calls
    await nc.drain()
    await store.close()
    counts.pop("-", None)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="appends per second")
    args = parser.parse_args()
    nats_url = os.environ.get("REBALANCER_NATS_URL")
    if not nats_url:
        from rebalancer import embedded

        nats_url = embedded.up(HOME).nats_url
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="bench-followers-")),
                      extra_conf="shared_preload_libraries = 'pg_stat_statements'\n"
                                 "pg_stat_statements.track_utility = on\n")
    cluster.start()
    try:
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            conn.execute("create extension if not exists pg_stat_statements")
        counts = asyncio.run(measure(cluster.url, nats_url, args.events, args.rate))
    finally:
        cluster.destroy()
    appends = counts.get("append", 0)
    followers = {k: v for k, v in counts.items() if not k.startswith("append")}
    print(f"{args.events} single-event appends at {args.rate:g}/s to many streams;"
          " statements counted by pg_stat_statements")
    for kind, calls in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:32} {calls:8d}  {calls / args.events:6.2f} per event")
    total = sum(followers.values())
    print(f"  followers in all: {total} = {total / args.events:.2f} per appended event"
          f" (appends: {appends})")


if __name__ == "__main__":
    main()
