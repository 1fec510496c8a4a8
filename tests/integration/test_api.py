"""The command API: strict bodies, the replies of docs/contracts.md §3, idempotency, real NATS."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import load_accounts
from rebalancer.api import MAX_BODY, ROUTES, Api, serve_api
from rebalancer.specs.loading import builtin_specs
from tests.support import event_count

CODES = {"invalid_request", "unknown_spec", "not_found", "illegal_transition", "conflict",
         "unauthorized", "internal"}
SPEC = "upbit_to_binance_sub_futures"
PARAMS = {"from_account": "upbit-personal", "to_account": "binance-corp-sub",
          "from_currency": "KRW", "interim_currency": "ETH", "to_currency": "USDT",
          "from_amount": "1000000"}


def api_for(store: EventStore) -> Api:
    return Api(store, load_accounts(), builtin_specs)


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


async def test_start_then_query_then_control(store: EventStore) -> None:
    api = api_for(store)
    reply = await api.handle("rebalancer.cmd.start",
                             body({"command_id": "s1", "spec": SPEC, "params": PARAMS}))
    assert reply["ok"] is True and reply["created"] is True
    workflow_id = reply["workflow_id"]
    await ProjectionRunner(store, default_projections()).catch_up()
    found = await api.handle("rebalancer.query.workflow", body({"workflow_id": workflow_id}))
    assert found["ok"] and found["workflow"]["state"] == "created"
    listed = await api.handle("rebalancer.query.workflows", body({"state": "created"}))
    assert [w["workflow_id"] for w in listed["workflows"]] == [workflow_id]
    canceled = await api.handle("rebalancer.cmd.cancel",
                                body({"command_id": "c1", "workflow_id": workflow_id}))
    assert canceled == {"ok": True, "workflow_id": workflow_id, "state": "canceled"}


async def test_a_repeated_start_returns_the_first_workflow_and_appends_nothing(
    store: EventStore,
) -> None:
    api = api_for(store)
    request = body({"command_id": "same", "spec": SPEC, "params": PARAMS})
    first = await api.handle("rebalancer.cmd.start", request)
    events = await event_count(store)
    again = await api.handle("rebalancer.cmd.start", request)
    assert again["workflow_id"] == first["workflow_id"]
    assert await event_count(store) == events


@pytest.mark.parametrize(
    ("subject", "payload", "code"),
    [
        ("rebalancer.cmd.start", {"command_id": "x", "spec": "nope", "params": PARAMS},
         "unknown_spec"),
        ("rebalancer.cmd.start", {"command_id": "x", "spec": SPEC,
                                  "params": {**PARAMS, "from_amount": "-5"}}, "invalid_request"),
        ("rebalancer.cmd.start", {"command_id": "x", "spec": SPEC,
                                  "params": {**PARAMS, "from_amount": "0"}}, "invalid_request"),
        ("rebalancer.cmd.start", {"command_id": "x", "spec": SPEC,
                                  "params": {**PARAMS, "from_amount": 1.5}}, "invalid_request"),
        ("rebalancer.cmd.start", {"command_id": "x", "spec": SPEC,
                                  "params": {**PARAMS, "to_account": "binance-nobody"}},
         "invalid_request"),
        ("rebalancer.cmd.start", {"command_id": "x", "spec": SPEC, "params": PARAMS,
                                  "priority": "high"}, "invalid_request"),
        ("rebalancer.cmd.pause", {"command_id": "x"}, "invalid_request"),
        ("rebalancer.cmd.pause", {"command_id": "x", "workflow_id": str(uuid.uuid4())},
         "not_found"),
        ("rebalancer.cmd.resolve", {"command_id": "x", "workflow_id": str(uuid.uuid4()),
                                    "task": "t", "outcome": "maybe", "note": ""},
         "invalid_request"),
        ("rebalancer.cmd.explode", {"command_id": "x"}, "invalid_request"),
    ],
)
async def test_bad_requests_get_a_clear_code_and_change_nothing(
    store: EventStore, subject: str, payload: dict[str, Any], code: str
) -> None:
    reply = await api_for(store).handle(subject, body(payload))
    assert reply["ok"] is False
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    assert await event_count(store) == 0


async def test_oversized_and_non_json_bodies_are_refused(store: EventStore) -> None:
    api = api_for(store)
    big = body({"command_id": "x", "spec": SPEC, "params": {"p": "x" * (MAX_BODY + 10)}})
    assert (await api.handle("rebalancer.cmd.start", big))["error"]["code"] == "invalid_request"
    for raw in (b"", b"{", b"\xff\xfe", b"[]", b"null", b'"start"'):
        reply = await api.handle("rebalancer.cmd.start", raw)
        assert reply["error"]["code"] == "invalid_request", raw
    assert await event_count(store) == 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
BAD_AMOUNTS = st.sampled_from(["-1", "0", "-0.0", "NaN", "Infinity", "abc", "", "1,000", "0x10"])


def _near_valid(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid body with one thing broken, so validation is exercised field by field."""
    kind = draw(st.sampled_from(["amount", "extra", "missing", "type", "account", "spec"]))
    payload: dict[str, Any] = {"command_id": draw(st.text(min_size=1, max_size=10)),
                               "spec": SPEC, "params": dict(PARAMS)}
    if kind == "amount":
        payload["params"]["from_amount"] = draw(BAD_AMOUNTS)
    elif kind == "extra":
        payload[draw(st.sampled_from(["x", "workflow_id", "Spec"]))] = draw(JSON)
    elif kind == "missing":
        del payload[draw(st.sampled_from(["command_id", "spec", "params"]))]
    elif kind == "type":
        payload[draw(st.sampled_from(["command_id", "spec", "params"]))] = draw(
            st.integers() | st.lists(st.integers(), max_size=2) | st.none())
    elif kind == "account":
        payload["params"]["from_account"] = draw(
            st.text(max_size=12).filter(lambda s: s not in load_accounts().accounts))
    else:
        payload["spec"] = draw(st.text(min_size=1, max_size=12).filter(lambda s: s != SPEC))
    return "rebalancer.cmd.start", body(payload)


@st.composite
def malformed(draw: st.DrawFn) -> tuple[str, bytes]:
    shape = draw(st.sampled_from(["bytes", "json", "near"]))
    subject = draw(st.sampled_from([*ROUTES, "rebalancer.cmd.unknown"]))
    if shape == "bytes":
        return subject, draw(st.binary(max_size=64))
    if shape == "json":
        value = draw(JSON)
        if isinstance(value, dict):
            value["unexpected_field"] = True  # never a valid body
        return subject, json.dumps(value).encode()
    return _near_valid(draw)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=malformed())
def test_malformed_bodies_are_refused_with_a_design_code_and_append_nothing(
    database_url: str, request: tuple[str, bytes]
) -> None:
    subject, data = request

    async def check() -> None:
        async with await EventStore.open(database_url, max_size=2) as store:
            reply = await api_for(store).handle(subject, data)
            assert reply["ok"] is False, (subject, data, reply)
            assert reply["error"]["code"] in CODES
            assert await event_count(store) == 0

    asyncio.run(check())


async def test_requests_over_a_real_nats(store: EventStore, nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        subscriptions = await serve_api(api_for(store), nc)
        msg = await nc.request("rebalancer.cmd.start",
                               body({"command_id": "n1", "spec": SPEC, "params": PARAMS}),
                               timeout=5)
        reply = json.loads(msg.data)
        assert reply["ok"] is True
        msg = await nc.request("rebalancer.cmd.pause",
                               body({"command_id": "n2", "workflow_id": reply["workflow_id"]}),
                               timeout=5)
        assert json.loads(msg.data)["error"]["code"] == "illegal_transition"
        # The start's command id on a cancel: refused, naming the start, never its outcome.
        before = await event_count(store)
        msg = await nc.request("rebalancer.cmd.cancel",
                               body({"command_id": "n1", "workflow_id": reply["workflow_id"]}),
                               timeout=5)
        refused = json.loads(msg.data)
        assert refused["ok"] is False and refused["error"]["code"] == "conflict"
        assert "used by a start" in refused["error"]["message"]
        # The same id on a start with other params: a conflict too, not the old workflow.
        msg = await nc.request("rebalancer.cmd.start",
                               body({"command_id": "n1", "spec": SPEC,
                                     "params": {**PARAMS, "from_amount": "2000000"}}),
                               timeout=5)
        assert json.loads(msg.data)["error"]["code"] == "conflict"
        assert await event_count(store) == before
        for sub in subscriptions:
            await sub.unsubscribe()
    finally:
        await nc.drain()


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    import os
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rebalancer", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_command_line_speaks_to_the_api_over_nats(
    store: EventStore, database_url: str, nats_url: str
) -> None:
    nc = await nats.connect(nats_url)
    env = {"REBALANCER_DATABASE_URL": database_url, "REBALANCER_NATS_URL": nats_url}
    try:
        await serve_api(api_for(store), nc)
        params = [arg for key, value in PARAMS.items() for arg in ("--param", f"{key}={value}")]
        code, out, err = await _cli(env, "start", SPEC, *params, "--command-id", "cli-1",
                                    "--json")
        assert code == 0, err
        workflow_id = json.loads(out)["workflow_id"]
        # A repeat of the command id starts nothing new.
        code, out, _ = await _cli(env, "start", SPEC, *params, "--command-id", "cli-1",
                                  "--json")
        assert json.loads(out) == {"workflow_id": workflow_id, "created": False, "state": None}
        # An illegal move is refused with its code, in one line, exit 3 (a typo is 2).
        code, _, err = await _cli(env, "resume", workflow_id)
        assert code == 3 and err.count("\n") == 1 and "illegal_transition" in err
        code, out, _ = await _cli(env, "cancel", workflow_id, "--reason", "test")
        assert code == 0 and out.strip() == f"{workflow_id}: canceled"
    finally:
        await nc.drain()
    # With nothing answering, the command line says so instead of hanging: exit 4.
    code, _, err = await _cli(env, "pause", workflow_id)
    assert code == 4 and "serve" in err
