"""Chaos: the worker as a subprocess, SIGKILLed at random moments over faulted exchanges.

Workflows of the built-in path run against the simulated world with lost responses, timeouts and
rate limits, while the worker process (`rebalancer serve`) is killed with SIGKILL again and
again and restarted each time. Afterwards every workflow must have ended `done` (or, where the
world truly cannot tell, `needs_attention` after an `unknown_outcome` escalation), no intent may
have been executed twice, every currency's total must be unchanged and every stream must audit.

Knobs (environment), so a failure reproduces: CHAOS_SEED (kill timing, amounts and the
simulated world's fault draws), CHAOS_WORKFLOWS, CHAOS_KILLS, CHAOS_KILL_AFTER, CHAOS_SNIPE,
CHAOS_FAULTS, CHAOS_BUDGET, CHAOS_AMOUNTS (KRW per workflow, comma-separated) and CHAOS_NATS=1
(the worker gets REBALANCER_NATS_URL, so the relay and the command API run and die too).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from events.catalogue import TaskStateChanged
from events.store import EventStore, RecordedEvent
from rebalancer.accounts import load_accounts
from rebalancer.cli import sim as sim_cli
from rebalancer.commands import start_workflow
from rebalancer.demo import PARAMS, SPEC
from rebalancer.specs.loading import builtin_specs
from rebalancer.workflow import Workflow, fold

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("CHAOS_SEED", "20251126"))
WORKFLOWS = int(os.environ.get("CHAOS_WORKFLOWS", "10"))
KILLS = int(os.environ.get("CHAOS_KILLS", "20"))
FAULTS = os.environ.get(
    "CHAOS_FAULTS", "lost_response=0.1,timeout=0.05,rate_limit=0.05,latency_ms=5"
)
BUDGET = float(os.environ.get("CHAOS_BUDGET", "240"))  # seconds, then the test fails
TIME_SCALE = "200"  # 60 s of confirmations take 0.3 s
# Seconds after a worker's start, uniform (CHAOS_KILL_AFTER="0.2,1.5").
KILL_AFTER = tuple(float(x) for x in os.environ.get("CHAOS_KILL_AFTER", "0.2,1.5").split(","))
# KRW per workflow: distinct multiples of 5,000 so that no two workflows ever move the same
# amount (deposits of internal transfers and history lookups match by amount). At least
# ~121,000 KRW: Upbit's ETH withdrawal needs 0.02 ETH plus its 0.01 ETH fee on top.
AMOUNTS = range(130_000, 250_001, 5_000)
MONEY_KINDS = ("withdraw", "transfer", "master_transfer")
TERMINAL = ("done", "failed", "canceled", "needs_attention")
MAX_NEEDS_ATTENTION = max(1, WORKFLOWS // 5)
# The share of kills aimed at the moment just after an operation executed (else at a random
# moment): a random moment rarely falls between the world's commit and the worker's append.
SNIPE = float(os.environ.get("CHAOS_SNIPE", "0.5"))


@dataclass
class Worker:
    """The worker subprocess, its incarnations and its log (every incarnation appends)."""

    database_url: str
    log_path: Path
    nats_url: str | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    incarnations: int = 0
    kills: list[float] = field(default_factory=list)  # how long each killed worker had run

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
        env.update(
            REBALANCER_DATABASE_URL=self.database_url,
            REBALANCER_SIM_FAULTS=FAULTS,
            REBALANCER_SIM_SEED=str(SEED),
            REBALANCER_SIM_TIME_SCALE=TIME_SCALE,
            PYTHONUNBUFFERED="1",
        )
        if self.nats_url:  # the whole `serve`: relay, command API and alerts too
            env["REBALANCER_NATS_URL"] = self.nats_url
        return env

    def start(self) -> None:
        assert self.process is None
        self.incarnations += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n=== worker incarnation {self.incarnations} ===\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rebalancer", "serve", "--tick", "0.05"],
                env=self.env(),
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )
        self.started_at = time.monotonic()

    def check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"the worker exited on its own with status {code}\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no clean-up, no draining, claims left behind."""
        assert self.process is not None
        self.check_alive()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.kills.append(time.monotonic() - self.started_at)
        self.process = None

    def stop(self) -> int:
        """SIGTERM (the pass in flight drains), then the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            self.ensure_dead()

    def ensure_dead(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no worker log)"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBALANCER_")}
    env["REBALANCER_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "rebalancer", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def kill_on_next_operation(database_url: str, at_most: float) -> None:
    """Return as soon as a new money-moving operation appears in the world (or after
    `at_most` seconds)."""
    query = "select coalesce(max(id), 0) from sim.operations where kind <> 'deposit'"
    until = time.monotonic() + at_most
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(query)
        row = await cur.fetchone()
        last = row[0] if row else 0
        while time.monotonic() < until:
            cur = await conn.execute(query)
            row = await cur.fetchone()
            if row and row[0] > last:
                return
            await asyncio.sleep(0.002)


async def states(store: EventStore, ids: list[str]) -> dict[str, Workflow]:
    return {w: fold(await store.read_stream(f"workflow-{w}")) for w in ids}


def intents(events: list[RecordedEvent]) -> list[tuple[int, str, str]]:
    """(task index, kind, client id) of every stored money-moving intent."""
    found: list[tuple[int, str, str]] = []
    for event in events:
        if event.type != "TaskStateChanged":
            continue
        decoded = event.decode()
        assert isinstance(decoded, TaskStateChanged)
        if decoded.trigger in ("submit", "next_slice"):
            client_id = (decoded.request_params or {}).get("client_id")
            assert client_id, f"{event.stream_id} v{event.version}: an intent with no client id"
            found.append((decoded.task_index, decoded.kind, client_id))
    return found


def reconciled_after_restart(events: list[RecordedEvent]) -> Counter[str]:
    """Intents a later worker incarnation (another actor) settled: "landed" or "reset"."""
    found: Counter[str] = Counter()
    for before, event in itertools.pairwise(events):
        if event.data.get("source") != "submitting" or event.data.get("trigger") == "next_slice":
            continue
        if before.metadata.get("actor") != event.metadata.get("actor"):
            found["reset" if event.data.get("trigger") == "reset" else "landed"] += 1
    return found


def escalations(events: list[RecordedEvent]) -> list[TaskStateChanged]:
    found = []
    for event in events:
        if event.type == "TaskStateChanged":
            decoded = event.decode()
            assert isinstance(decoded, TaskStateChanged)
            if decoded.trigger == "escalate":
                found.append(decoded)
    return found


@pytest.mark.slow
@pytest.mark.timeout(BUDGET + 60)
async def test_worker_killed_at_random_moments_moves_no_money_twice(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(SEED)
    began = time.monotonic()
    deadline = began + BUDGET
    nats = request.getfixturevalue("nats_url") if os.environ.get("CHAOS_NATS") else None
    worker = Worker(database_url, tmp_path / "worker.log", nats)
    spec = builtin_specs()[SPEC]
    accounts = load_accounts()
    amounts = rng.sample(AMOUNTS, WORKFLOWS)
    if os.environ.get("CHAOS_AMOUNTS"):  # e.g. repeated amounts, to make histories ambiguous
        amounts = [int(a) for a in os.environ["CHAOS_AMOUNTS"].split(",")][:WORKFLOWS]
        assert len(amounts) == WORKFLOWS, "CHAOS_AMOUNTS needs one amount per workflow"
    await sim_cli.seed(database_url)
    store = await EventStore.open(database_url, max_size=4)
    ids: list[str] = []
    run = uuid.uuid4().hex[:8]  # workflow ids differ between runs of one seed
    orphans: set[tuple[object, ...]] = set()

    async def start_next() -> None:
        amount = amounts[len(ids)]
        workflow_id, created = await start_workflow(
            store,
            spec,
            {**PARAMS, "from_amount": str(amount)},
            accounts,
            command_id=f"chaos-{SEED}-{run}-{len(ids)}",
            actor="chaos",
        )
        assert created
        ids.append(workflow_id)

    def over_budget(what: str) -> AssertionError:
        return AssertionError(
            f"chaos (seed {SEED}) still {what} after {time.monotonic() - began:.0f} s"
            f" ({len(worker.kills)} kills)\n{worker.tail()}"
        )

    try:
        # A few workflows before the first worker, the rest one after each of the first kills.
        for _ in range(max(1, WORKFLOWS // 3)):
            await start_next()
        worker.start()
        while len(worker.kills) < KILLS:
            delay = rng.uniform(KILL_AFTER[0], KILL_AFTER[-1])
            if rng.random() < SNIPE:
                # Right after the world executed an operation, before the worker records what
                # came back: the window a crash-safe design must survive.
                await kill_on_next_operation(database_url, delay)
            else:
                await asyncio.sleep(delay)
            worker.kill()
            # Claims the dead worker left behind: workflows it killed in the middle of a step.
            with psycopg.connect(database_url) as conn:
                orphans.update(conn.execute(
                    "select workflow_id, claimed_by from workflow_schedule"
                    " where claimed_by is not null"))
            if len(ids) < WORKFLOWS:
                await start_next()
            if time.monotonic() > deadline:
                raise over_budget("killing")
            worker.start()
        while len(ids) < WORKFLOWS:  # only when asked for fewer kills than workflows
            await start_next()

        # The last worker drives every workflow to its end, undisturbed.
        while True:
            found = await states(store, ids)
            if all(w.state in TERMINAL for w in found.values()):
                break
            worker.check_alive()
            if time.monotonic() > deadline:
                stuck = {
                    w: (f.state, [(t.name, t.state) for t in f.tasks if not t.terminal][:1])
                    for w, f in found.items()
                    if f.state not in TERMINAL
                }
                raise over_budget(f"waiting for {len(stuck)} workflows: {stuck}")
            await asyncio.sleep(0.25)
        exit_status = worker.stop()
        assert exit_status == 0, f"the worker did not stop cleanly on SIGTERM\n{worker.tail()}"
        duration = time.monotonic() - began

        # -- every workflow ended done, or needs_attention where the world could not tell ----
        streams = {w: await store.read_stream(f"workflow-{w}") for w in ids}
        found = await states(store, ids)
        by_state = Counter(w.state for w in found.values())
        across = sum((reconciled_after_restart(e) for e in streams.values()), Counter())
        triggers = Counter(e.data.get("trigger") for events in streams.values() for e in events)
        attention = [w for w in ids if found[w].state == "needs_attention"]
        with psycopg.connect(database_url) as conn:
            operations = conn.execute(
                "select id, kind, client_id, audit_ref from sim.operations"
                " where kind <> 'deposit' order by id"
            ).fetchall()
            row = conn.execute("select count(*) from events").fetchone()
        print(
            f"chaos summary: seed={SEED} kills={len(worker.kills)} workflows={len(ids)}"
            f" done={by_state['done']} needs_attention={by_state['needs_attention']}"
            f" other={len(ids) - by_state['done'] - by_state['needs_attention']}"
            f" events={row[0] if row else '?'} operations={len(operations)}"
            f" intents={sum(len(intents(e)) for e in streams.values())}"
            f" resets={triggers['reset']} escalations={triggers['escalate']}"
            f" killed_mid_step={len(orphans)}"
            f" reconciled_after_restart={across['landed']}+{across['reset']}reset"
            f" duration={duration:.1f}s faults={FAULTS}"
        )
        for w in attention:
            tasks = [t for t in found[w].tasks if t.state == "needs_attention"]
            print(
                f"needs_attention: workflow {w}: "
                + "; ".join(f"{t.name} ({t.kind}): {(t.error or {}).get('message')}" for t in tasks)
            )
        bad = {
            w: (f.state, f.reason)
            for w, f in found.items()
            if f.state not in ("done", "needs_attention")
        }
        assert not bad, f"workflows that ended neither done nor needs_attention: {bad}"
        assert len(attention) <= MAX_NEEDS_ATTENTION, (
            f"{len(attention)} of {WORKFLOWS} workflows need attention (at most"
            f" {MAX_NEEDS_ATTENTION} expected): {attention}"
        )
        for w in attention:
            codes = [(e.error or {}).get("code") for e in escalations(streams[w])]
            assert "unknown_outcome" in codes, (
                f"workflow {w} needs attention without an unknown_outcome escalation: {codes}"
            )

        # -- no intent executed twice; each money-moving task done by exactly one operation --
        executed: dict[str, list[int]] = {}
        for op_id, _kind, op_client_id, audit_ref in operations:
            for ref in {op_client_id, audit_ref} - {None}:
                executed.setdefault(ref, []).append(op_id)
        every_intent: set[str] = set()
        twice: list[str] = []
        for w in ids:
            workflow = found[w]
            by_task: dict[int, list[str]] = {}
            for task_index, _kind, client_id in intents(streams[w]):
                assert client_id not in every_intent, f"client id {client_id} stored twice"
                every_intent.add(client_id)
                by_task.setdefault(task_index, []).append(client_id)
                if len(executed.get(client_id, [])) > 1:
                    twice.append(f"{w} task #{task_index}: {client_id} -> {executed[client_id]}")
            for task in workflow.tasks:
                ops = sorted({o for c in by_task.get(task.index, []) for o in executed.get(c, [])})
                if task.kind in MONEY_KINDS:
                    # Two intents that both landed would move the money twice.
                    assert len(ops) <= 1 and (len(ops) == 1 or task.state != "done"), (
                        f"{w} {task.name}: {task.state} with {len(ops)} executed operations {ops}"
                        f" (intents {by_task.get(task.index)})"
                    )
                if task.kind == "trade" and task.state == "done":
                    slices = ((task.refresh_result or {}).get("extra") or {}).get("slices", [])
                    recorded = {s["client_id"] for s in slices if s.get("status") != "rejected"}
                    landed = {c for c in by_task.get(task.index, []) if c in executed}
                    assert recorded == landed, (
                        f"{w} {task.name}: slices recorded {sorted(recorded)} but orders"
                        f" executed for {sorted(landed)}"
                    )
        assert not twice, "intents executed more than once:\n" + "\n".join(twice)
        strays = [
            (op_id, kind, audit_ref)
            for op_id, kind, _c, audit_ref in operations
            if audit_ref not in every_intent
        ]
        assert not strays, f"operations no stored intent accounts for: {strays}"

        # -- the world's totals held and every stream audits ---------------------------------
        check = cli(database_url, "sim", "check")
        assert check.returncode == 0, f"sim check failed:\n{check.stdout}\n{check.stderr}"
        audit = cli(database_url, "audit")
        assert audit.returncode == 0, f"audit failed:\n{audit.stdout}\n{audit.stderr}"

    except BaseException:
        print(worker.tail(200))
        raise
    finally:
        worker.ensure_dead()
        await store.close()
