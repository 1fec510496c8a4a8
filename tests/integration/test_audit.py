"""The audit on real PostgreSQL: clean histories pass, every kind of tampering is named."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from events.store import EventStore
from projections.runner import ProjectionRunner, default_projections
from rebalancer.audit import (
    AuditInputError,
    AuditReport,
    Finding,
    audit,
    format_report,
    run_audit,
)
from rebalancer.errors import RebalancerError
from tests.support.synthetic import (
    SEED_TASKS,
    History,
    done_history,
    interleaved,
    make_history,
)

SPEC = {
    "name": "upbit_to_binance_sub_futures",
    "tasks": [{"name": name, "kind": kind, "config": {}} for name, kind in SEED_TASKS],
}

Raw = dict[str, Any]


@pytest.fixture
async def sql(admin_database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection beside the store's, to tamper with rows as an intruder would: the service
    may not, and the events guard stops the owner, so a superuser skipping triggers (what an
    attacker with superuser would do; docs/security.md)."""
    async with await psycopg.AsyncConnection.connect(admin_database_url, autocommit=True) as conn:
        await conn.execute("set session_replication_role = replica")
        yield conn


def new_stream() -> str:
    return f"workflow-{uuid.uuid4()}"


def created(spec: Raw | None = None) -> Raw:
    return {"type": "WorkflowCreated", "data": {
        "spec_name": "upbit_to_binance_sub_futures", "spec": SPEC if spec is None else spec,
        "params": {"from_amount": "1000000"}, "command_id": f"cmd-{uuid.uuid4().hex}"}}


def flow(trigger: str, source: str, dest: str) -> Raw:
    return {"type": "WorkflowStateChanged",
            "data": {"trigger": trigger, "source": source, "dest": dest, "reason": None}}


def task(index: int, trigger: str, source: str, dest: str, *, kind: str | None = None,
         name: str | None = None) -> Raw:
    seed_name, seed_kind = SEED_TASKS[index] if index < len(SEED_TASKS) else ("extra", "trade")
    return {"type": "TaskStateChanged", "data": {
        "task_index": index, "task_name": name or seed_name, "kind": kind or seed_kind,
        "trigger": trigger, "source": source, "dest": dest}}


async def append_raw(conn: psycopg.AsyncConnection[Any], stream_id: str, events: list[Raw]) -> None:
    """Append through the SQL function, so the hash chain over the rows is intact."""
    cur = await conn.execute("select count(*) from events where stream_id = %s", (stream_id,))
    row = await cur.fetchone()
    assert row is not None
    body = [{"schema_version": 1, "metadata": {}, **event} for event in events]
    await conn.execute(
        "select * from append_events(%s, %s, %s::jsonb)", (stream_id, row[0], json.dumps(body))
    )


async def append_history(store: EventStore, history: History) -> None:
    version = 0
    for batch in history.appends:
        version = (await store.append(history.stream_id, batch, version)).version


def found(report: AuditReport, stream_id: str | None = None) -> set[tuple[str, int | None]]:
    return {(f.check, f.version) for f in report.findings if stream_id in (None, f.stream_id)}


async def catch_up(store: EventStore) -> None:
    await ProjectionRunner(store, default_projections()).catch_up()


# -- clean histories ----------------------------------------------------------------------------


async def test_synthetic_histories_audit_clean(store: EventStore) -> None:
    rng = random.Random(20240611)
    histories = [make_history(rng) for _ in range(40)]
    for stream_id, expected, batch in interleaved(histories, rng):
        await store.append(stream_id, batch, expected)
    # Before the read model exists and after it caught up, nothing is wrong.
    before = await audit(store)
    await catch_up(store)
    report = await audit(store)
    total = sum(len(h.events) for h in histories)
    for each in (before, report):
        assert each.findings == []
        assert each.ok and each.bad_streams == []
        assert (each.streams, each.events) == (40, total)
    assert format_report(report) == (f"audited 40 streams, {total} events: all intact\n"
                                     "not checked against the JetStream copy (no NATS given)")
    # One workflow alone, by its bare id.
    one = histories[3]
    single = await audit(store, one.stream_id.removeprefix("workflow-"))
    assert (single.streams, single.events, single.findings) == (1, len(one.events), [])


# -- tampering with stored rows -----------------------------------------------------------------


async def test_an_edited_dest_breaks_the_hash_chain_and_the_machine(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    history = done_history(1)
    await append_history(store, history)
    # The first withdraw's submit (created -> submitting) now claims to have gone to done.
    versions = [i + 1 for i, e in enumerate(history.events)
                if getattr(e, "kind", None) == "withdraw" and getattr(e, "trigger", "") == "submit"]
    edited = versions[0]
    await sql.execute(
        "update events set data = jsonb_set(data, '{dest}', '\"done\"')"
        " where stream_id = %s and version = %s", (history.stream_id, edited),
    )
    report = await audit(store)
    # The chain breaks at the edited event only; the machine refuses the edited dest, and the
    # task's next move (accept from submitting) no longer starts where the stored dest left it.
    assert found(report) == {
        ("hash_chain", edited), ("legality", edited), ("legality", edited + 1)
    }
    by_check = {(f.check, f.version): f for f in report.findings}
    assert "the table says 'submitting'" in by_check["legality", edited].message
    assert "but the task is in 'done'" in by_check["legality", edited + 1].message
    assert report.bad_streams == [history.stream_id]
    assert all(f.position is not None for f in report.findings)


async def test_an_edited_amount_is_only_a_hash_chain_finding(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    history = done_history(2)
    await append_history(store, history)
    # Version 3 is the first trade's submit; its amount changes, its move does not.
    await sql.execute(
        "update events set data = jsonb_set(data, '{request_params,amount}', '\"999\"')"
        " where stream_id = %s and version = 3", (history.stream_id,),
    )
    report = await audit(store)
    assert [(f.stream_id, f.version, f.check) for f in report.findings] == [
        (history.stream_id, 3, "hash_chain")
    ]


async def test_a_deleted_middle_event_is_a_version_gap_and_a_broken_chain(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    history = done_history(3)
    await append_history(store, history)
    # Version 3 is task 0's submit: without it, version 4 (accept) starts from nowhere.
    await sql.execute(
        "delete from events where stream_id = %s and version = 3", (history.stream_id,)
    )
    report = await audit(store)
    assert found(report) == {("versions", 4), ("hash_chain", 4), ("legality", 4)}
    assert report.events == len(history.events) - 1
    gap = next(f for f in report.findings if f.check == "versions")
    assert "1 event(s) missing" in gap.message


async def test_a_deleted_last_event_is_found_through_the_read_model(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    history, other = done_history(4), done_history(5)
    await append_history(store, history)
    await append_history(store, other)
    await catch_up(store)
    last = len(history.events)
    await sql.execute(
        "delete from events where stream_id = %s and version = %s", (history.stream_id, last)
    )
    # A shorter stream is still a legal, intact chain: only the read model remembers more.
    report = await audit(store)
    assert report.findings == [
        Finding(history.stream_id, last, None, "missing_tail",
                f"read model saw version {last}, the stream ends at {last - 1}")
    ]
    assert (await audit(store, history.stream_id)).findings == report.findings
    # A stream with every event deleted is named too, from the read model alone.
    await sql.execute("delete from events where stream_id = %s", (other.stream_id,))
    report = await audit(store)
    assert found(report, other.stream_id) == {("missing_tail", 1)}
    assert report.streams == 2
    gone = await audit(store, other.stream_id)
    assert [f.message for f in gone.findings] == [
        f"read model saw version {len(other.events)}, the stream has no events"
    ]


async def test_the_audit_runs_without_a_read_model(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    history = done_history(6)
    await append_history(store, history)
    await sql.execute("drop table workflows")
    report = await audit(store)
    assert report.ok and (report.streams, report.events) == (1, len(history.events))


# -- illegal moves with an intact chain ---------------------------------------------------------

RUNNING = [created(), flow("start", "created", "running")]  # versions 1, 2

ILLEGAL: dict[str, tuple[list[Raw], set[tuple[str, int | None]], str]] = {
    "withdraw created -> done by complete": (
        [task(1, "complete", "created", "done")],
        {("legality", 3)}, "cannot 'complete' from 'created'",
    ),
    "workflow source is not the current state": (
        [flow("resume", "paused", "running")],
        {("legality", 3)}, "'paused' --resume--> 'running' but the workflow is in 'running'",
    ),
    "wrong stored task dest": (
        [task(0, "submit", "created", "requested")],
        {("legality", 3)}, "the table says 'submitting'",
    ),
    "wrong stored workflow dest": (
        [flow("pause", "running", "canceled")],
        {("legality", 3)}, "the table says 'paused'",
    ),
    "a move after a terminal state": (
        [flow("complete", "running", "done"), flow("start", "done", "running")],
        {("legality", 4)}, "allowed from there: none (terminal)",
    ),
    "task kind differs from the spec": (
        [task(0, "submit", "created", "submitting", kind="withdraw")],
        {("legality", 3)}, "task 0 is a 'trade' task in the spec, this event says 'withdraw'",
    ),
    "task name changes": (
        [task(0, "submit", "created", "submitting"),
         task(0, "accept", "submitting", "requested", name="someone_else")],
        {("legality", 4)}, "this event says trade 'someone_else'",
    ),
    "task index beyond the spec": (
        [task(8, "submit", "created", "submitting")],
        {("legality", 3)}, "task_index 8 is beyond the spec's 8 tasks",
    ),
    "a second WorkflowCreated": (
        [created()], {("legality", 3)}, "a second WorkflowCreated (the first is v1)",
    ),
}


@pytest.mark.parametrize("case", list(ILLEGAL))
async def test_an_illegal_move_with_a_valid_hash_is_a_legality_finding(
    store: EventStore, sql: psycopg.AsyncConnection[Any], case: str
) -> None:
    appended, expected, message = ILLEGAL[case]
    stream_id = new_stream()
    await append_raw(sql, stream_id, [*RUNNING, *appended])
    report = await audit(store)
    # No hash or version finding: the rows were written by the append function itself.
    assert found(report) == expected
    assert any(message in f.message for f in report.findings), format_report(report)


async def test_a_task_kind_change_is_found_without_a_spec_task_list(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    stream_id = new_stream()
    await append_raw(sql, stream_id, [
        created({"name": "bare"}), flow("start", "created", "running"),
        task(0, "submit", "created", "submitting", kind="transfer"),
        task(0, "accept", "submitting", "requested", kind="withdraw"),
    ])
    report = await audit(store)
    assert found(report) == {("legality", 4)}
    assert "task 0 was transfer" in report.findings[0].message


async def test_every_bad_event_is_named_in_one_run(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    stream_id = new_stream()
    await append_raw(sql, stream_id, [
        flow("start", "created", "running"),  # no WorkflowCreated first
        flow("resume", "paused", "running"),  # not where the workflow is
        task(1, "complete", "created", "done"),  # not a move of the withdraw table
        task(1, "update", "done", "processing"),  # after a terminal state (continues from done)
        flow("pause", "running", "paused"),  # legal again
    ])
    report = await audit(store)
    assert found(report) == {("legality", 1), ("legality", 2), ("legality", 3), ("legality", 4)}
    assert "the stream begins with WorkflowStateChanged" in report.findings[0].message


# -- undecodable events -------------------------------------------------------------------------


async def test_an_undecodable_event_is_a_schema_finding(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    unknown, bad_data = new_stream(), new_stream()
    await append_raw(sql, unknown, [
        *RUNNING, {"type": "WorkflowExploded", "data": {"boom": True}},
        flow("pause", "running", "paused"),
    ])
    await append_raw(sql, bad_data, [
        *RUNNING,
        {"type": "TaskStateChanged", "data": {**task(0, "submit", "created", "submitting")["data"],
                                              "surprise": 1}},
        task(0, "accept", "submitting", "requested"),  # follows the undecodable move's dest
    ])
    report = await audit(store)
    assert found(report, unknown) == {("schema", 3)}
    assert found(report, bad_data) == {("schema", 3)}
    messages = {f.stream_id: f.message for f in report.findings}
    assert "unknown event type 'WorkflowExploded'" in messages[unknown]
    assert "surprise" in messages[bad_data]


async def test_a_stream_id_outside_the_contract_is_a_schema_finding(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    await append_raw(sql, "junk-1", RUNNING)
    report = await audit(store)
    assert report.findings == [
        Finding("junk-1", None, None, "schema", "stream id is not workflow-<uuid>")
    ]


# -- the command's entry point ------------------------------------------------------------------


async def test_run_audit_exits_0_when_intact_and_1_naming_each_bad_stream(
    store: EventStore, sql: psycopg.AsyncConnection[Any], database_url: str
) -> None:
    histories = [done_history(seed) for seed in (10, 11, 12)]
    for history in histories:
        await append_history(store, history)
    total = sum(len(h.events) for h in histories)
    assert await run_audit(database_url, None, False) == (
        0, f"audited 3 streams, {total} events: all intact\n"
        "not checked against the JetStream copy (no NATS given)"
    )
    # Two streams tampered with: one payload edited, one illegal move appended.
    first, second, good = histories
    await sql.execute(
        "update events set metadata = '{\"actor\": \"mallory\"}'"
        " where stream_id = %s and version = 2", (first.stream_id,),
    )
    await append_raw(sql, second.stream_id, [flow("start", "done", "running")])
    status, text = await run_audit(database_url, None, False)
    head, *lines = text.splitlines()
    assert status == 1
    assert head == f"audited 3 streams, {total + 1} events: 2 findings in 2 streams"
    by_stream = {line.split(" ", 1)[0]: line for line in lines}
    edited, illegal = by_stream[first.stream_id], by_stream[second.stream_id]
    assert edited.startswith(f"{first.stream_id} v2 (position ")
    assert edited.endswith("[hash_chain] hash does not match the event's content and its"
                           " predecessor's hash")
    assert illegal.startswith(f"{second.stream_id} v{len(second.events) + 1} (position ")
    assert "[legality] workflow: 'done' --start--> 'running'" in illegal
    assert good.stream_id not in text
    # JSON for scripts; one workflow alone is judged on its own stream.
    status, text = await run_audit(database_url, None, True)
    body = json.loads(text)
    assert (status, body["ok"]) == (1, False)
    assert body["bad_streams"] == sorted([first.stream_id, second.stream_id])
    assert {f["check"] for f in body["findings"]} == {"hash_chain", "legality"}
    good_id = good.stream_id.removeprefix("workflow-")
    assert (await run_audit(database_url, good_id, False))[0] == 0
    assert (await run_audit(database_url, first.stream_id, False))[0] == 1


@pytest.mark.parametrize("workflow_id", ["not-a-uuid", "", str(uuid.uuid4())])
async def test_run_audit_refuses_a_bad_or_unknown_workflow_id(
    database_url: str, workflow_id: str
) -> None:
    with pytest.raises(AuditInputError) as refused:
        await run_audit(database_url, workflow_id, False)
    # The CLI maps either base to exit status 2.
    assert isinstance(refused.value, RebalancerError)
    assert isinstance(refused.value, ValueError)
    assert ("is not a UUID" in str(refused.value)) != ("has no events" in str(refused.value))


# -- hash versions (migration 012) --------------------------------------------------------------


async def test_v1_rows_from_before_012_audit_clean_and_a_downgrade_is_found(
    store: EventStore, sql: psycopg.AsyncConnection[Any]
) -> None:
    history = done_history(13)
    stream_id = history.stream_id
    await append_history(store, history)
    # Rewrite the first five rows as migration 001 hashed them (v1: no position, no
    # recorded_at), then re-chain the rest on top, as a store upgraded mid-stream holds them.
    rows = await (await sql.execute(
        "select version from events where stream_id = %s order by version", (stream_id,)
    )).fetchall()
    previous = b""
    for (version,) in rows:
        canonical = ("event_canonical(stream_id, version, type, schema_version, data, metadata)"
                     if version <= 5 else
                     "event_canonical_v2(position, stream_id, version, type, schema_version,"
                     " data, metadata, recorded_at)")
        cur = await sql.execute(
            f"update events set hash = sha256(%s || {canonical}),"
            " hash_version = case when version <= 5 then 1 else 2 end"
            " where stream_id = %s and version = %s returning hash",
            (previous, stream_id, version),
        )
        row = await cur.fetchone()
        assert row is not None
        previous = bytes(row[0])
    assert (await audit(store)).findings == []
    # v1 after v2: an intruder switching a row to the form that does not cover recorded_at.
    await sql.execute("update events set hash_version = 1 where stream_id = %s and version = 7",
                      (stream_id,))
    assert found(await audit(store)) == {("hash_chain", 7)}
    messages = {f.message for f in (await audit(store)).findings}
    assert "hash version 1 follows version 2" in messages
