"""Fuzzing the command API over real NATS: every reply is a contract reply, never `internal`.

Hypothesis runs its examples synchronously and async fixtures do not survive between them, so
the service lives in an event loop of its own thread (`Service`): one store, one NATS
connection serving the API, one client connection, for the whole run. Each example is a
coroutine handed to that loop with `run_coroutine_threadsafe`; the `@given` function is defined
inside the test and called there, so it sees the running service and no fixture is shared
across examples behind hypothesis's back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.api import ROUTES, Api, serve_api
from tests.integration.test_api import PARAMS, SPEC, api_for
from tests.support import event_count

# The contract's codes (docs/contracts.md §3) that bad input may get: `internal` is not one.
REFUSALS = {"invalid_request", "unknown_spec", "not_found", "illegal_transition", "conflict",
            "unauthorized"}
# Under the served wildcards (`rebalancer.cmd.>`, `rebalancer.query.>`) but routed nowhere.
UNKNOWN = ["rebalancer.cmd.unknown", "rebalancer.cmd.start.again", "rebalancer.query.nothing",
           "rebalancer.cmd.START"]
SUBJECTS = [*ROUTES, *UNKNOWN]
# Placeholders `render` replaces with raw text: nested brackets, an integer of 5000 digits.
DEEP = "__deep__"
BIG = "__big__"

T = TypeVar("T")


class Service:
    """The API served over real NATS from an event loop in a background thread."""

    def __init__(self, database_url: str, nats_url: str) -> None:
        self.database_url = database_url
        self.nats_url = nats_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def __enter__(self) -> Service:
        self.thread.start()
        self.run(self._open())
        return self

    def __exit__(self, *_: object) -> None:
        try:
            self.run(self._close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def _open(self) -> None:
        self.store = await EventStore.open(self.database_url, max_size=4)
        self.api: Api = api_for(self.store)
        self.served = await nats.connect(self.nats_url)
        await serve_api(self.api, self.served)
        self.client = await nats.connect(self.nats_url)

    async def _close(self) -> None:
        await self.client.drain()
        await self.served.drain()
        await self.store.close()

    async def request(self, subject: str, data: bytes) -> tuple[int, dict[str, Any], int]:
        """(events before, the decoded reply, events after) for one request."""
        before = await event_count(self.store)
        msg = await self.client.request(subject, data, timeout=5)
        reply = json.loads(msg.data)
        return before, reply, await event_count(self.store)


# -- the bodies ---------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=16,
)
# Text a fitting body may hold: no control characters, no surrogates.
PRINTABLE = st.characters(blacklist_categories=("Cc", "Cs"))
CONTROL = st.sampled_from(["\x00", "\x01", "\x1b", "\r", "\n", "\t", "\x7f", "\x85", "\x9f"])


@st.composite
def hostile_text(draw: st.DrawFn) -> str:
    base = draw(st.text(max_size=16))
    at = draw(st.integers(0, len(base)))
    return base[:at] + draw(CONTROL) + base[at:]


def spellings(workflow_id: str) -> st.SearchStrategy[str]:
    """Other spellings of a real id: the same UUID to uuid.UUID, another text to the store."""
    return st.sampled_from([f"urn:uuid:{workflow_id}", "{" + workflow_id + "}",
                            workflow_id.upper(), workflow_id.replace("-", ""),
                            f"{workflow_id} ", f"{workflow_id}\x00"])


def hostile(workflow_id: str) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(min_value=10**18, max_value=10**400) | st.integers(max_value=-(10**18)),
        st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "", " ", "0", "-0", "1e-999",
                         "9" * 300, DEEP, BIG]),
        st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -0.0]),
        hostile_text(),
        spellings(workflow_id),
        st.uuids().map(str),
        st.just(workflow_id),
        JSON,
    )


def fields_of(subject: str) -> list[str]:
    route = ROUTES.get(subject)
    names = list(route[0].model_fields) if route else []
    return names or ["command_id", "workflow_id", "spec", "params"]


def valid(subject: str, workflow_id: str, draw: st.DrawFn) -> dict[str, Any]:
    """A body that fits its command, with a random (mostly absent) workflow id."""
    ids = st.uuids().map(str) | st.just(workflow_id)
    command_id = draw(st.text(PRINTABLE, min_size=1, max_size=20))
    action = subject.rsplit(".", 1)[-1]
    if action == "start":
        return {"command_id": command_id, "spec": draw(st.sampled_from([SPEC, "nope"])),
                "params": draw(st.sampled_from([dict(PARAMS), {}]))}
    if action == "resolve":
        return {"command_id": command_id, "workflow_id": draw(ids),
                "task": draw(st.text(PRINTABLE, min_size=1, max_size=20)),
                "outcome": draw(st.sampled_from(["resend", "done", "failed"])),
                "note": draw(st.text(PRINTABLE, max_size=20))}
    if action == "workflow":
        return {"workflow_id": draw(ids)}
    if action == "workflows":
        return {"state": draw(st.sampled_from(["created", "running", "nonsense"])),
                "limit": draw(st.integers(1, 1000))}
    return {"command_id": command_id, "workflow_id": draw(ids), "reason": draw(st.text(PRINTABLE))}


def render(payload: Any, depth: int) -> bytes:
    """The JSON of `payload` with the placeholders put in as raw text: json.dumps would recurse
    on deep nesting itself, and Python ints of many digits are refused before they are text."""
    raw = json.dumps(payload).encode()
    raw = raw.replace(json.dumps(DEEP).encode(), b"[" * depth + b"1" + b"]" * depth)
    return raw.replace(json.dumps(BIG).encode(), b"9" * 5000)


def _string_fields(subject: str) -> list[str]:
    return [name for name in fields_of(subject) if name not in ("limit", "outcome", "params")]


def _spoil(subject: str, payload: dict[str, Any], how: str, workflow_id: str,
           draw: st.DrawFn) -> None:
    """Make one thing in a fitting body hostile, in place."""
    fields = _string_fields(subject) or fields_of(subject)
    if how == "control":
        target = draw(st.sampled_from([*fields, "params key", "params value"]))
        if target.startswith("params"):
            key, value = ((draw(hostile_text()), "1") if target == "params key"
                          else ("from_amount", draw(hostile_text())))
            payload["params"] = {**payload.get("params", {}), key: value}
        else:
            payload[target] = draw(hostile_text())
    elif how == "spelled":
        payload["workflow_id"] = draw(spellings(workflow_id) | st.uuids().map(str).flatmap(
            spellings))
    elif how == "number":
        payload[draw(st.sampled_from(fields_of(subject)))] = draw(st.sampled_from(
            [BIG, 10**400, -(10**30), float("inf"), float("nan"), 1e308, "1e999", True]))
    elif how == "deep":
        payload[draw(st.sampled_from(fields_of(subject)))] = DEEP
    elif how == "extra":
        payload[draw(st.text(max_size=8) | hostile_text())] = draw(hostile(workflow_id))
    else:
        payload[draw(st.sampled_from(fields_of(subject)))] = draw(hostile(workflow_id))


# Weighted: the hostile shapes of issue 11 come up often enough in 150 examples to be found.
SHAPES = ["bytes", "json", "fields", "valid", "valid", "valid", "control", "control", "control",
          "spelled", "spelled", "number", "number", "deep", "deep", "extra", "field"]


@st.composite
def requests(draw: st.DrawFn, workflow_id: str) -> tuple[str, bytes]:
    shape = draw(st.sampled_from(SHAPES))
    if shape == "spelled":
        subject = draw(st.sampled_from([s for s in ROUTES if "workflow_id" in fields_of(s)]))
    elif shape == "valid":
        subject = draw(st.sampled_from(list(ROUTES)))
    else:
        subject = draw(st.sampled_from(SUBJECTS))
    if shape == "bytes":
        return subject, draw(st.binary(max_size=128))
    if shape == "json":
        return subject, json.dumps(draw(JSON)).encode()
    depth = draw(st.sampled_from([1, 7, 9, 40, 5000]))
    if shape == "fields":
        names = fields_of(subject)
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
        return subject, render({name: draw(hostile(workflow_id)) for name in chosen}, depth)
    payload = valid(subject, workflow_id, draw)
    if shape != "valid":
        _spoil(subject, payload, shape, workflow_id, draw)
    return subject, render(payload, depth)


# -- the test -----------------------------------------------------------------------------------


def _trouble(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in records
            if r.name.startswith("rebalancer") and (r.levelno >= logging.ERROR or r.exc_info)]


def test_fuzzed_bodies_get_contract_replies_and_change_nothing_when_refused(
    database_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rebalancer")
    with Service(database_url, nats_url) as service:
        # A real workflow, so that ids spelled otherwise name something that exists.
        _, started, _ = service.run(service.request("rebalancer.cmd.start", json.dumps(
            {"command_id": "fuzz-seed", "spec": SPEC, "params": PARAMS}).encode()))
        workflow_id = started["workflow_id"]
        service.run(ProjectionRunner(service.store, default_projections()).catch_up())

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(request=requests(workflow_id))
        def one(request: tuple[str, bytes]) -> None:
            subject, data = request
            seen = len(caplog.records)
            before, reply, after = service.run(service.request(subject, data))
            assert isinstance(reply, dict) and reply.get("ok") in (True, False), reply
            if reply["ok"] is False:
                assert reply["error"]["code"] in REFUSALS, (subject, data[:300], reply)
                assert after == before, (subject, data[:300], reply)
            else:
                assert subject in ROUTES, (subject, reply)
            assert _trouble(caplog.records[seen:]) == [], (subject, data[:300])

        one()
        # Still answering after all of it.
        _, listed, _ = service.run(service.request("rebalancer.query.workflows", b"{}"))
        assert listed["ok"] is True
        _, found, _ = service.run(service.request(
            "rebalancer.query.workflow", json.dumps({"workflow_id": workflow_id}).encode()))
        assert found["ok"] is True and found["workflow"]["workflow_id"] == workflow_id
    assert _trouble(caplog.records) == []


def test_the_fuzzer_reaches_past_validation() -> None:
    """The strategy is no good if every body dies at the parser: some must be valid."""
    workflow_id = str(uuid.uuid4())
    fitting = []

    @settings(max_examples=150, deadline=None)
    @given(request=requests(workflow_id))
    def one(request: tuple[str, bytes]) -> None:
        subject, data = request
        route = ROUTES.get(subject)
        if route is None:
            return
        try:
            route[0].model_validate_json(data)
        except ValueError:
            return
        fitting.append(subject)

    one()
    assert len(set(fitting)) >= 4, fitting
