"""`serve`, the API, the CLI and a JetStream subscriber on a 3-node NATS cluster whose streams
are replicated R3; the node leading the events' stream is SIGKILLed mid-run, and the subscriber
still receives every stored event exactly once, in the table's order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import psycopg
from nats.js.api import AckPolicy, ConsumerConfig

from events.relay import STREAM, Subscriber
from events.relay.anchors import CHAIN_STREAM
from events.relay.servers import connect_options
from events.store import EventStore
from rebalancer import api
from rebalancer.alerts import STREAM as ALERT_STREAM
from rebalancer.embedded.permissions import NATS_OPERATOR, NATS_SUBSCRIBER, inbox_prefix
from tests.support import SEED_PARAMS, SEED_SPEC, eventually, load, write_world
from tests.support.nats_cluster import NatsCluster
from tests.support.worker import Worker as InProcess

ROOT = Path(__file__).resolve().parents[2]
BEFORE_KILL = 6  # workflows started through the API before the node dies
# Slow enough that workflows are still moving (and the relay publishing) when the node dies.
TIME_SCALE = "100"
FAULTS = "latency_ms=20"
DURABLE = "sub_1"  # one of the durables the subscriber user may read (permissions.py)
JS_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)


def environment(database_url: str, nats_url: str, world: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env.update(REBALANCER_DATABASE_URL=database_url, REBALANCER_NATS_URL=nats_url,
               REBALANCER_NATS_STREAM_REPLICAS="3", REBALANCER_HOME=str(home),
               REBALANCER_SIM_WORLD=str(world), REBALANCER_SIM_TIME_SCALE=TIME_SCALE,
               REBALANCER_SIM_FAULTS=FAULTS, PYTHONUNBUFFERED="1")
    return env


def start_serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "rebalancer", "serve", "--tick", "0.1"],
                                cwd=ROOT, env=env, stdout=out, stderr=out)


def table_positions(database_url: str) -> list[int]:
    """Every stored event's position in the global order the relay publishes in
    (docs/contracts.md §1: commit order, then position; not position alone)."""
    with psycopg.connect(database_url) as conn:
        return [int(p) for (p,) in conn.execute(
            "select position from events order by transaction_id, position")]


async def connected(url: str, user: str) -> Any:
    """A client that fails over between the cluster's nodes for as long as the test runs."""
    return await nats.connect(**connect_options(url), inbox_prefix=inbox_prefix(user),
                              max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                              connect_timeout=2)


async def consume(nc: Any, received: list[int], stats: dict[str, int]) -> None:
    """What a subscriber does: read the operator-made durable; on a failover error (no
    JetStream leader yet, a reconnect) enter it again, resuming its version bookkeeping."""
    seen: dict[str, int] = {}
    while True:
        try:
            async with Subscriber(nc, durable=DURABLE, seen=seen, idle_heartbeat=0.5) as events:
                try:
                    while True:
                        received.append((await events.next()).position)
                finally:
                    seen = events.last_versions
                    stats["duplicates_dropped"] += events.duplicates_dropped
                    stats["gaps"] += len(events.gaps)
        except JS_ERRORS:
            stats["reentries"] += 1
            await asyncio.sleep(0.2)


async def test_a_three_node_cluster_loses_a_node_and_the_subscriber_misses_nothing(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={"upbit-personal": {"KRW": "100000000"}})
    async with InProcess(database_url, world=world):
        pass  # the first process to open the world seeds its tables
    with NatsCluster(tmp_path / "nats") as cluster:
        operator = await connected(cluster.url(NATS_OPERATOR), NATS_OPERATOR)
        js = operator.jetstream(timeout=2)
        await eventually(js.account_info, timeout=30, ignoring=JS_ERRORS,
                         what="the cluster's JetStream answering")
        log = tmp_path / "serve.log"
        serve = start_serve(
            environment(database_url, cluster.url(NATS_OPERATOR), world, tmp_path), log)
        subscriber = None
        reader: asyncio.Task[None] | None = None
        try:
            info = await eventually(lambda: js.stream_info(STREAM), timeout=30,
                                    ignoring=(*JS_ERRORS, nats.js.errors.NotFoundError),
                                    what="serve making the events' stream")
            assert info.config.num_replicas == 3 and info.cluster is not None
            # Three peers (before a leader is elected all three are listed as replicas).
            peers = {peer.name for peer in info.cluster.replicas or []}
            assert peers | {info.cluster.leader} >= {"n1", "n2", "n3"}, info.cluster
            await js.add_consumer(STREAM, ConsumerConfig(
                durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0))
            # The subscriber's list starts at another node than the operator's.
            subscriber = await connected(cluster.url(NATS_SUBSCRIBER, first=1), NATS_SUBSCRIBER)
            received: list[int] = []
            stats: Counter[str] = Counter()
            reader = asyncio.create_task(consume(subscriber, received, stats))

            ids = []
            for i in range(BEFORE_KILL):
                reply = await api.request(cluster.url(NATS_OPERATOR), "rebalancer.cmd.start", {
                    "command_id": f"cluster-{uuid.uuid4()}", "spec": SEED_SPEC,
                    "params": {**SEED_PARAMS, "from_amount": str(200_000 + i)}})
                assert reply["ok"], reply
                ids.append(reply["workflow_id"])
            await eventually(lambda: len(received) >= 10, timeout=30,
                             what="the subscriber receiving the first events")
            led = await eventually(lambda: js.stream_info(STREAM), timeout=10,
                                   until=lambda i: i.cluster and i.cluster.leader,
                                   ignoring=JS_ERRORS, what="the stream's leader")
            leader = str(led.cluster.leader)
            victim = int(leader.removeprefix("n")) - 1
            moving = [w for w in ids if (await load(store, w)).state not in ("done", "failed")]
            assert moving, "every workflow had ended before the node died"
            cluster.nodes[victim].kill()

            # The CLI, its server list starting at the dead node, starts one more and follows
            # it to the end over the survivors.
            env = environment(database_url, cluster.url(NATS_OPERATOR, first=victim), world,
                              tmp_path)
            cli = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "rebalancer", "start", SEED_SPEC, "--wait", "--json",
                 "--timeout", "40", *(f"--param={k}={v}" for k, v in SEED_PARAMS.items()),
                 "--param=from_amount=300000"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            assert cli.returncode == 0, cli.stderr
            started = json.loads(cli.stdout)
            assert started["state"] == "done"
            ids.append(started["workflow_id"])

            flows = await eventually(
                lambda: asyncio.gather(*(load(store, w) for w in ids)),
                lambda fs: all(f.state in ("done", "failed", "needs_attention") for f in fs),
                timeout=40, interval=0.2, what="every workflow ending",
                describe=lambda fs: Counter(f.state for f in fs))
            assert [f.state for f in flows] == ["done"] * len(ids), [f.reason for f in flows]
            stored = await asyncio.to_thread(table_positions, database_url)
            await eventually(lambda: len(received) >= len(stored), timeout=30, interval=0.1,
                             what="the subscriber catching up with the table",
                             describe=lambda _: (len(received), len(stored)))
            await asyncio.sleep(1.0)  # a late duplicate would arrive now
            twice = [p for p, n in Counter(received).items() if n > 1]
            assert not twice, f"received more than once: {twice}"
            assert set(received) == set(stored), f"missing: {sorted(set(stored) - set(received))}"
            assert received == stored, "each stored event once, in the store's global order"
            assert stats["gaps"] == 0
            # JetStream itself holds each event once (the relay's dedupe ids), on R3.
            info = await eventually(lambda: js.stream_info(STREAM), ignoring=JS_ERRORS)
            assert info.state.messages == len(stored)
            for name in (CHAIN_STREAM, ALERT_STREAM):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    replicated = await js.stream_info(name)
                    assert replicated.config.num_replicas == 3, name
            assert serve.poll() is None, log.read_text()[-3000:]
            print(f"node {leader} killed with {len(moving)} workflow(s) moving;"
                  f" {len(stored)} events received once each; subscriber re-entries"
                  f" {stats['reentries']}, duplicates dropped {stats['duplicates_dropped']}")
        finally:
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=20)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
            for client in (subscriber, operator):
                if client is not None:
                    await client.close()
