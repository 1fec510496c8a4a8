"""The soak itself: workflows started over the command API while `serve` is SIGKILLed at random
and restarted, then every check of findings.py. `soak()` takes servers that are already up (the
entry point's embedded ones, or the test fixtures') and returns the report as plain data."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from events.store import EventStore
from rebalancer.api import NatsUnavailableError
from rebalancer.api import request as api_request
from rebalancer.cli import sim as sim_cli
from rebalancer.demo import PARAMS, SPEC
from rebalancer.workflow import fold
from tests.soak import findings
from tests.soak.serve import Serve, service_env

START_SUBJECT = "rebalancer.cmd.start"


def _pair(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    return float(low), float(high or low)


@dataclass(frozen=True)
class Knobs:
    """The soak's sizes and randomness; each from its SOAK_* variable (see README "Soak")."""

    workflows: int = 50
    kills: int = 200
    seed: int = 20261207
    faults: str = "lost_response=0.1,timeout=0.05,rate_limit=0.05,latency_ms=5"
    # The simulated world's delays divided by this: a workflow lasts long enough that several
    # kills fall into it, yet 50 of them end within the run.
    time_scale: float = 50.0
    # Seconds from a worker's "serving as" line to its kill, uniform.
    kill_after: tuple[float, float] = (0.2, 2.5)
    # The share of kills aimed just after the world executed a money move (before the worker
    # records the answer), and the share that falls while the process is still starting.
    snipe: float = 0.3
    early: float = 0.1
    budget: float = 3600.0  # seconds for the whole run before it gives up waiting

    @classmethod
    def from_env(cls, **overrides: Any) -> Knobs:
        env = os.environ
        base = cls(**overrides)
        return cls(
            workflows=int(env.get("SOAK_WORKFLOWS", base.workflows)),
            kills=int(env.get("SOAK_KILLS", base.kills)),
            seed=int(env.get("SOAK_SEED", base.seed)),
            faults=env.get("SOAK_FAULTS", base.faults),
            time_scale=float(env.get("SOAK_TIME_SCALE", base.time_scale)),
            kill_after=_pair(env["SOAK_KILL_AFTER"]) if "SOAK_KILL_AFTER" in env
            else base.kill_after,
            snipe=float(env.get("SOAK_SNIPE", base.snipe)),
            early=float(env.get("SOAK_EARLY", base.early)),
            budget=float(env.get("SOAK_BUDGET", base.budget)),
        )


@dataclass
class Starts:
    """The workflows started so far over the API, and how often a start had to be repeated."""

    ids: list[str] = field(default_factory=list)
    # Requests sent again with the same command id: no reply (serve down or killed before it
    # answered), or a retryable refusal (the pre-flight's reads rate-limited or timed out).
    no_reply: int = 0
    retryable: int = 0
    already: int = 0  # replies "created": false: an earlier request of it had gone through
    refused: list[dict[str, Any]] = field(default_factory=list)


def amounts(count: int, rng: random.Random) -> list[int]:
    """KRW per workflow: distinct multiples of 5,000 (histories are matched by amount, so no
    two workflows move the same), from 130,000 (Upbit's ETH minimum plus its fee)."""
    return rng.sample(range(130_000, 130_000 + 5_000 * count * 2, 5_000), count)


async def start_one(nats_url: str, body: dict[str, Any], starts: Starts, until: float) -> None:
    """Send one start until the service answers it; the command id makes repeats harmless."""
    while time.monotonic() < until:
        try:
            reply = await api_request(nats_url, START_SUBJECT, body, timeout=5.0,
                                      connect_timeout=3.0)
        except NatsUnavailableError:
            reply = None
        if reply is not None and reply.get("ok"):
            starts.ids.append(str(reply["workflow_id"]))
            starts.already += not reply.get("created")
            return
        error = (reply or {}).get("error") or {}
        if reply is not None and not (error.get("details") or {}).get("retryable"):
            starts.refused.append({"command_id": body["command_id"], "error": error})
            return
        if reply is None:
            starts.no_reply += 1
        else:
            starts.retryable += 1
        await asyncio.sleep(0.2)


async def starter(knobs: Knobs, nats_url: str, serve_kills: list[int], starts: Starts,
                  until: float) -> None:
    """Start the workflows spread over the kills: the i-th once i/N of the kills are done."""
    rng = random.Random(knobs.seed)
    run = uuid.uuid4().hex[:8]  # workflow ids differ between runs of one seed
    for i, amount in enumerate(amounts(knobs.workflows, rng)):
        while True:  # polled: the kill loop only counts
            if serve_kills[0] >= i * knobs.kills // max(1, knobs.workflows):
                break
            await asyncio.sleep(0.05)
        body = {"command_id": f"soak-{knobs.seed}-{run}-{i}", "spec": SPEC,
                "params": {**PARAMS, "from_amount": str(amount)}}
        await start_one(nats_url, body, starts, until)


async def next_operation(database_url: str, at_most: float) -> None:
    """Return as soon as the world executes a new money move (or after `at_most` s)."""
    query = "select coalesce(max(id), 0) from sim.operations where kind <> 'deposit'"
    until = time.monotonic() + at_most
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        last = (await (await conn.execute(query)).fetchone() or (0,))[0]
        while time.monotonic() < until:
            row = await (await conn.execute(query)).fetchone()
            if row and row[0] > last:
                return
            await asyncio.sleep(0.005)


def held_claims(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("select count(*) from workflow_schedule"
                           " where claimed_by is not null").fetchone()
    return int(row[0]) if row else 0


async def kill_loop(knobs: Knobs, serve: Serve, database_url: str, kills: list[int],
                    until: float) -> int:
    """Kill `serve` `knobs.kills` times at random moments, restarting it each time; returns
    how many kills left claims behind (the worker died holding workflows mid-step)."""
    rng = random.Random(knobs.seed + 1)
    mid_step = 0
    while kills[0] < knobs.kills and time.monotonic() < until:
        serve.start()
        if rng.random() < knobs.early:
            await asyncio.sleep(rng.uniform(0.0, 1.5))  # still importing or connecting
        else:
            await serve.ready()
            delay = rng.uniform(*knobs.kill_after)
            if rng.random() < knobs.snipe:
                await next_operation(database_url, delay)
            else:
                await asyncio.sleep(delay)
        if serve.kill():
            kills[0] += 1
            mid_step += held_claims(database_url) > 0
    return mid_step


async def settle(store: EventStore, serve: Serve, ids: list[str],
                 database_url: str, nats_url: str, until: float) -> list[str]:
    """The last `serve`, undisturbed, until every workflow has ended and the relay copied
    every event; returns the workflows still not ended when the budget ran out."""
    open_ids = list(ids)
    while open_ids and time.monotonic() < until:
        streams = await findings.streams_of(store, open_ids)
        open_ids = [w for w, events in streams.items()
                    if str(fold(events).state) not in findings.TERMINAL]
        if not serve.alive():  # it died on its own: recorded, and restarted to go on
            serve.kill()
            serve.start()
        await asyncio.sleep(0.5)
    deadline = min(until, time.monotonic() + 120)
    while time.monotonic() < deadline:
        if await findings.relay_caught_up(database_url, nats_url):
            break
        await asyncio.sleep(0.5)
    return open_ids


async def soak(knobs: Knobs, database_url: str, nats_url: str, key_file: Path,
               workdir: Path) -> dict[str, Any]:
    """Run the soak on these servers; the report (report.py formats it and judges it)."""
    began = time.monotonic()
    until = began + knobs.budget
    env = service_env(database_url, nats_url, key_file, faults=knobs.faults, seed=knobs.seed,
                      time_scale=knobs.time_scale)
    serve = Serve(env, workdir / "serve.log")
    await sim_cli.seed(database_url)
    starts = Starts()
    kills = [0]
    store = await EventStore.open(database_url, max_size=2)
    try:
        started = asyncio.create_task(starter(knobs, nats_url, kills, starts, until))
        mid_step = await kill_loop(knobs, serve, database_url, kills, until)
        serve.start()
        await started
        stuck = await settle(store, serve, starts.ids, database_url, nats_url, until)
        exit_status = serve.stop()
        soak_seconds = time.monotonic() - began
        streams = await findings.streams_of(store, starts.ids)
    finally:
        serve.ensure_dead()
        await store.close()
    check_env = {**env, "REBALANCER_SIM_FAULTS": ""}  # the checks' own calls are not faulted
    return {
        "knobs": {**asdict(knobs), "kill_after": list(knobs.kill_after)},
        "kills": kills[0],
        "serve_incarnations": serve.incarnations,
        "killed_holding_claims": mid_step,
        "serve_exited_on_its_own": serve.died_on_its_own,
        "serve_final_exit_status": exit_status,
        "workflows_started": len(set(starts.ids)),
        "start_repeats_no_reply": starts.no_reply,
        "start_repeats_retryable": starts.retryable,
        "starts_answered_already_created": starts.already,
        "starts_refused": starts.refused,
        "still_running": stuck,
        "outcomes": findings.outcomes(streams),
        "kills_per_workflow": findings.kills_lived_through(streams, serve.killed_at),
        "operations": await findings.duplicates(database_url, streams),
        "events": await findings.lost_events(database_url, nats_url),
        "sim_check": findings.cli_check(check_env, "sim", "check"),
        "audit": findings.cli_check(check_env, "audit"),
        "soak_seconds": round(soak_seconds, 1),
        "wall_seconds": round(soak_seconds, 1),  # the entry point adds its set-up
        "serve_log": str(serve.log_path),
    }

