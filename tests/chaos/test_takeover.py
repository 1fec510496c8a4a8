"""Three `serve` processes on one database; one is SIGKILLed while it holds claims: the others
take its workflows over within seconds, and nothing is executed twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg

from events.store import EventStore
from rebalancer.commands import start_workflow
from rebalancer.specs.loading import builtin_specs
from tests.support import (
    MONEY_MOVES,
    SEED_PARAMS,
    SEED_SPEC,
    eventually,
    intents,
    load,
    operations,
    write_world,
)
from tests.support.worker import Worker as InProcess

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = 12
# Slow enough that every worker is in the middle of something when the kill comes: a claim is
# held only while a workflow is being stepped, so every exchange call takes 300 ms.
TIME_SCALE = "20"
FAULTS = "latency_ms=300"
TAKEOVER_LIMIT = 5.0  # seconds, the bound


def serve(database_url: str, world: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env.update(REBALANCER_DATABASE_URL=database_url, REBALANCER_SIM_WORLD=str(world),
               REBALANCER_SIM_TIME_SCALE=TIME_SCALE, REBALANCER_SIM_FAULTS=FAULTS,
               PYTHONUNBUFFERED="1")
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "rebalancer", "serve"], env=env,
                                cwd=ROOT, stdout=out, stderr=out)


def claims(database_url: str) -> dict[str, str]:
    """Workflow id -> the owner holding it (expired claims included: that is the point)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("select workflow_id::text, claimed_by from workflow_schedule"
                            " where claimed_by is not null").fetchall()
    return {str(w): str(o) for w, o in rows}


async def test_a_killed_workers_workflows_move_again_within_five_seconds(
    database_url: str, store: EventStore, tmp_path: Path
) -> None:
    world = write_world(tmp_path, balances={"upbit-personal": {"KRW": "100000000"},
                                            "binance-personal": {"USDT": "100000"}})
    # The world's tables are seeded by the first process that opens it: this one, first.
    async with InProcess(database_url, world=world) as seeding:
        accounts = seeding.accounts
    spec = builtin_specs()[SEED_SPEC]
    ids = [(await start_workflow(store, spec, {**SEED_PARAMS, "from_amount": str(200_000 + i)},
                                 accounts))[0] for i in range(WORKFLOWS)]
    logs = [tmp_path / f"serve-{n}.log" for n in range(3)]
    workers = [serve(database_url, world, log) for log in logs]
    try:
        # Wait until some worker holds claims of workflows in flight, then kill that one.
        held = await eventually(lambda: asyncio.to_thread(claims, database_url),
                                lambda c: len(set(c.values())) >= 2, timeout=60, interval=0.05,
                                what="claims held by at least two workers")
        victim_owner = Counter(held.values()).most_common(1)[0][0]
        victim = next(w for w in workers if f"worker-{w.pid}-" in victim_owner)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        orphaned = {w for w, o in claims(database_url).items() if o == victim_owner}
        assert orphaned, "the victim held nothing any more when it died"
        # Each orphan is claimed by a survivor (or has already moved on) within the limit.
        taken: dict[str, float] = {}
        while len(taken) < len(orphaned) and time.monotonic() - killed_at < 30:
            now = claims(database_url)
            for w in orphaned - set(taken):
                if now.get(w) != victim_owner:
                    taken[w] = time.monotonic() - killed_at
            await asyncio.sleep(0.05)
        assert set(taken) == orphaned
        assert max(taken.values()) <= TAKEOVER_LIMIT, taken
        # Everything still ends, on the two survivors.
        flows = await eventually(
            lambda: asyncio.gather(*(load(store, w) for w in ids)),
            lambda fs: all(f.state in ("done", "failed", "needs_attention") for f in fs),
            timeout=180, interval=0.5, what="every workflow ending",
            describe=lambda fs: Counter(f.state for f in fs))
        for w in workers:
            assert w is victim or w.poll() is None, "a survivor exited"
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
    assert [f.state for f in flows] == ["done"] * WORKFLOWS, [f.reason for f in flows]
    # No intent executed twice, none executed without an intent.
    client_ids = Counter(i["client_id"] for i in await intents(database_url))
    assert all(n == 1 for n in client_ids.values()), client_ids.most_common(3)
    executed = Counter(op["audit_ref"] for op in await operations(database_url, *MONEY_MOVES))
    assert all(n == 1 for n in executed.values()), executed.most_common(3)
    assert set(executed) <= set(client_ids)
    print(f"takeover after the kill: {sorted(round(t, 2) for t in taken.values())} s")
