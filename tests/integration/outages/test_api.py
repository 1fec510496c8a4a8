"""The command API while PostgreSQL is away: a prompt `ok: false` reply, never silence."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from events.migrations import migrate
from events.store import EventStore
from rebalancer.accounts import load_accounts
from rebalancer.api import Api, serve_api
from rebalancer.specs.loading import builtin_specs
from tests.integration.test_api import PARAMS, SPEC
from tests.support import NatsServer, eventually
from tests.support.cluster import Cluster

REPLY_WITHIN = 2.0


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer.jetstream(tmp_path / "js") as server:
        yield server


def assert_unavailable(reply: dict[str, Any]) -> None:
    assert reply["ok"] is False, reply
    # The contract's codes have no "unavailable": `internal`, marked retryable.
    assert reply["error"]["code"] == "internal"
    assert reply["error"]["details"] == {"retryable": True, "cause": "database_unavailable"}
    assert "command_id" in reply["error"]["message"]


async def test_a_request_during_an_outage_gets_a_retryable_error_and_a_repeat_applies_once(
    cluster: Cluster, nats_server: NatsServer
) -> None:
    await migrate(cluster.url)
    store = await EventStore.open(cluster.url, max_size=4)
    api = Api(store, load_accounts(), builtin_specs, reply_within=REPLY_WITHIN)
    nc = await nats.connect(nats_server.url)
    try:
        await serve_api(api, nc)

        async def ask(subject: str, body: dict[str, Any]) -> dict[str, Any]:
            msg = await nc.request(subject, json.dumps(body).encode(), timeout=10)
            reply: dict[str, Any] = json.loads(msg.data)
            return reply

        start = {"command_id": f"outage-{uuid.uuid4()}", "spec": SPEC, "params": PARAMS}
        await asyncio.to_thread(cluster.crash)
        for subject, body in (("rebalancer.cmd.start", start),
                              ("rebalancer.query.workflows", {}),
                              ("rebalancer.cmd.start", start)):
            began = time.monotonic()
            assert_unavailable(await ask(subject, body))
            assert time.monotonic() - began < REPLY_WITHIN + 1.5
        await asyncio.to_thread(cluster.start)
        # Once the pool has reconnected, the repeat is applied, and only once.
        reply = await eventually(lambda: ask("rebalancer.cmd.start", start),
                                 lambda r: r["ok"], timeout=30, what="the API answering again")
        again = await ask("rebalancer.cmd.start", start)
        assert again["workflow_id"] == reply["workflow_id"] and again["created"] is False
        created = [e for e in await store.events_of_command(start["command_id"])
                   if e.type == "WorkflowCreated"]
        assert len(created) == 1
    finally:
        await nc.close()
        await store.close()

