"""What the worker logs for an operator (issue 13, part 7): one INFO line per move naming the
workflow, task and states; a WARNING when a money-moving call's response is lost and it is
tried again. A real world that loses every response to a money move."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from events.store import EventStore
from rebalancer.commands import start_workflow
from tests.support.waiting import eventually
from tests.support.worker import Worker, load, to_futures, write_world


async def test_moves_are_info_and_a_lost_response_is_a_warning(
    database_url: str, store: EventStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = write_world(tmp_path, balances={"binance-corp-sub": {"ETH": "10"}})
    caplog.set_level(logging.INFO, logger="rebalancer")
    async with Worker(database_url, world=world, faults="lost_response=1") as worker:
        workflow_id, _ = await start_workflow(
            store, to_futures(worker.accounts), {"account": "binance-corp-sub", "amount": "1.5"},
            worker.accounts)

        async def passed() -> str:
            await worker.engine.run_pass()  # the service's path: claim, drive, hand back
            return (await load(store, workflow_id)).state

        assert await eventually(passed, lambda state: state in ("done", "failed",
                                                                 "needs_attention"),
                                timeout=30, interval=0, what="the transfer ending") == "done"
    engine = [r for r in caplog.records if r.name == "rebalancer.engine"
              and getattr(r, "workflow_id", None) == workflow_id]
    moves = [r.getMessage() for r in engine if r.levelno == logging.INFO]
    short = workflow_id[:8]
    assert f"workflow {short} _workflow: created -> running" in moves
    assert f"workflow {short} move_to_futures: created -> submitting" in moves
    assert f"workflow {short} _workflow: running -> done" in moves
    assert any(m.startswith(f"workflow {short} move_to_futures: ") and m.endswith("-> done")
               for m in moves)
    # The transfer went out and its answer was lost: said as a WARNING, naming the task.
    lost = [r for r in engine if r.levelno == logging.WARNING]
    assert lost and all("retrying in" in r.getMessage() for r in lost)
    assert {getattr(r, "task", None) for r in lost} == {"move_to_futures"}
