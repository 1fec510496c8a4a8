"""Alert webhooks (issue 14, part 2) against a real HTTP receiver on 127.0.0.1 that fails its
first requests: one delivery per alert occurrence, retried, none again after a restart; the
Slack body; the URL (it carries a token) refused inline and never in a log, event or row."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from aiohttp import web

from events.catalogue import TaskStateChanged, WorkflowStateChanged
from events.migrations import migrate
from events.store import EventStore
from projections.alerts import raise_alert
from projections.runner import ProjectionRunner, default_projections
from rebalancer.accounts import DEFAULT_CONFIG
from rebalancer.errors import SpecError
from rebalancer.metrics import Metrics
from rebalancer.service import serve
from rebalancer.settings import Settings
from rebalancer.sinks import load_webhooks, webhook_targets
from rebalancer.webhooks import WebhookDispatcher, slack_body
from tests.support import eventually
from tests.support.scraping import scraped, value
from tests.support.synthetic import make_history

TOKEN = "T0KEN-" + uuid.uuid4().hex  # what a Slack URL carries: must never show anywhere


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that answers 503 to its first `failures` requests."""

    failures: int = 0
    hang: float = 0.0  # seconds before it answers
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != TOKEN:
            return web.Response(status=404)
        body = await request.json()
        ok = len(self.requests) >= self.failures
        self.requests.append({"body": body, "ok": ok and not self.hang,
                              "key": request.headers.get("X-Rebalancer-Alert-Key")})
        await asyncio.sleep(self.hang)
        return web.Response(status=200 if ok else 503, text="ok" if ok else "try later")

    def delivered(self) -> list[str | None]:
        return [r["key"] for r in self.requests if r["ok"]]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/{token}", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}/hooks/{TOKEN}"
    try:
        yield found
    finally:
        await runner.cleanup()


def write_config(directory: Path, *webhooks: dict[str, Any]) -> Path:
    """The default accounts with an `alerts.webhooks` section."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    data["alerts"] = {"webhooks": list(webhooks)}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def hook(**overrides: Any) -> dict[str, Any]:
    return {"name": "ops", "url_env": "TEST_OPS_HOOK", "backoff_seconds": 0.05,
            "timeout_seconds": 2, "max_attempts": 5, **overrides}


async def workflow_with(store: EventStore, *, fail: bool) -> str:
    """A workflow that failed, or whose first task went to an operator with the commands that
    would settle it; its stream id."""
    history = make_history(random.Random(str(uuid.uuid4())))
    await store.append(history.stream_id, history.appends[0], 0)
    task = {"task_index": 0, "task_name": "buy_in_source_spot", "kind": "trade"}
    if fail:
        events: list[Any] = [
            TaskStateChanged(**task, trigger="fail", source="created", dest="failed",
                             error={"code": "rejected", "message": "insufficient funds"}),
            WorkflowStateChanged(trigger="fail", source="running", dest="failed",
                                 reason="task buy_in_source_spot failed: insufficient funds")]
    else:
        events = [
            TaskStateChanged(**task, trigger="submit", source="created", dest="submitting",
                             request_params={"client_id": "c"}),
            TaskStateChanged(**task, trigger="escalate", source="submitting",
                             dest="needs_attention",
                             error={"code": "ambiguous", "message": "two orders could be ours",
                                    "commands": ["rebalancer resolve abc --outcome failed"]}),
            WorkflowStateChanged(trigger="escalate", source="running", dest="needs_attention")]
    await store.append(history.stream_id, events, 2)
    await ProjectionRunner(store, default_projections()).catch_up()
    return history.stream_id


async def deliver_until(dispatcher: WebhookDispatcher, receiver: Receiver, count: int) -> None:
    async def round_() -> int:
        await dispatcher.deliver_pending()
        return len(receiver.delivered())

    await eventually(round_, lambda n: n >= count, timeout=10, interval=0.05,
                     what=f"{count} deliveries", describe=lambda _: receiver.requests)


async def outbox(database_url: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "select alert_key, sink, attempts, last_error, delivered_at is not null"
            " from webhook_deliveries order by alert_key")
        return [dict(zip(("key", "sink", "attempts", "last_error", "delivered"), row,
                         strict=True)) for row in await cur.fetchall()]


async def nothing_holds_the_token(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    assert TOKEN not in caplog.text
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for query in ("select data::text || metadata::text from events",
                      "select coalesce(last_error, '') from webhook_deliveries",
                      "select message || coalesce(details::text, '') from alerts"):
            cur = await conn.execute(query)
            assert not [row for row in await cur.fetchall() if TOKEN in row[0]], query


async def test_one_delivery_per_occurrence_retried_and_none_after_a_restart(
    database_url: str, store: EventStore, receiver: Receiver, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TEST_OPS_HOOK", receiver.url)
    config = write_config(tmp_path, hook(kinds=["workflow_failed", "needs_attention"]))
    metrics = Metrics()
    # Raised before the sink ever ran: history, not sent.
    await workflow_with(store, fail=True)
    first = WebhookDispatcher(store, webhook_targets(config), metrics)
    assert await first.deliver_pending() == 0
    failed = await workflow_with(store, fail=True)
    attention = await workflow_with(store, fail=False)
    # A kind the sink does not take.
    await raise_alert(store, f"relay_lag:{uuid.uuid4()}", "relay_lag", "behind",
                      datetime.now(UTC))
    receiver.failures = 3
    await deliver_until(first, receiver, 2)
    await first.close()

    # Every failure was retried; each occurrence arrived once, keyed by its alert key.
    assert [r["ok"] for r in receiver.requests] == [False, False, False, True, True]
    keys = receiver.delivered()
    assert len(set(keys)) == 2
    assert {k.split(":")[0] for k in keys if k} == {"workflow_failed", "needs_attention"}
    assert {r["body"]["workflow_id"] for r in receiver.requests if r["ok"]} == {
        failed.removeprefix("workflow-"), attention.removeprefix("workflow-")}
    rows = await outbox(database_url)
    assert [r["delivered"] for r in rows] == [True, True]
    assert sum(r["attempts"] for r in rows) == 5
    assert value(scraped(metrics), "rebalancer_webhook_deliveries_total", sink="ops",
                 outcome="failed") == 3
    assert value(scraped(metrics), "rebalancer_webhook_deliveries_total", sink="ops",
                 outcome="delivered") == 2
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "rebalancer.webhooks" and r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("HTTP 503" in w and "webhook ops" in w for w in warnings)

    # A restarted process (a new store, a new dispatcher) sends nothing already delivered,
    # and delivers the next occurrence once. It now takes every kind: the relay_lag raised
    # before it did stays unsent (no flood of history when a kind is added).
    config = write_config(tmp_path, hook(kinds="all"))
    async with await EventStore.open(database_url, max_size=2) as again:
        second = WebhookDispatcher(again, webhook_targets(config), Metrics())
        for _ in range(5):
            await second.deliver_pending()
        assert len(receiver.requests) == 5
        await workflow_with(again, fail=True)
        await deliver_until(second, receiver, 3)
        for _ in range(5):
            await second.deliver_pending()
        await second.close()
    assert len(receiver.requests) == 6 and len(set(receiver.delivered())) == 3
    await nothing_holds_the_token(database_url, caplog)


async def test_a_receiver_that_never_answers_costs_its_timeout_then_is_given_up(
    database_url: str, store: EventStore, receiver: Receiver, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TEST_OPS_HOOK", receiver.url)
    config = write_config(tmp_path, hook(timeout_seconds=0.3, max_attempts=2))
    metrics = Metrics()
    dispatcher = WebhookDispatcher(store, webhook_targets(config), metrics)
    await dispatcher.deliver_pending()
    await workflow_with(store, fail=True)
    receiver.hang = 5.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    await dispatcher.deliver_pending()
    # One attempt, bounded by its timeout: the round never waits on the receiver's 5 s.
    assert loop.time() - started < 2.0
    [row] = await outbox(database_url)
    assert (row["attempts"], row["last_error"], row["delivered"]) == (
        1, "no answer within 0.3 s", False)

    async def retried() -> bool:
        await dispatcher.deliver_pending()
        return await _given_up(database_url)

    await eventually(retried, timeout=10, interval=0.05, what="the alert given up")
    for _ in range(3):
        await dispatcher.deliver_pending()
    await dispatcher.close()
    assert len(receiver.requests) == 2  # max_attempts, then no more
    series = scraped(metrics)
    assert value(series, "rebalancer_webhook_deliveries_total", sink="ops", outcome="failed") == 1
    assert value(series, "rebalancer_webhook_deliveries_total", sink="ops",
                 outcome="gave_up") == 1
    assert any("gave up on alert workflow_failed:" in r.getMessage() for r in caplog.records)
    await nothing_holds_the_token(database_url, caplog)


async def _given_up(database_url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("select gave_up_at is not null from webhook_deliveries")
        row = await cur.fetchone()
    return bool(row and row[0])


async def test_serve_delivers_once_and_not_again_after_a_restart(
    database_url: str, store: EventStore, receiver: Receiver, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await migrate(database_url)
    monkeypatch.setenv("TEST_OPS_HOOK", receiver.url)
    settings = Settings(sim_time_scale=1000.0, config=write_config(tmp_path, hook()))
    receiver.failures = 2

    async def serving(until: Any) -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(serve(settings, database_url, None, tick=0.05, stop=stop))
        try:
            await until()
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)

    async def one_alert() -> None:
        # After the sink registered itself on serve's first round.
        await eventually(lambda: _sinks(database_url), timeout=10, what="the sink registered")
        await raise_alert(store, f"relay_lag:{uuid.uuid4()}", "relay_lag", "behind",
                          datetime.now(UTC))
        await eventually(lambda: receiver.delivered(), timeout=15, what="the delivery")

    await serving(one_alert)
    assert [r["ok"] for r in receiver.requests] == [False, False, True]

    async def a_while() -> None:
        await asyncio.sleep(3)  # three rounds of the dispatcher

    await serving(a_while)
    assert len(receiver.requests) == 3
    await nothing_holds_the_token(database_url, caplog)


async def _sinks(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("select count(*) from webhook_sinks")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_the_slack_body_says_what_and_where_with_the_commands(
    store: EventStore, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_OPS_HOOK", receiver.url)
    config = write_config(tmp_path, hook(format="slack", kinds=["needs_attention"]))
    dispatcher = WebhookDispatcher(store, webhook_targets(config))
    await dispatcher.deliver_pending()
    stream = await workflow_with(store, fail=False)
    await deliver_until(dispatcher, receiver, 1)
    await dispatcher.close()
    [request] = receiver.requests
    body = request["body"]
    assert set(body) == {"text", "blocks"}
    short = stream.removeprefix("workflow-")[:8]
    assert body["text"] == (f"[needs_attention] workflow {short} task buy_in_source_spot:"
                            " two orders could be ours")
    assert [b["type"] for b in body["blocks"]] == ["section", "section", "context"]
    assert body["blocks"][1]["text"]["text"] == "```rebalancer resolve abc --outcome failed```"
    assert request["key"] in body["blocks"][2]["elements"][0]["text"]


def test_slack_text_is_escaped() -> None:
    body = json.loads(slack_body({
        "kind": "relay_lag", "workflow_id": None, "task": None, "message": "<!channel> & co",
        "since": datetime(2026, 1, 1, tzinfo=UTC), "key": "relay_lag:x"}))
    # No `<!channel>` pinging everyone: what the alert quotes stays text.
    assert body["text"] == "[relay_lag] the service: &lt;!channel&gt; &amp; co"
    assert body["blocks"][0]["text"]["text"] == "*relay_lag* the service\n&lt;!channel&gt; &amp; co"


def test_an_inline_url_is_refused_without_quoting_it(tmp_path: Path) -> None:
    url = f"https://hooks.slack.com/services/{TOKEN}"
    config = write_config(tmp_path, {"name": "ops", "url": url})
    with pytest.raises(SpecError, match=r"alerts\.webhooks\.0: .*url: a webhook URL carries"
                                        r" its token .*url_env .*url_file") as refused:
        load_webhooks(config)
    assert TOKEN not in str(refused.value)


async def test_serve_does_not_start_with_an_inline_url(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"name": "ops", "url": f"https://hooks.example/{TOKEN}"})
    # Refused before any server is reached: this database does not exist.
    with pytest.raises(SpecError, match=r"url: a webhook URL carries its token") as refused:
        await serve(Settings(config=config), "postgresql://nobody@127.0.0.1:1/none", None,
                    stop=asyncio.Event())
    assert TOKEN not in str(refused.value)


def test_where_the_url_comes_from_is_checked(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_OPS_HOOK", raising=False)
    with pytest.raises(SpecError, match=r"url_env TEST_OPS_HOOK is not set"):
        webhook_targets(write_config(tmp_path, hook()))
    with pytest.raises(SpecError, match=r"exactly one of url_env and url_file"):
        load_webhooks(write_config(tmp_path, hook(url_file="hook.url")))
    secret = tmp_path / "hook.url"
    secret.write_text(f"https://hooks.example/{TOKEN}\n")
    secret.chmod(0o644)
    file_hook = {"name": "ops", "url_file": "hook.url"}
    with pytest.raises(SpecError,
                       match=r"readable or writable by others \(mode 0644\); chmod 600"):
        webhook_targets(write_config(tmp_path, file_hook))
    secret.chmod(0o600)
    [target] = webhook_targets(write_config(tmp_path, file_hook))
    assert target.url == f"https://hooks.example/{TOKEN}"
    assert TOKEN not in repr(target)
    monkeypatch.setenv("TEST_OPS_HOOK", f"ftp://x/{TOKEN}")
    with pytest.raises(SpecError, match=r"does not hold an http\(s\) URL") as refused:
        webhook_targets(write_config(tmp_path, hook()))
    assert TOKEN not in str(refused.value)
    with pytest.raises(SpecError, match=r"alerts\.webhooks\.0: kinds"):
        load_webhooks(write_config(tmp_path, hook(kinds=["workflow_faild"])))
    with pytest.raises(SpecError, match=r"name 'ops' is used twice"):
        load_webhooks(write_config(tmp_path, hook(), hook()))
