"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): the list lives,
the workflow page shows every task and the result, the money page agrees with `exposure
--json`, an operator action needs the token, and no page carries a secret.

Screenshots go to the test's temporary directory; with REBALANCER_DASHBOARD_SCREENSHOT set,
the workflow page's is also written there (docs/img/dashboard.png is made that way).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from events.store import EventStore
from projections.workflows import read_workflow
from rebalancer.accounts import load_accounts
from rebalancer.cli.format import when
from rebalancer.cli.main import main
from rebalancer.commands import start_workflow
from rebalancer.specs.builders import task, workflow
from rebalancer.specs.loading import builtin_specs
from tests.integration.web.conftest import TOKEN, Served, serving, settings_for
from tests.support import (
    SEED_PARAMS,
    SEED_SPEC,
    NatsServer,
    eventually,
    load,
    write_accounts,
    write_world,
)

# Slow enough that the list sees the workflow running, fast enough to end in seconds.
MOVING = 150.0


async def start_seed(store: EventStore, amount: str = "1234567") -> str:
    workflow_id, _ = await start_workflow(store, builtin_specs()[SEED_SPEC],
                                          {**SEED_PARAMS, "from_amount": amount},
                                          load_accounts())
    return workflow_id


async def shot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def row_state(page: Any, workflow_id: str) -> str | None:
    row = page.locator("table.workflows tbody tr", has=page.locator(
        f'a[href="/workflows/{workflow_id}"]'))
    if await row.count() == 0:
        return None
    return str(await row.locator("td").nth(2).inner_text()).strip()


async def test_the_list_shows_a_running_workflow_and_updates_as_it_moves(
        database_url: str, nats_url: str, tmp_path: Path, store: EventStore,
        browser: Any) -> None:
    async with serving(settings_for(tmp_path, time_scale=MOVING), database_url,
                       nats_url) as served:
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        await page.goto(served.url)
        await page.wait_for_selector("#live.on")  # the event stream is open
        # A mark on this document: it must still be there at the end (no reload happened).
        await page.evaluate("window.sameDocument = true")
        workflow_id = await start_seed(store)
        seen: list[str] = []

        async def state() -> str | None:
            found = await row_state(page, workflow_id)
            if found and (not seen or seen[-1] != found):
                seen.append(found)
            return found

        await eventually(state, lambda s: s == "running", timeout=30,
                         what="the new workflow listed as running, without a reload")
        await shot(page, tmp_path, "list-running")
        running_task = await page.locator("table.workflows tbody tr").first.locator(
            "td").nth(5).inner_text()
        await eventually(state, lambda s: s == "done", timeout=90,
                         what="the listed workflow moving on to done")
        await shot(page, tmp_path, "list-done")
        assert await page.evaluate("window.sameDocument") is True
        assert int(await page.evaluate("document.body.dataset.refreshed")) >= 2
        assert "running" in seen and seen[-1] == "done"
        assert running_task.strip() != "-"  # a running workflow names its current task
        # The filter narrows the list to a state.
        await page.select_option("select[name=state]", "failed")
        await page.click(".filters button")
        await page.wait_for_url("**/?state=failed*")
        assert await row_state(page, workflow_id) is None
        assert "no workflows" in await page.locator("table.workflows").inner_text()


async def test_the_workflow_page_shows_every_task_and_the_result(
        served: Served, store: EventStore, browser: Any, tmp_path: Path) -> None:
    workflow_id = await start_seed(store)
    view = await eventually(lambda: read_workflow(store, workflow_id),
                            lambda v: v is not None and v.state == "done", timeout=60,
                            what="the workflow done in the read model")
    events = await store.read_stream(f"workflow-{workflow_id}")
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(f"{served.url}workflows/{workflow_id}")
    steps = page.locator("ol.path li.step")
    assert await steps.count() == len(view.tasks) == 8
    for n, task_view in enumerate(view.tasks):
        step = steps.nth(n)
        assert task_view.name in await step.inner_text()
        assert "s-done" in (await step.get_attribute("class") or "")
    rows = page.locator("table.tasks tbody tr")
    assert await rows.count() == 8
    assert [(await rows.nth(n).locator("td").nth(1).inner_text()).strip()
            for n in range(8)] == [t.name for t in view.tasks]
    # The spec's result and the money, as `status ID --json` carries them.
    result = {(await r.locator("td").nth(0).inner_text()).strip():
              (await r.locator("td").nth(1).inner_text()).strip()
              for r in await page.locator("table.result tbody tr").all()}
    from rebalancer.cli.money import amount_text

    assert result == {k: amount_text(v) for k, v in view.result.items()}
    assert float(result["to_amount"]) > 0
    fees = await page.locator("table.fees tbody tr").count()
    assert fees == len(view.fees) > 0
    assert await page.locator("table.remainders tbody tr td.empty").count() == (
        0 if view.remainders else 1)
    assert await page.locator("table.fills tbody tr").count() == len(view.fills)
    assert "rate" in await page.locator("p.rate").inner_text()
    # Every event on the timeline, in order.
    timeline = page.locator("table.timeline tbody tr")
    assert await timeline.count() == len(events)
    assert [int(await timeline.nth(n).locator("td").nth(1).inner_text())
            for n in range(len(events))] == [e.version for e in events]
    target = os.environ.get("REBALANCER_DASHBOARD_SCREENSHOT")
    if target:  # the README's: the page's first screen
        await page.screenshot(path=target)
    # A task's request and results unfold.
    details = page.locator("table.tasks tbody tr").nth(2).locator("details").first
    await details.click()
    assert '"txid"' in await details.locator("pre").inner_text()
    await shot(page, tmp_path, "workflow")


async def test_the_money_page_matches_exposure_json(
        database_url: str, nats_url: str, tmp_path: Path, store: EventStore, browser: Any,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Deposits confirm after a day: the withdrawal's money stays in transit while we look.
    world = write_world(tmp_path, delays={"confirmation_seconds": 86400 * 1000})
    settings = settings_for(tmp_path, sim_world=world)
    async with serving(settings, database_url, nats_url) as served:
        stuck = await start_seed(store)

        async def exposure() -> dict[str, Any]:
            for name in ("REBALANCER_NATS_URL", "REBALANCER_EXCHANGES", "REBALANCER_CONFIG"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("REBALANCER_DATABASE_URL", database_url)
            code = await asyncio.to_thread(main, ["exposure", "--json"])
            assert code == 0
            return dict(json.loads(capsys.readouterr().out))

        found = await eventually(exposure, lambda f: any(
            i["workflow_id"] == stuck and i["kind"] == "withdraw" for i in f["in_transit"]),
            timeout=60, what="a withdrawal in transit")
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(f"{served.url}exposure")

        async def cells(css: str) -> list[list[str]]:
            return [[t.strip() for t in await row.locator("td").all_inner_texts()]
                    for row in await page.locator(f"table.{css} tbody tr").all()]

        found = await exposure()  # what the command line says now, the page just after
        assert await cells("in-transit") == [
            [i["account"], i["currency"], i["amount"], i["from_account"] or "-",
             i["workflow_id"][:8], i["task"] or f"#{i['task_index']}", i["status"],
             when(i["since"])] for i in found["in_transit"]]
        assert await cells("transit-totals") == [
            [t["account"], t["currency"], t["amount"], str(t["items"]),
             when(t["oldest"])] for t in found["totals"]]
        expected_left = [[r["account"], r["currency"], r["amount"], r["reason"],
                          r["workflow_id"][:8], r["task"], when(r["updated_at"])]
                         for r in found["remainders"]]
        assert await cells("remainders") == (expected_left or [["nothing left behind"]])
        # The page's own JSON is the command line's, field for field.
        response = await page.request.get(f"{served.url}exposure.json")
        assert await response.json() == found
        # Balances per account, read from the (simulated) exchanges.
        balances = await cells("balances")
        assert any(r[0] == "upbit-personal" and r[3] == "KRW" for r in balances)
        await shot(page, tmp_path, "money")


async def test_an_operator_action_through_the_page_needs_the_token(
        database_url: str, nats_url: str, tmp_path: Path, store: EventStore, browser: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    async with serving(settings_for(tmp_path, time_scale=1.0), database_url,
                       nats_url) as served:
        workflow_id = await start_seed(store)
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await eventually(lambda: read_workflow(store, workflow_id),
                         lambda v: v is not None and v.state == "running", timeout=30,
                         what="the workflow running in the read model")
        await page.goto(f"{served.url}workflows/{workflow_id}")
        await page.wait_for_selector("#live.on")
        pause = page.locator("#summary form[action='/actions/pause'] button")
        await pause.click()
        await page.wait_for_selector("#reply.refused")
        assert "unauthorized" in await page.locator("#reply").inner_text()
        assert (await load(store, workflow_id)).state == "running"
        await shot(page, tmp_path, "action-refused")

        # With the token typed into the box, the same button pauses it.
        await page.fill("#operator-token", TOKEN)
        await page.click("#token-box button[type=submit]")
        await page.wait_for_selector("body[data-token=set]")
        await page.locator("#summary form[action='/actions/pause'] input[name=reason]").fill(
            "checking the deposit")
        await pause.click()
        await page.wait_for_selector("#reply.ok")
        assert "paused" in await page.locator("#reply").inner_text()
        flow = await load(store, workflow_id)
        assert flow.state == "paused" and flow.reason == "checking the deposit"
        # The page follows: the state shows paused and now offers resume.
        await page.wait_for_selector("#summary .state.s-paused")
        await page.wait_for_selector("#summary form[action='/actions/resume']")
        await shot(page, tmp_path, "action-done")
        await page.locator("#summary form[action='/actions/resume'] button").click()
        await eventually(lambda: load(store, workflow_id), lambda f: f.state == "running",
                         timeout=10, what="resumed through the page")
        actors = {e.metadata.get("actor") for e in await store.read_stream(
            f"workflow-{workflow_id}") if e.metadata.get("command_id", "").startswith("web-")}
        assert actors == {"web"}
        # The token was in a header: in no log line, no URL, no page.
        assert TOKEN not in caplog.text
        assert TOKEN not in page.url and TOKEN not in await page.content()


def deposit_that_never_comes(accounts: Any) -> Any:
    """One deposit watched for a txid nobody sends: at its deadline an operator is asked."""
    return workflow("watch_for_nothing", {"amount": "amount"}, [
        task("deposit_x", "deposit", account="binance-personal", currency="ETH",
             from_account="upbit-personal", txid="ab" * 32, amount="{amount}",
             deadline_seconds=1.0)], accounts=accounts)


async def test_the_attention_queue_resolves_through_the_page(
        served: Served, store: EventStore, browser: Any, tmp_path: Path) -> None:
    accounts = load_accounts()
    workflow_id, _ = await start_workflow(store, deposit_that_never_comes(accounts),
                                          {"amount": "0.5"}, accounts)
    await eventually(lambda: read_workflow(store, workflow_id),
                     lambda v: v is not None and v.state == "needs_attention", timeout=30,
                     what="the deposit handed to an operator")
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(f"{served.url}attention")
    item = page.locator("article.queue-item", has=page.locator(
        f'a[href="/workflows/{workflow_id}"]'))
    assert "deposit_x needs attention" in await item.inner_text()
    assert "passed its deadline" in await item.inner_text()
    assert f"rebalancer resolve {workflow_id} deposit_x --outcome failed" in (
        await item.locator("ul.commands").inner_text())
    assert await page.locator("nav .count").inner_text() == "1"
    await page.fill("#operator-token", TOKEN)
    await page.click("#token-box button[type=submit]")
    failed = item.locator("form[action='/actions/resolve']", has=page.locator(
        "input[name=outcome][value=failed]"))
    await failed.locator("input[name=note]").fill("checked: nothing was sent")
    await shot(page, tmp_path, "attention")
    await failed.locator("button").click()
    await page.wait_for_selector("#reply.ok")
    flow = await eventually(lambda: load(store, workflow_id),
                            lambda f: f.tasks[0].state == "failed", timeout=10,
                            what="the task resolved failed")
    assert flow.tasks[0].error and flow.tasks[0].error["message"] == "checked: nothing was sent"
    # Once resolved it leaves the queue, live.
    await page.wait_for_selector(f'article.queue-item a[href="/workflows/{workflow_id}"]',
                                 state="detached", timeout=20_000)


async def test_no_page_script_or_event_stream_carries_a_secret(
        database_url: str, tmp_path: Path, store: EventStore, browser: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    nats_password = f"nats-{secrets.token_hex(12)}"
    api_key, api_secret = f"key-{secrets.token_hex(12)}", f"sec-{secrets.token_hex(12)}"
    monkeypatch.setenv("WEB_TEST_API_KEY", api_key)
    monkeypatch.setenv("WEB_TEST_API_SECRET", api_secret)

    def with_credentials(accounts: dict[str, Any]) -> None:
        for account in accounts.values():
            account["credentials"] = {"api_key_env": "WEB_TEST_API_KEY",
                                      "secret_env": "WEB_TEST_API_SECRET"}

    config = write_accounts(tmp_path, with_credentials)
    database_password = conninfo_to_dict(database_url).get("password")
    secret_values = [s for s in (nats_password, api_key, api_secret, TOKEN,
                                 str(database_password or "")) if s]
    # Named credentials, simulated exchanges: the credentials exist, nothing may show them.
    settings = settings_for(tmp_path, config=config, exchanges="simulated", time_scale=MOVING)
    with NatsServer("-js", "-sd", str(tmp_path / "js"), "--user", "svc", "--pass",
                    nats_password) as nats:
        url = f"nats://svc:{nats_password}@127.0.0.1:{nats.port}"
        async with serving(settings, database_url, url) as served:
            accounts = load_accounts(config)
            workflow_id, _ = await start_workflow(
                store, builtin_specs()[SEED_SPEC], {**SEED_PARAMS, "from_amount": "500000"},
                accounts)
            seen: list[str] = []
            stream = asyncio.create_task(_read_events(served.url + "events", seen))
            page = await browser.new_page()
            # The token typed into the page lives in the tab's storage, not in its document.
            await page.goto(served.url)
            await page.fill("#operator-token", TOKEN)
            await page.click("#token-box button[type=submit]")
            for path in ("", f"workflows/{workflow_id}", "attention", "exposure",
                         "exposure.json", "readyz", "healthz", "static/dashboard.js",
                         "static/dashboard.css", "metrics", "workflows/nope", "nothing"):
                response = await page.goto(served.url + path)
                assert response is not None
                seen.append(await response.text())
                seen.append(json.dumps(dict(response.headers)))
                if path in ("", f"workflows/{workflow_id}", "exposure"):
                    seen.append(await page.content())
            await eventually(lambda: load(store, workflow_id), lambda f: f.state == "done",
                             timeout=60, what="the workflow done")
            # A refused action's reply and its log line.
            refused = await page.request.post(served.url + "actions/pause", form={
                "command_id": "c", "workflow_id": workflow_id, "token": TOKEN + "x"})
            seen.append(await refused.text())
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)
    assert any("event: change" in s for s in seen), "the event stream said nothing"
    everything = "\n".join(seen) + caplog.text
    for secret in secret_values:
        assert secret not in everything
    # Nor the one a user would see in the URL.
    assert f"svc:{nats_password}" not in everything


async def _read_events(url: str, into: list[str]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as response:
        async for chunk in response.content.iter_any():
            into.append(chunk.decode())
