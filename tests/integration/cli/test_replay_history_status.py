"""`rebalancer replay [--verify]`, `history` and `status` on real PostgreSQL, through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid
from dataclasses import asdict
from typing import Any

import psycopg
import pytest

from events.catalogue import TaskStateChanged
from events.store import EventStore, RecordedEvent
from projections import workflows
from projections.replay import compare, rebuild, verify
from projections.runner import ProjectionRunner, default_projections
from projections.workflows import WorkflowsProjection
from rebalancer import cli
from tests.conftest import ROOT
from tests.support.synthetic import History, interleaved, make_history

HISTORIES = 36


# -- helpers: each opens its own store inside asyncio.run, as the CLI does -------------------


def seed(database_url: str, count: int = HISTORIES, seed: int = 17,
         project: bool = True) -> list[History]:
    """Append `count` synthetic histories, interleaved, and (by default) run the projections."""
    rng = random.Random(seed)
    histories = [make_history(rng) for _ in range(count)]

    async def go() -> None:
        async with await EventStore.open(database_url) as store:
            for stream, version, batch in interleaved(histories, rng):
                await store.append(stream, batch, version)
            if project:
                await ProjectionRunner(store, default_projections()).catch_up()

    asyncio.run(go())
    return histories


def project(database_url: str, projections: list[Any] | None = None) -> None:
    async def go() -> None:
        async with await EventStore.open(database_url) as store:
            await ProjectionRunner(store, projections or default_projections()).catch_up()

    asyncio.run(go())


def stream(database_url: str, stream_id: str) -> list[RecordedEvent]:
    async def go() -> list[RecordedEvent]:
        async with await EventStore.open(database_url) as store:
            return await store.read_stream(stream_id)

    return asyncio.run(go())


def query(database_url: str, text: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute(text, params)
        return cur.fetchall() if cur.description else []


def tables(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "workflows": query(database_url, "select * from workflows order by workflow_id"),
        "exposure_items": query(
            database_url, "select * from exposure_items order by workflow_id, task_index"
        ),
    }


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], database_url: str,
        *argv: str) -> tuple[int, str, str]:
    """`rebalancer ARGV` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setenv("REBALANCER_DATABASE_URL", database_url)
    try:
        code = cli.main(list(argv))
    except SystemExit as ended:  # bad usage (`--at 0`): the parser exits, as `rebalancer` does
        assert isinstance(ended.code, int)
        code = ended.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def workflow_id(history: History) -> str:
    return history.stream_id.removeprefix("workflow-")


def as_json(value: Any) -> Any:
    """What the CLI's JSON of `value` reads back as."""
    return json.loads(json.dumps(value, default=cli.json_default))


def folded(events: list[RecordedEvent]) -> Any:
    """The view of `events` folded by hand, as `status --json` shows one."""
    view = workflows.fold(events)
    assert view is not None
    return as_json(asdict(view))


# -- replay --verify ----------------------------------------------------------------------------


def test_verify_on_an_untouched_database_finds_the_read_models_match(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(database_url)
    items = query(database_url, "select count(*) from exposure_items")[0][0]
    assert items, "the histories should leave some exposure items"

    code, out, err = run(monkeypatch, capsys, database_url, "replay", "--verify")

    assert (code, err) == (0, "")
    assert out.strip() == (
        f"read models match the events ({HISTORIES} workflows, {items} exposure items)"
    )


def test_verify_names_a_hand_edited_workflow_and_the_column_state(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    histories = seed(database_url)
    edited = next(h for h in histories if h.final_state != "done")
    query(database_url, "update workflows set state = 'done' where workflow_id = %s",
          (workflow_id(edited),))

    code, out, _ = run(monkeypatch, capsys, database_url, "replay", "--verify")

    assert code == 1
    lines = out.strip().splitlines()
    assert lines[0] == (
        f'workflows workflow_id={workflow_id(edited)}, state: "done" -> "{edited.final_state}"'
    )
    assert lines[-1].startswith("1 difference(s)")


def test_verify_reports_a_deleted_exposure_item_and_an_extra_workflows_row(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(database_url)
    deleted_workflow, deleted_index = query(
        database_url, "select workflow_id, task_index from exposure_items limit 1"
    )[0]
    query(database_url, "delete from exposure_items where workflow_id = %s and task_index = %s",
          (deleted_workflow, deleted_index))
    extra = str(uuid.uuid4())
    query(
        database_url,
        "insert into workflows (workflow_id, stream_id, spec_name, spec, params, command_id,"
        " state, tasks, version, last_position)"
        " values (%s, %s, 'ghost', '{}', '{}', 'cmd-ghost', 'running', '[]', 3, 999999)",
        (extra, f"workflow-{extra}"),
    )

    code, out, _ = run(monkeypatch, capsys, database_url, "replay", "--verify")
    assert code == 1
    assert (f"exposure_items workflow_id={deleted_workflow}, task_index={deleted_index}:"
            " missing from the live read model") in out
    assert f"workflows workflow_id={extra}: only in the live read model" in out
    assert "spec_name=\"ghost\"" in out

    code, out, _ = run(monkeypatch, capsys, database_url, "replay", "--verify", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    kinds = {(d["table"], d["kind"]): d for d in report["differences"]}
    assert set(kinds) == {("exposure_items", "only_rebuilt"), ("workflows", "only_live")}
    assert kinds["workflows", "only_live"]["key"] == {"workflow_id": extra}
    assert kinds["exposure_items", "only_rebuilt"]["key"] == {
        "workflow_id": str(deleted_workflow), "task_index": str(deleted_index)
    }


def test_verify_compares_at_each_live_checkpoint_while_projections_lag(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(database_url)
    # More events arrive; only the workflows projection follows them, exposure stays behind.
    seed(database_url, count=10, seed=99, project=False)
    project(database_url, [WorkflowsProjection()])
    seed(database_url, count=5, seed=101, project=False)

    code, out, _ = run(monkeypatch, capsys, database_url, "replay", "--verify", "--json")

    assert code == 0, out
    report = json.loads(out)
    assert report["rows"]["workflows"] == HISTORIES + 10  # the last five are not projected
    assert report["checkpoints"]["workflows"]["position"] > (
        report["checkpoints"]["exposure"]["position"]
    )


async def test_verify_names_a_path_inside_a_json_column(store: EventStore) -> None:
    rng = random.Random(4)
    history = make_history(rng)
    for stream_id, version, batch in interleaved([history], rng):
        await store.append(stream_id, batch, version)
    await ProjectionRunner(store, default_projections()).catch_up()
    async with store.connection() as conn:
        await conn.execute(
            "update workflows set tasks = jsonb_set(tasks, '{0,state}', '\"failed\"')"
            " where stream_id = %s", (history.stream_id,)
        )

    differences = await verify(store)

    assert [(d.table, d.column, d.live, d.rebuilt, d.kind) for d in differences] == [
        ("workflows", "tasks[0].state", "failed", history.task_states[0], "differs")
    ]
    assert differences[0].key == (("workflow_id", workflow_id(history)),)


async def test_verify_finds_no_difference_while_events_arrive_and_a_live_runner_follows(
    store: EventStore,
) -> None:
    rng = random.Random(31)
    appends = interleaved([make_history(rng) for _ in range(60)], rng)
    stop = asyncio.Event()
    live = asyncio.create_task(
        ProjectionRunner(store, default_projections(), batch_size=13, poll_interval=0.05).run(stop)
    )

    async def append_slowly() -> None:
        for stream_id, version, batch in appends:
            await store.append(stream_id, batch, version)
            await asyncio.sleep(0.002)

    writer = asyncio.create_task(append_slowly())
    try:
        # Each verify copies the live models mid-flight and rebuilds to the same checkpoints.
        seen = []
        for _ in range(4):
            found = await compare(store)
            assert found.differences == []
            seen.append(found.checkpoints["workflows"].position)
        assert not writer.done() or seen[0] < seen[-1], "verify should overlap the appends"
        await writer
    finally:
        stop.set()
        await asyncio.wait_for(live, 30)
    assert await verify(store) == []


# -- poison stops ---------------------------------------------------------------------------


def test_verify_reports_a_poison_stop_and_replay_stops_at_it_again(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    histories = seed(database_url, count=5)
    poisoned = make_history(random.Random(8))
    bad = TaskStateChanged(task_index=1, task_name="withdraw_to_interim", kind="withdraw",
                           trigger="submit", source="created", dest="submitting",
                           request_params={"currency": "ETH"})  # no amount: exposure refuses

    async def append_poison() -> None:
        async with await EventStore.open(database_url) as store:
            await store.append(poisoned.stream_id, poisoned.appends[0], 0)
            await store.append(poisoned.stream_id, [bad], len(poisoned.appends[0]))
            await ProjectionRunner(store, default_projections()).catch_up()

    asyncio.run(append_poison())

    code, out, _ = run(monkeypatch, capsys, database_url, "replay", "--verify")
    assert code == 1
    assert out.startswith("projection exposure: the live one is stopped by a poison event:")
    assert poisoned.stream_id in out
    assert "difference(s)" in out.splitlines()[-1]

    code, out, _ = run(monkeypatch, capsys, database_url, "replay")
    assert code == 1
    assert "stopped: projection exposure stopped at TaskStateChanged" in out
    assert query(database_url, "select count(*) from workflows")[0][0] == len(histories) + 1


def test_replay_rebuilds_the_same_rows_and_clears_a_recorded_poison_stop(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    histories = seed(database_url)
    before = tables(database_url)
    # A stop recorded by an earlier, since fixed, version of the projection code.
    query(database_url, "update projection_checkpoints set error = 'KeyError: amount',"
          " error_position = 7 where name = 'exposure'")
    code, out, _ = run(monkeypatch, capsys, database_url, "replay", "--verify")
    assert code == 1
    assert out.startswith("projection exposure: the live one is stopped by a poison event:"
                          " KeyError: amount")

    code, out, _ = run(monkeypatch, capsys, database_url, "replay")

    assert code == 0, out
    events = sum(len(h.events) for h in histories)
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["workflows", str(events), "events"]
    assert lines[1].split()[:3] == ["exposure", str(events), "events"]
    assert lines[2].split()[:1] == ["alerts"]
    assert lines[-1].startswith(f"rebuilt: {len(default_projections())} read models in")
    assert tables(database_url) == before
    assert query(database_url, "select name, error from projection_checkpoints order by name") == [
        ("alerts", None), ("exposure", None), ("workflows", None)
    ]
    code, _, _ = run(monkeypatch, capsys, database_url, "replay", "--verify")
    assert code == 0


async def test_rebuild_returns_the_events_applied_to_every_projection(store: EventStore) -> None:
    rng = random.Random(21)
    histories = [make_history(rng) for _ in range(10)]
    for stream_id, version, batch in interleaved(histories, rng):
        await store.append(stream_id, batch, version)

    applied = await rebuild(store)

    assert applied == len(default_projections()) * sum(len(h.events) for h in histories)
    found = await compare(store)
    assert found.ok and found.rows["workflows"] == 10


# -- status ---------------------------------------------------------------------------------


def test_status_at_a_version_equals_folding_the_stream_by_hand(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    histories = seed(database_url)
    for history in sorted(histories, key=lambda h: -len(h.events))[:3]:
        events = stream(database_url, history.stream_id)
        for version in sorted({1, 2, len(events) // 2, len(events) - 1, len(events)}):
            code, out, err = run(monkeypatch, capsys, database_url, "status",
                                 workflow_id(history), "--at", str(version), "--json")
            assert (code, err) == (0, f"rebalancer: as of version {version}, recorded at "
                                      f"{cli.when(events[version - 1].recorded_at)}\n")
            assert json.loads(out) == folded(events[:version])

    history = histories[0]
    events = stream(database_url, history.stream_id)
    code, out, _ = run(monkeypatch, capsys, database_url, "status", workflow_id(history),
                       "--at", "2")
    assert code == 0
    assert f"as of version 2, recorded at {cli.when(events[1].recorded_at)}" in out
    assert "state     running" in out


def test_status_of_one_workflow_reads_the_read_model(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    histories = seed(database_url)
    for history in histories[:5]:
        code, out, err = run(monkeypatch, capsys, database_url, "status", workflow_id(history),
                             "--json")
        assert (code, err) == (0, "")
        view = json.loads(out)
        assert view["state"] == history.final_state
        assert [t["state"] for t in view["tasks"]] == history.task_states
        assert view == folded(stream(database_url, history.stream_id))

    failed = next((h for h in histories if h.final_state == "failed"), histories[0])
    code, out, _ = run(monkeypatch, capsys, database_url, "status", workflow_id(failed))
    assert code == 0
    assert f"workflow {workflow_id(failed)}  upbit_to_binance_sub_futures" in out
    assert f"state     {failed.final_state}" in out
    assert "buy_in_source_spot" in out and "sub_spot_to_futures" in out
    if failed.final_state == "failed":
        assert "error: insufficient funds (rejected)" in out


def test_status_falls_back_to_folding_when_the_projection_is_behind(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(database_url, count=3)
    (late,) = seed(database_url, count=1, seed=55, project=False)

    code, out, err = run(monkeypatch, capsys, database_url, "status", workflow_id(late))
    assert code == 0
    assert "not in the workflows read model yet" in out
    assert f"state     {late.final_state}" in out

    code, out, err = run(monkeypatch, capsys, database_url, "status", workflow_id(late), "--json")
    assert code == 0 and "not in the workflows read model yet" in err
    assert json.loads(out)["version"] == len(late.events)


def test_status_without_an_id_lists_the_newest_workflows(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    histories = seed(database_url)

    code, out, _ = run(monkeypatch, capsys, database_url, "status", "--json", "--limit", "100")
    assert code == 0
    listed = json.loads(out)
    assert {w["workflow_id"] for w in listed} == {workflow_id(h) for h in histories}
    stamps = [w["updated_at"] for w in listed]
    assert stamps == sorted(stamps, reverse=True)

    code, out, _ = run(monkeypatch, capsys, database_url, "status", "--json", "--state", "done",
                       "--limit", "100")
    done = {workflow_id(h) for h in histories if h.final_state == "done"}
    assert code == 0 and {w["workflow_id"] for w in json.loads(out)} == done

    code, out, _ = run(monkeypatch, capsys, database_url, "status")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 1 + 20  # a header and the default limit
    assert lines[0].split() == ["workflow_id", "spec", "state", "task", "updated_at"]
    assert lines[1].startswith(listed[0]["workflow_id"])

    code, out, _ = run(monkeypatch, capsys, database_url, "status", "--limit", "3")
    assert len(out.strip().splitlines()) == 4


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "not-a-uuid"],
        ["status", "{unknown}"],
        ["status", "{known}", "--at", "0"],
        ["status", "{known}", "--at", "-2"],
        ["status", "{known}", "--at", "{beyond}"],
        ["status", "{unknown}", "--at", "1"],
        ["status", "--state", "sleeping"],
        ["status", "--at", "1"],
        ["history", "not-a-uuid"],
        ["history", "{unknown}"],
    ],
)
def test_bad_ids_and_versions_exit_2_with_one_line(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    (history,) = seed(database_url, count=1)
    values = {"known": workflow_id(history), "unknown": str(uuid.uuid4()),
              "beyond": str(len(history.events) + 1)}
    code, out, err = run(monkeypatch, capsys, database_url, *(a.format(**values) for a in argv))
    assert code == 2
    assert out == ""
    assert err.startswith("rebalancer: ") and err.count("\n") == 1, err


# -- history --------------------------------------------------------------------------------


def test_history_json_lists_every_stored_event_in_version_order(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    histories = seed(database_url, count=8)
    for history in histories:
        code, out, _ = run(monkeypatch, capsys, database_url, "history", workflow_id(history),
                           "--json")
        assert code == 0
        listed = json.loads(out)
        assert [e["version"] for e in listed] == list(range(1, len(history.events) + 1))
        assert [(e["type"], e["data"]) for e in listed] == [
            (e.type_name, e.model_dump(mode="json")) for e in history.events
        ]
        stored = stream(database_url, history.stream_id)
        assert [e["position"] for e in listed] == [e.position for e in stored]
        assert [e["recorded_at"] for e in listed] == [e.recorded_at.isoformat() for e in stored]
        assert all(e["schema_version"] == 1 and e["metadata"] == {} for e in listed)


def test_history_table_shows_each_event_with_its_trigger_and_key_fields(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    histories = seed(database_url, count=8)
    history = max(histories, key=lambda h: len(h.events))

    code, out, _ = run(monkeypatch, capsys, database_url, "history", workflow_id(history))

    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == f"workflow {workflow_id(history)}: {len(history.events)} events"
    assert lines[1].split() == ["recorded_at", "v", "task", "trigger", "move", "details"]
    rows = lines[2:]
    assert len(rows) == len(history.events)
    for row, event in zip(rows, history.events, strict=True):
        data = event.model_dump(mode="json")
        assert f" {data.get('task_name', '_workflow')} " in row
        if "trigger" in data:
            assert f" {data['trigger']} " in row
            assert f"{data['source']} -> {data['dest']}" in row
        for key in ("amount", "currency", "client_id", "txid"):
            value = (data.get("request_params") or {}).get(key)
            if value is not None:
                assert f"{key}={value}" in row
    assert "spec upbit_to_binance_sub_futures" in rows[0]


def test_history_runs_as_a_module_in_a_subprocess(database_url: str) -> None:
    (history,) = seed(database_url, count=1)
    env = {**os.environ, "REBALANCER_DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-m", "rebalancer", "history", workflow_id(history)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"{len(history.events)} events" in done.stdout
