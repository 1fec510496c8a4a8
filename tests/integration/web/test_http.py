"""The dashboard over plain HTTP: health, readiness, the pages, and the operator's actions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from events.store import EventStore
from rebalancer.accounts import load_accounts
from rebalancer.commands import start_workflow
from rebalancer.specs.loading import builtin_specs
from tests.integration.web.conftest import TOKEN, Served, serving, settings_for
from tests.support import SEED_PARAMS, SEED_SPEC, eventually, load


async def get(url: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
        return r.status, await r.text(), dict(r.headers)


async def post(url: str, data: dict[str, str], **headers: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=data, headers={"Accept": "application/json", **headers}) as r:
        return r.status, await r.json()


async def test_healthz_answers_and_readyz_says_each_check(served: Served) -> None:
    status, text, _ = await get(served.url + "healthz")
    assert (status, json.loads(text)) == (200, {"ok": True})

    async def ready() -> tuple[int, dict]:
        status, text, _ = await get(served.url + "readyz")
        return status, json.loads(text)

    status, body = await eventually(ready, lambda r: r[0] == 200, timeout=30,
                                    what="ready once NATS is connected")
    checks = body["checks"]
    assert body["ready"] is True
    assert set(checks) == {"database", "nats", "projections", "relay"}
    assert set(checks["projections"]["projections"]) == {"workflows", "exposure", "alerts"}


async def test_metrics_serves_the_process_metrics_and_readyz_skips_nats_without_it(
        database_url: str, store: EventStore, tmp_path: Path) -> None:
    from rebalancer.metrics import Metrics

    metrics = Metrics()
    async with serving(settings_for(tmp_path), database_url, None, metrics=metrics) as s:
        workflow_id, _ = await start_workflow(store, builtin_specs()[SEED_SPEC],
                                              {**SEED_PARAMS, "from_amount": "200000"},
                                              load_accounts())
        await eventually(lambda: load(store, workflow_id), lambda f: f.state == "done",
                         timeout=60, what="the workflow done")
        status, text, headers = await get(s.url + "metrics")
        assert status == 200
        assert headers["Content-Type"] == metrics.exposition()[1]
        steps = [line for line in text.splitlines()
                 if line.startswith("rebalancer_steps_total{") and 'outcome="moved"' in line]
        assert steps and sum(float(line.rsplit(" ", 1)[1]) for line in steps) > 0
        # Without NATS, readiness does not ask about it.
        status, text, _ = await get(s.url + "readyz")
        assert "nats" not in json.loads(text)["checks"]


async def test_a_foreign_host_header_is_refused(served: Served) -> None:
    # A DNS-rebinding page names its own host: the loopback dashboard answers it nothing.
    status, text, _ = await get(served.url, Host="evil.example:8080")
    assert status == 421 and "workflow" not in text.lower()


async def test_actions_are_refused_without_the_token_and_from_another_site(
        served: Served, store: EventStore) -> None:
    workflow_id, _ = await start_workflow(store, builtin_specs()[SEED_SPEC],
                                          {**SEED_PARAMS, "from_amount": "200000"},
                                          load_accounts())
    form = {"command_id": "web-test-1", "workflow_id": workflow_id, "reason": "look"}
    status, reply = await post(served.url + "actions/pause", form)
    assert (status, reply["error"]["code"]) == (401, "unauthorized")
    status, reply = await post(served.url + "actions/pause", form, **{
        "X-Operator-Token": TOKEN[:-1] + "x"})
    assert (status, reply["error"]["code"]) == (401, "unauthorized")
    status, reply = await post(served.url + "actions/pause", form, **{
        "X-Operator-Token": TOKEN, "Origin": "http://evil.example", "Sec-Fetch-Site":
        "cross-site"})
    assert (status, reply["error"]["code"]) == (403, "cross_site")
    # None of them was applied (or bound the command id).
    assert all(e.metadata.get("command_id") != "web-test-1"
               for e in await store.read_stream(f"workflow-{workflow_id}"))
    assert await store.recall_outcome("web-test-1") is None


async def test_a_read_only_dashboard_refuses_every_action(
        database_url: str, tmp_path: Path, store: EventStore) -> None:
    async with serving(settings_for(tmp_path, token=None), database_url, None) as ro:
        status, page, _ = await get(ro.url)
        assert "read-only" in page and "operator-token" not in page
        status, reply = await post(ro.url + "actions/cancel", {
            "command_id": "x", "workflow_id": "0" * 8}, **{"X-Operator-Token": TOKEN})
        assert (status, reply["error"]["code"]) == (403, "read_only")


async def test_an_action_with_the_token_goes_through_the_command_handlers(
        database_url: str, nats_url: str, tmp_path: Path, store: EventStore) -> None:
    # At the world's own pace the workflow is still running when the pause comes.
    async with serving(settings_for(tmp_path, time_scale=1.0), database_url, nats_url) as s:
        await _pause_through_the_dashboard(s, store)


async def _pause_through_the_dashboard(served: Served, store: EventStore) -> None:
    workflow_id, _ = await start_workflow(store, builtin_specs()[SEED_SPEC],
                                          {**SEED_PARAMS, "from_amount": "200000"},
                                          load_accounts())
    await eventually(lambda: load(store, workflow_id), lambda f: f.state == "running",
                     timeout=30, what="the workflow running")
    form = {"command_id": "web-test-2", "workflow_id": workflow_id, "reason": "checking"}
    # Validation is the API's: a malformed workflow id is refused as NATS would refuse it.
    status, reply = await post(served.url + "actions/pause", {**form, "workflow_id": "nope"},
                               **{"X-Operator-Token": TOKEN})
    assert (status, reply["error"]["code"]) == (400, "invalid_request")
    status, reply = await post(served.url + "actions/pause", form,
                               **{"X-Operator-Token": TOKEN})
    assert (status, reply["ok"], reply["state"]) == (200, True, "paused"), reply
    flow = await load(store, workflow_id)
    assert flow.state == "paused"
    # Idempotent by command id: the same form again is the same reply, nothing appended.
    version = await store.stream_version(f"workflow-{workflow_id}")
    again_status, again = await post(served.url + "actions/pause", form,
                                     **{"X-Operator-Token": TOKEN})
    assert (again_status, again) == (status, reply)
    assert await store.stream_version(f"workflow-{workflow_id}") == version
    events = await store.read_stream(f"workflow-{workflow_id}")
    assert [e.metadata.get("actor") for e in events
            if e.metadata.get("command_id") == "web-test-2"] == ["web"]
    # The handler's own rules still hold: a paused workflow is not paused twice.
    status, reply = await post(served.url + "actions/pause", {**form, "command_id": "web-3"},
                               **{"X-Operator-Token": TOKEN})
    assert (status, reply["error"]["code"]) == (409, "illegal_transition")


async def test_readiness_fails_when_the_projections_or_the_relay_fall_behind(
        store: EventStore, nats_url: str) -> None:
    from events.relay import Relay
    from projections.runner import ProjectionRunner, default_projections
    from rebalancer.web.health import Readiness

    workflow_id, _ = await start_workflow(store, builtin_specs()[SEED_SPEC],
                                          {**SEED_PARAMS, "from_amount": "200000"},
                                          load_accounts())
    relay = Relay(store, nats_url, name=f"readyz-{workflow_id[:8]}")
    try:
        # Nothing projected nor relayed yet: behind by how old the event is.
        await asyncio.sleep(0.2)
        tight = Readiness(store, relay, projection_lag_seconds=0.1, relay_lag_seconds=0.1)
        ready, body = await tight.check()
        assert ready is False
        workflows = body["checks"]["projections"]["projections"]["workflows"]
        assert workflows["ok"] is False and workflows["lag_seconds"] >= 0.1
        assert body["checks"]["relay"]["ok"] is False
        assert body["checks"]["relay"]["events_behind"] >= 1
        # Lenient thresholds: the same lag is fine.
        lenient = Readiness(store, relay, projection_lag_seconds=60, relay_lag_seconds=60)
        assert (await lenient.check())[0] is True
        # Caught up: ready even with the tight thresholds.
        await ProjectionRunner(store, default_projections()).catch_up()
        await relay.relay_once()
        ready, body = await tight.check()
        assert ready is True, body
    finally:
        await relay.close()


async def test_unknown_workflows_and_pages_are_404(served: Served) -> None:
    for path in ("workflows/nope", "workflows/6f1c2a8e-3f5b-4d7e-9a41-52b8c0d7e913",
                 "static/secrets.txt", "nothing"):
        status, _, _ = await get(served.url + path)
        assert status == 404, path


async def test_text_an_operator_typed_is_shown_escaped(
        database_url: str, nats_url: str, tmp_path: Path, store: EventStore) -> None:
    async with serving(settings_for(tmp_path, time_scale=1.0), database_url, nats_url) as s:
        workflow_id, _ = await start_workflow(store, builtin_specs()[SEED_SPEC],
                                              {**SEED_PARAMS, "from_amount": "200000"},
                                              load_accounts())
        await eventually(lambda: load(store, workflow_id), lambda f: f.state == "running",
                         timeout=30, what="the workflow running")
        evil = '<img src=x onerror="alert(1)">'
        status, reply = await post(s.url + "actions/pause", {
            "command_id": "web-evil", "workflow_id": workflow_id, "reason": evil},
            **{"X-Operator-Token": TOKEN})
        assert status == 200, reply

        async def page() -> str:
            return (await get(f"{s.url}workflows/{workflow_id}"))[1]

        shown = await eventually(page, lambda text: "paused" in text, timeout=10,
                                 what="the paused workflow's page")
        assert evil not in shown
        assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in shown


async def test_a_form_without_scripts_carries_the_token_in_a_field_and_gets_a_page(
        served: Served, store: EventStore) -> None:
    workflow_id, _ = await start_workflow(store, builtin_specs()[SEED_SPEC],
                                          {**SEED_PARAMS, "from_amount": "200000"},
                                          load_accounts())
    form = {"command_id": "web-form-1", "workflow_id": workflow_id, "task": "no_such_task",
            "outcome": "failed", "note": "checked", "token": TOKEN}
    async with aiohttp.ClientSession() as session, session.post(
            served.url + "actions/resolve", data=form) as r:
        status, page = r.status, await r.text()
    # Past the token: the handler itself answers (no such task), as an HTML page.
    assert status == 404 and "refused (not_found)" in page and "no_such_task" in page
    assert TOKEN not in page
