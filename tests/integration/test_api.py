"""The command API: strict bodies, the replies of docs/contracts.md §3, idempotency, real NATS."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js.api import ConsumerConfig

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
        # An illegal move is refused with its code, in one line, exit 3 (a typo is 2). The id
        # as a person may paste it: the command line sends its canonical form.
        code, _, err = await _cli(env, "resume", workflow_id.upper())
        assert code == 3 and err.count("\n") == 1 and "illegal_transition" in err
        code, out, _ = await _cli(env, "cancel", workflow_id, "--reason", "test")
        assert code == 0 and out.strip() == f"{workflow_id}: canceled"
    finally:
        await nc.drain()
    # With nothing answering, the command line says so instead of hanging: exit 4.
    code, _, err = await _cli(env, "pause", workflow_id)
    assert code == 4 and "serve" in err


# -- strict bodies (issue 11): depth, encoding, control characters, canonical ids, no reply ---

ABSENT = str(uuid.uuid4())


def _problem_fields(reply: dict[str, Any]) -> list[str]:
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_request", reply
    return [p["field"] for p in reply["error"]["details"].get("problems", [])]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 9 + b"]" * 9, id="nine_arrays"),
        pytest.param(b'{"a":' * 9 + b"1" + b"}" * 9, id="nine_objects"),
        # Python's json recurses: this used to end in a RecursionError and no reply at all.
        pytest.param(b"[" * 5000 + b"]" * 5000, id="five_thousand"),
        pytest.param(b"[" * 30000, id="unclosed"),
        pytest.param(json.dumps({"command_id": "x", "spec": SPEC,
                                 "params": {"p": [[[[[[[[["deep"]]]]]]]]]}}).encode(),
                     id="deep_in_params"),
    ],
)
async def test_a_body_nested_deeper_than_eight_is_refused_before_parsing(
    store: EventStore, raw: bytes
) -> None:
    reply = await api_for(store).handle("rebalancer.cmd.start", raw)
    assert reply["error"]["code"] == "invalid_request"
    assert "deeper than 8" in reply["error"]["message"]
    assert await event_count(store) == 0


async def test_brackets_inside_strings_do_not_count_and_eight_levels_parse(
    store: EventStore,
) -> None:
    api = api_for(store)
    # Eight levels is within the limit: refused by the model (a list is no body), not the scan.
    eight = await api.handle("rebalancer.cmd.start", b"[" * 8 + b"]" * 8)
    assert eight["error"]["message"] == "body must be a JSON object"
    # Brackets and escaped quotes inside strings are text, not nesting.
    tricky = body({"command_id": "[[[[[[[[[[\"{{{{{{{{{{", "spec": "{" * 20, "params": {}})
    reply = await api.handle("rebalancer.cmd.start", tricky)
    assert reply["error"]["code"] == "unknown_spec", reply


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"command_id": "\xff", "spec": "s", "params": {}}', id="bad_utf8"),
        pytest.param(b'{"command_id": "\xed\xa0\x80", "spec": "s", "params": {}}',
                     id="utf8_surrogate"),
        pytest.param(json.dumps({"command_id": "x", "spec": SPEC, "params": PARAMS}
                                ).encode("utf-16"), id="utf16"),
        pytest.param(b'{"limit": ' + b"1" * 5000 + b"}", id="int_of_5000_digits"),
        pytest.param(b'{"limit": 1e999}', id="float_overflow"),
        pytest.param(b'{"command_id": "a", "spec": "\\ud800", "params": {}}', id="lone_surrogate"),
        pytest.param(b"\xef\xbb\xbf{}", id="bom"),
    ],
)
async def test_undecodable_bodies_are_invalid_request_never_internal(
    store: EventStore, raw: bytes
) -> None:
    for subject in ("rebalancer.cmd.start", "rebalancer.query.workflows"):
        reply = await api_for(store).handle(subject, raw)
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_request", reply
    assert await event_count(store) == 0


def _with(subject: str, field: str, value: str) -> dict[str, Any]:
    """A body for `subject` that would pass validation, with `field` set to `value`."""
    bodies: dict[str, dict[str, Any]] = {
        "rebalancer.cmd.start": {"command_id": "c", "spec": SPEC, "params": dict(PARAMS)},
        "rebalancer.cmd.cancel": {"command_id": "c", "workflow_id": ABSENT, "reason": "r"},
        "rebalancer.cmd.resolve": {"command_id": "c", "workflow_id": ABSENT, "task": "t",
                                   "outcome": "done", "note": "n"},
        "rebalancer.query.workflows": {"state": "created"},
    }
    payload = bodies[subject]
    if field == "params.<key>":
        payload["params"][value] = "1"
    elif field.startswith("params."):
        payload["params"][field.removeprefix("params.")] = value
    else:
        payload[field] = value
    return payload


CONTROL_FIELDS = [
    ("rebalancer.cmd.start", "command_id"), ("rebalancer.cmd.start", "spec"),
    ("rebalancer.cmd.start", "params.from_amount"), ("rebalancer.cmd.start", "params.<key>"),
    ("rebalancer.cmd.cancel", "command_id"), ("rebalancer.cmd.cancel", "reason"),
    ("rebalancer.cmd.resolve", "command_id"), ("rebalancer.cmd.resolve", "task"),
    ("rebalancer.cmd.resolve", "note"), ("rebalancer.query.workflows", "state"),
]


@pytest.mark.parametrize(("subject", "field"), CONTROL_FIELDS)
@pytest.mark.parametrize("char", ["\x00", "\x1b", "\r", "\x7f", "\x85", "\x9f"])
async def test_control_characters_are_refused_in_every_string_naming_the_field(
    store: EventStore, subject: str, field: str, char: str
) -> None:
    payload = _with(subject, field, f"a{char}b")
    reply = await api_for(store).handle(subject, body(payload))
    fields = _problem_fields(reply)
    named = f"params.a{char.encode('unicode_escape').decode()}b.[key]" if field == (
        "params.<key>") else field
    assert fields == [named], reply
    assert f"U+{ord(char):04X}" in reply["error"]["details"]["problems"][0]["problem"]
    assert await event_count(store) == 0


@pytest.mark.parametrize(("subject", "field"), CONTROL_FIELDS)
@pytest.mark.parametrize("char", ["\n", "\t"])
async def test_only_reason_and_note_may_hold_newlines_and_tabs(
    store: EventStore, subject: str, field: str, char: str
) -> None:
    reply = await api_for(store).handle(subject, body(_with(subject, field, f"a{char}b")))
    if field in ("reason", "note"):
        # Past validation: the workflow is absent (the body itself was accepted).
        assert reply["error"]["code"] == "not_found", reply
    else:
        assert _problem_fields(reply) != [], reply
    assert await event_count(store) == 0


async def test_a_key_with_a_control_character_is_refused_even_as_an_unknown_field(
    store: EventStore,
) -> None:
    payload = {"command_id": "c", "spec": SPEC, "params": PARAMS, "x\x00": 1}
    reply = await api_for(store).handle("rebalancer.cmd.start", body(payload))
    assert _problem_fields(reply) == ["x\\x00"]
    # The reply is still JSON a client can read, the key escaped.
    assert json.loads(json.dumps(reply)) == reply


@pytest.mark.parametrize(
    "spelling",
    [
        pytest.param(lambda u: f"urn:uuid:{u}", id="urn"),
        pytest.param(lambda u: "{" + u + "}", id="braces"),
        pytest.param(lambda u: u.upper(), id="upper"),
        pytest.param(lambda u: u.replace("-", ""), id="no_hyphens"),
        pytest.param(lambda u: f" {u}", id="leading_space"),
        pytest.param(lambda u: f"{u}\n", id="trailing_newline"),
        pytest.param(lambda u: u[:-1] + "g", id="not_hex"),
    ],
)
async def test_workflow_ids_have_one_canonical_form(store: EventStore, spelling: Any) -> None:
    api = api_for(store)
    started = await api.handle("rebalancer.cmd.start",
                               body({"command_id": "s", "spec": SPEC, "params": PARAMS}))
    workflow_id = started["workflow_id"]
    other = spelling(workflow_id)
    assert other != workflow_id
    await ProjectionRunner(store, default_projections()).catch_up()
    events = await event_count(store)
    requests = [
        ("rebalancer.cmd.cancel", {"command_id": "c", "workflow_id": other}),
        ("rebalancer.cmd.pause", {"command_id": "p", "workflow_id": other}),
        ("rebalancer.cmd.resolve", {"command_id": "r", "workflow_id": other, "task": "t",
                                    "outcome": "done", "note": "checked"}),
        ("rebalancer.query.workflow", {"workflow_id": other}),
    ]
    for subject, payload in requests:
        reply = await api.handle(subject, body(payload))
        assert _problem_fields(reply) == ["workflow_id"], (subject, reply)
    assert await event_count(store) == events
    # The canonical form names the same workflow.
    found = await api.handle("rebalancer.query.workflow", body({"workflow_id": workflow_id}))
    assert found["ok"] is True


async def test_a_command_without_a_reply_subject_is_not_run(
    store: EventStore, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="rebalancer.api")
    nc = await nats.connect(nats_url)
    try:
        subscriptions = await serve_api(api_for(store), nc)
        await nc.publish("rebalancer.cmd.start",
                         body({"command_id": "quiet", "spec": SPEC, "params": PARAMS}))
        # Same subscription, handled in order: once this is answered, the start was seen.
        msg = await nc.request("rebalancer.cmd.pause",
                               body({"command_id": "probe", "workflow_id": ABSENT}), timeout=5)
        assert json.loads(msg.data)["error"]["code"] == "not_found"
        assert await event_count(store) == 0
        assert any("without a reply subject" in r.getMessage() and r.levelname == "DEBUG"
                   for r in caplog.records)
        # The same start with a reply subject runs.
        msg = await nc.request("rebalancer.cmd.start",
                               body({"command_id": "quiet", "spec": SPEC, "params": PARAMS}),
                               timeout=5)
        assert json.loads(msg.data)["created"] is True
        for sub in subscriptions:
            await sub.unsubscribe()
    finally:
        await nc.drain()


async def test_a_jetstream_delivery_onto_a_command_subject_is_not_run(
    store: EventStore, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="rebalancer.api")
    nc = await nats.connect(nats_url)
    try:
        subscriptions = await serve_api(api_for(store), nc)
        # A stored start and a push consumer delivering it onto rebalancer.cmd.start. JetStream
        # pushes only where it sees literal interest: the spy gives it that, and proves delivery.
        # (The message keeps its stored subject, which names no route either: the guard is the
        # second line.)
        pushed = asyncio.Event()

        async def spy(msg: Any) -> None:
            pushed.set()

        await nc.subscribe("rebalancer.cmd.start", cb=spy)
        js = nc.jetstream()
        stream = f"PUSHED_{uuid.uuid4().hex[:8]}"
        await js.add_stream(name=stream, subjects=[f"pushed.{stream}"])
        await js.publish(f"pushed.{stream}",
                         body({"command_id": "pushed", "spec": SPEC, "params": PARAMS}))
        await js.add_consumer(stream, ConsumerConfig(deliver_subject="rebalancer.cmd.start"))
        await asyncio.wait_for(pushed.wait(), 5)
        msg = await nc.request("rebalancer.cmd.pause",
                               body({"command_id": "probe", "workflow_id": ABSENT}), timeout=5)
        assert json.loads(msg.data)["error"]["code"] == "not_found"
        assert await event_count(store) == 0
        assert any("ignored a JetStream delivery" in r.getMessage() for r in caplog.records)
        for sub in subscriptions:
            await sub.unsubscribe()
        await js.delete_stream(stream)
    finally:
        await nc.drain()


async def test_expected_bad_input_logs_no_traceback(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="rebalancer")
    api = api_for(store)
    # Each of these once reached the catch-all: `internal`, a traceback, or no reply at all.
    bad = [
        ("rebalancer.query.workflow", body({"workflow_id": f"urn:uuid:{ABSENT}"})),
        ("rebalancer.cmd.cancel", body({"command_id": "a\x00", "workflow_id": ABSENT})),
        ("rebalancer.query.workflows", body({"state": "created\x00"})),
        ("rebalancer.query.workflows", b'{"limit": ' + b"9" * 5000 + b"}"),
        ("rebalancer.cmd.start", b"[" * 5000 + b"]" * 5000),
    ]
    for subject, data in bad:
        reply = await api.handle(subject, data)
        assert reply["error"]["code"] == "invalid_request", (subject, reply)
    assert [r for r in caplog.records
            if r.levelno >= logging.WARNING or r.exc_info] == []
