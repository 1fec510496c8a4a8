"""Operator commands on real PostgreSQL: legal moves only, idempotent by command id."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from events.catalogue import TaskStateChanged, WorkflowStateChanged
from events.migrations import MIGRATIONS_DIR
from events.store import EventStore
from rebalancer.accounts import load_accounts
from rebalancer.commands import CommandError, control_workflow, resolve_task, start_workflow
from rebalancer.specs.loading import builtin_specs
from rebalancer.workflow import decide, fold
from tests.support import event_count

PARAMS = {"from_account": "upbit-personal", "to_account": "binance-corp-sub",
          "from_currency": "KRW", "interim_currency": "ETH", "to_currency": "USDT",
          "from_amount": "1000000"}


async def started(store: EventStore) -> str:
    spec = builtin_specs()["upbit_to_binance_sub_futures"]
    workflow_id, _ = await start_workflow(store, spec, PARAMS, load_accounts())
    return workflow_id


async def move_to(store: EventStore, workflow_id: str, *moves: tuple[str, ...]) -> None:
    """Append hand-made legal moves: ("wf", trigger, source, dest) or (task, trigger, s, d)."""
    stream = f"workflow-{workflow_id}"
    for move in moves:
        version = await store.stream_version(stream)
        if move[0] == "wf":
            event = WorkflowStateChanged(trigger=move[1], source=move[2], dest=move[3])
        else:
            event = TaskStateChanged(task_index=0, task_name="buy_in_source_spot", kind="trade",
                                     trigger=move[1], source=move[2], dest=move[3],
                                     request_params={"client_id": "x"} if move[1] == "submit"
                                     else None)
        await store.append(stream, [event], version)


async def test_pause_resume_and_cancel_follow_the_workflow_machine(store: EventStore) -> None:
    workflow_id = await started(store)
    await move_to(store, workflow_id, ("wf", "start", "created", "running"))
    reply = await control_workflow(store, "pause", "c1", workflow_id, "ops window")
    assert reply == {"ok": True, "workflow_id": workflow_id, "state": "paused"}
    assert decide(fold(await store.read_stream(f"workflow-{workflow_id}"))) is None
    assert (await control_workflow(store, "resume", "c2", workflow_id))["state"] == "running"
    reply = await control_workflow(store, "cancel", "c3", workflow_id, "not needed")
    assert reply["state"] == "canceled"
    # The current task (not yet sent) was canceled with it.
    workflow = fold(await store.read_stream(f"workflow-{workflow_id}"))
    assert workflow.tasks[0].state == "canceled"


async def test_an_illegal_move_is_refused_and_appends_nothing(store: EventStore) -> None:
    workflow_id = await started(store)
    before = await event_count(store)
    reply = await control_workflow(store, "resume", "c1", workflow_id)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "illegal_transition"
    assert "created" in reply["error"]["message"]
    assert await event_count(store) == before


async def test_a_repeated_command_id_returns_the_first_reply_and_appends_nothing(
    store: EventStore,
) -> None:
    workflow_id = await started(store)
    await move_to(store, workflow_id, ("wf", "start", "created", "running"))
    first = await control_workflow(store, "pause", "same-id", workflow_id)
    after_first = await event_count(store)
    # Same id, same command again: the first outcome, nothing appended.
    assert await control_workflow(store, "pause", "same-id", workflow_id) == first
    assert await event_count(store) == after_first
    # A refused command's reply is kept too.
    refused = await control_workflow(store, "retry", "refused-id", workflow_id)
    assert refused["ok"] is False
    await control_workflow(store, "resume", "c9", workflow_id)
    assert await control_workflow(store, "retry", "refused-id", workflow_id) == refused


async def test_canceling_a_trade_in_flight_is_recorded_for_the_worker_to_carry_out(
    store: EventStore,
) -> None:
    workflow_id = await started(store)
    await move_to(store, workflow_id, ("wf", "start", "created", "running"),
                  ("task", "submit", "created", "submitting"))
    before = await event_count(store)
    reply = await control_workflow(store, "cancel", "c1", workflow_id, "wrong amount")
    # Only the request is stored: the worker cancels the order on the exchange, then ends it.
    assert reply == {"ok": True, "workflow_id": workflow_id, "state": "running",
                     "task": "buy_in_source_spot", "task_state": "canceling"}
    assert await event_count(store) == before + 1
    workflow = fold(await store.read_stream(f"workflow-{workflow_id}"))
    task = workflow.tasks[0]
    assert (workflow.state, task.state) == ("running", "canceling")
    assert task.error == {"code": "cancel_requested", "message": "wrong amount",
                          "actor": "operator", "from_state": "submitting"}
    # A second cancel (another id) while it is carried out appends nothing.
    again = await control_workflow(store, "cancel", "c2", workflow_id)
    assert again["ok"] is True and again["task_state"] == "canceling"
    assert await event_count(store) == before + 1


async def test_canceling_while_a_withdrawal_is_in_flight_is_a_conflict(store: EventStore) -> None:
    workflow_id = await started(store)
    stream = f"workflow-{workflow_id}"
    await move_to(store, workflow_id, ("wf", "start", "created", "running"))
    moves = [(0, "buy_in_source_spot", "trade", "submit", "created", "submitting"),
             (0, "buy_in_source_spot", "trade", "complete", "submitting", "done"),
             (1, "withdraw_to_interim", "withdraw", "submit", "created", "submitting")]
    for index, name, kind, trigger, source, dest in moves:
        await store.append(stream, [TaskStateChanged(
            task_index=index, task_name=name, kind=kind, trigger=trigger, source=source,
            dest=dest, request_params={"client_id": "x"} if trigger == "submit" else None)],
            await store.stream_version(stream))
    before = await event_count(store)
    reply = await control_workflow(store, "cancel", "c1", workflow_id)
    assert reply["error"]["code"] == "conflict"
    assert "in flight" in reply["error"]["message"]
    assert "pause the workflow and let it settle" in reply["error"]["message"]
    assert await event_count(store) == before


async def test_cancel_from_needs_attention_is_refused_once_an_intent_was_stored(
    store: EventStore,
) -> None:
    workflow_id = await started(store)
    await move_to(store, workflow_id, ("wf", "start", "created", "running"),
                  ("task", "submit", "created", "submitting"),
                  ("task", "escalate", "submitting", "needs_attention"),
                  ("wf", "escalate", "running", "needs_attention"))
    before = await event_count(store)
    reply = await control_workflow(store, "cancel", "c1", workflow_id)
    assert reply["error"]["code"] == "conflict"
    where = f"rebalancer resolve {workflow_id} buy_in_source_spot"
    assert f"{where} --outcome done" in reply["error"]["message"]
    assert reply["error"]["details"]["commands"] == [
        f"{where} --outcome done --note 'checked: it went through'",
        f"{where} --outcome failed --note 'checked: nothing moved'"]
    assert await event_count(store) == before


async def test_cancel_from_a_partial_fills_attention_proceeds_its_orders_all_ended(
    store: EventStore,
) -> None:
    workflow_id = await started(store)
    stream = f"workflow-{workflow_id}"
    await move_to(store, workflow_id, ("wf", "start", "created", "running"),
                  ("task", "submit", "created", "submitting"))
    refresh = {"extra": {"slices": [{"slice": 0, "status": "closed", "filled": "0.01"}],
                         "remainders": [{"account": "upbit-personal", "currency": "KRW",
                                         "amount": "960000", "reason": "partial_fill"}]}}
    await store.append(stream, [TaskStateChanged(
        task_index=0, task_name="buy_in_source_spot", kind="trade", trigger="escalate",
        source="submitting", dest="needs_attention", refresh_result=refresh,
        error={"code": "partial_fill", "message": "filled 4%"})],
        await store.stream_version(stream))
    await move_to(store, workflow_id, ("wf", "escalate", "running", "needs_attention"))
    # Every order ended and is recorded, the remainder too: nothing is hidden by canceling.
    reply = await control_workflow(store, "cancel", "c1", workflow_id)
    assert reply == {"ok": True, "workflow_id": workflow_id, "state": "canceled"}
    task = fold(await store.read_stream(stream)).tasks[0]
    assert task.state == "canceled"
    assert (task.refresh_result or {})["extra"]["remainders"][0]["amount"] == "960000"


async def test_cancel_from_needs_attention_proceeds_where_nothing_was_ever_sent(
    store: EventStore,
) -> None:
    workflow_id = await started(store)
    # Parked before any intent (the bulkhead escalates a task still in created): no exchange
    # call was ever made for it.
    await move_to(store, workflow_id, ("wf", "start", "created", "running"),
                  ("task", "escalate", "created", "needs_attention"),
                  ("wf", "escalate", "running", "needs_attention"))
    reply = await control_workflow(store, "cancel", "c1", workflow_id)
    assert reply == {"ok": True, "workflow_id": workflow_id, "state": "canceled"}
    workflow = fold(await store.read_stream(f"workflow-{workflow_id}"))
    assert workflow.tasks[0].state == "canceled"


@pytest.mark.parametrize(("outcome", "task_state"),
                         [("resend", "created"), ("done", "done"), ("failed", "failed")])
async def test_resolving_a_task_that_needs_attention(
    store: EventStore, outcome: str, task_state: str
) -> None:
    workflow_id = await started(store)
    await move_to(store, workflow_id, ("wf", "start", "created", "running"),
                  ("task", "submit", "created", "submitting"),
                  ("task", "escalate", "submitting", "needs_attention"),
                  ("wf", "escalate", "running", "needs_attention"))
    reply = await resolve_task(store, "r1", workflow_id, "BUY_IN_SOURCE_SPOT", outcome,
                               "checked the exchange by hand")
    assert reply == {"ok": True, "workflow_id": workflow_id, "task": "buy_in_source_spot",
                     "state": task_state}
    workflow = fold(await store.read_stream(f"workflow-{workflow_id}"))
    assert workflow.tasks[0].error is not None
    assert workflow.tasks[0].error["message"] == "checked the exchange by hand"
    # With nothing left needing attention, the worker's next decision resumes the workflow.
    action = decide(workflow)
    assert action is not None and getattr(action, "trigger", None) == "retry"


async def test_unknown_workflows_tasks_and_bad_ids_are_refused(store: EventStore) -> None:
    reply = await control_workflow(store, "pause", "c1", str(uuid.uuid4()))
    assert reply["error"]["code"] == "not_found"
    reply = await control_workflow(store, "pause", "c2", "not-a-uuid")
    assert reply["error"]["code"] == "invalid_request"
    workflow_id = await started(store)
    reply = await resolve_task(store, "c3", workflow_id, "no_such_task", "done", "x")
    assert reply["error"]["code"] == "not_found"
    reply = await resolve_task(store, "c4", workflow_id, "buy_in_source_spot", "done", "x")
    assert reply["error"]["code"] == "illegal_transition"


# -- command-id reuse: bound to its subject and body ------------------------------------------


@pytest.mark.parametrize(("kind", "reason"), [("pause", "other text"), ("cancel", None)],
                         ids=["other body", "other subject"])
async def test_a_reused_command_id_on_another_command_is_a_conflict_naming_the_first(
    store: EventStore, kind: str, reason: str | None
) -> None:
    workflow_id = await started(store)
    await move_to(store, workflow_id, ("wf", "start", "created", "running"))
    assert (await control_workflow(store, "pause", "k1", workflow_id))["ok"] is True
    before = await event_count(store)
    reply = await control_workflow(store, kind, "k1", workflow_id, reason)
    assert reply["ok"] is False and reply["error"]["code"] == "conflict"
    assert "used by a pause" in reply["error"]["message"]
    assert workflow_id in reply["error"]["message"]
    assert reply["error"]["details"]["kind"] == "pause"
    assert await event_count(store) == before


async def test_a_start_command_id_reused_by_a_cancel_is_a_conflict(store: EventStore) -> None:
    spec = builtin_specs()["upbit_to_binance_sub_futures"]
    workflow_id, _ = await start_workflow(store, spec, PARAMS, load_accounts(), command_id="s1")
    other = await started(store)
    await move_to(store, other, ("wf", "start", "created", "running"))
    reply = await control_workflow(store, "cancel", "s1", other)
    assert reply["error"]["code"] == "conflict"
    assert f"start on workflow {workflow_id}" in reply["error"]["message"]
    assert fold(await store.read_stream(f"workflow-{other}")).state == "running"


async def test_a_start_with_the_same_id_and_other_params_is_a_conflict(
    store: EventStore,
) -> None:
    spec = builtin_specs()["upbit_to_binance_sub_futures"]
    first, created = await start_workflow(store, spec, PARAMS, load_accounts(), command_id="s2")
    assert created
    again, created = await start_workflow(store, spec, PARAMS, load_accounts(), command_id="s2")
    assert (again, created) == (first, False)
    before = await event_count(store)
    with pytest.raises(CommandError) as refused:
        await start_workflow(store, spec, {**PARAMS, "from_amount": "2000000"},
                             load_accounts(), command_id="s2")
    assert refused.value.code == "conflict"
    assert await event_count(store) == before


async def test_twenty_concurrent_duplicates_yield_one_outcome(store: EventStore) -> None:
    workflow_id = await started(store)
    await move_to(store, workflow_id, ("wf", "start", "created", "running"))
    before = await event_count(store)
    replies = await asyncio.gather(
        *(control_workflow(store, "pause", "dup", workflow_id, "window") for _ in range(20)))
    assert all(r == replies[0] for r in replies)
    assert replies[0] == {"ok": True, "workflow_id": workflow_id, "state": "paused"}
    assert len(await store.events_of_command("dup")) == 1
    assert await event_count(store) == before + 1


async def test_twenty_concurrent_reuses_with_other_bodies_one_wins(store: EventStore) -> None:
    workflow_id = await started(store)
    await move_to(store, workflow_id, ("wf", "start", "created", "running"))
    replies = await asyncio.gather(
        *(control_workflow(store, "pause", "race", workflow_id, f"note {i}") for i in range(20)))
    codes = sorted(r["error"]["code"] if not r["ok"] else "ok" for r in replies)
    assert codes == ["conflict"] * 19 + ["ok"]
    assert len(await store.events_of_command("race")) == 1


async def test_twenty_concurrent_starts_with_one_id_and_other_params_create_one_workflow(
    store: EventStore,
) -> None:
    spec = builtin_specs()["upbit_to_binance_sub_futures"]
    results = await asyncio.gather(
        *(start_workflow(store, spec, {**PARAMS, "from_amount": str(1_000_000 + i)},
                         load_accounts(), command_id="race-start") for i in range(20)),
        return_exceptions=True)
    refused = [r for r in results if isinstance(r, CommandError)]
    assert len(refused) == 19 and all(r.code == "conflict" for r in refused)
    assert len(await store.events_of_command("race-start")) == 1


async def test_command_ids_used_before_they_were_bound_are_bound_by_the_backfill(
    store: EventStore, database_url: str
) -> None:
    # A store from before migration 009: the start's command id is in its event, unbound.
    spec = builtin_specs()["upbit_to_binance_sub_futures"]
    workflow_id, _ = await start_workflow(store, spec, PARAMS, load_accounts(),
                                          command_id="old-start")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("delete from command_ids where command_id = 'old-start'")
        await conn.execute(MIGRATIONS_DIR.joinpath("010_command_ids_backfill.sql").read_text())
    before = await event_count(store)
    reply = await control_workflow(store, "cancel", "old-start", workflow_id, "reused")
    assert reply["ok"] is False and reply["error"]["code"] == "conflict", reply
    assert reply["error"]["details"]["kind"] == "start"
    assert reply["error"]["details"]["workflow_id"] == workflow_id
    with pytest.raises(CommandError, match="was used by a start"):
        await start_workflow(store, spec, PARAMS, load_accounts(), command_id="old-start")
    assert await event_count(store) == before
