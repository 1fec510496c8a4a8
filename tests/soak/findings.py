"""What the soak checks once every workflow has ended: how they ended, duplicate operations,
lost events (the table against the JetStream copy), and `sim check` / `audit` as a user runs
them. Each function returns plain data for the report (report.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from typing import Any

import psycopg

from events.catalogue import TaskStateChanged
from events.relay.copy import read_stream_messages
from events.relay.wire import STREAM
from events.store import EventStore, RecordedEvent
from rebalancer.workflow import Workflow, fold
from tests.soak.serve import ROOT

MONEY_KINDS = ("withdraw", "transfer", "master_transfer")
TERMINAL = ("done", "failed", "canceled", "needs_attention")


async def streams_of(store: EventStore, ids: list[str]) -> dict[str, list[RecordedEvent]]:
    return {w: await store.read_stream(f"workflow-{w}") for w in ids}


def _decoded(events: list[RecordedEvent]) -> list[TaskStateChanged]:
    found = []
    for event in events:
        if event.type == TaskStateChanged.type_name:
            decoded = event.decode()
            assert isinstance(decoded, TaskStateChanged)
            found.append(decoded)
    return found


def intents(events: list[RecordedEvent]) -> list[tuple[int, str]]:
    """(task index, client id) of every stored money-moving intent (submit / next_slice)."""
    return [(d.task_index, str((d.request_params or {}).get("client_id")))
            for d in _decoded(events) if d.trigger in ("submit", "next_slice")]


def outcomes(streams: dict[str, list[RecordedEvent]]) -> dict[str, Any]:
    """Every workflow's end state, counted; each one not `done` with its reason and, for
    `needs_attention`, whether an `unknown_outcome` escalation (the world could not tell)
    explains it."""
    folded: dict[str, Workflow] = {w: fold(events) for w, events in streams.items()}
    states = Counter(str(f.state) for f in folded.values())
    not_done: list[dict[str, Any]] = []
    for w, workflow in folded.items():
        if workflow.state == "done":
            continue
        codes = [(d.error or {}).get("code") for d in _decoded(streams[w])
                 if d.trigger == "escalate"]
        tasks = [{"task": t.name, "kind": str(t.kind), "state": str(t.state),
                  "code": (t.error or {}).get("code"), "message": (t.error or {}).get("message")}
                 for t in workflow.tasks if t.state in ("needs_attention", "failed")]
        not_done.append({
            "workflow_id": w, "state": str(workflow.state), "reason": workflow.reason,
            "tasks": tasks, "escalations": codes,
            # Legitimate: the exchange could not say whether an operation landed.
            "uncertain_outcome": workflow.state == "needs_attention"
            and "unknown_outcome" in codes,
        })
    triggers = Counter(e.data.get("trigger") for events in streams.values() for e in events)
    return {"states": dict(sorted(states.items())), "not_done": not_done,
            "stuck": sorted(w for w, f in folded.items() if str(f.state) not in TERMINAL),
            "intents": sum(len(intents(e)) for e in streams.values()),
            "resets": triggers["reset"], "escalations": triggers["escalate"]}


async def duplicates(database_url: str, streams: dict[str, list[RecordedEvent]]) -> dict[str, Any]:
    """Exchange operations against intents: each client id executed at most once, each
    money-moving task done by exactly one operation, no operation without a stored intent."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "select id, kind, client_id, audit_ref from sim.operations"
            " where kind <> 'deposit' order by id")
        operations = await cur.fetchall()
    executed: dict[str, list[int]] = {}
    for op_id, _kind, client_id, audit_ref in operations:
        for ref in {client_id, audit_ref} - {None}:
            executed.setdefault(str(ref), []).append(int(op_id))
    twice: list[dict[str, Any]] = []
    every_intent: Counter[str] = Counter()
    for w, events in streams.items():
        workflow = fold(events)
        by_task: dict[int, list[str]] = {}
        for index, client_id in intents(events):
            every_intent[client_id] += 1
            by_task.setdefault(index, []).append(client_id)
            if len(executed.get(client_id, [])) > 1:
                twice.append({"workflow_id": w, "task": workflow.tasks[index].name,
                              "client_id": client_id, "operations": executed[client_id]})
        for task in workflow.tasks:
            if task.kind not in MONEY_KINDS:
                continue
            ids = by_task.get(task.index, [])
            ops = sorted({o for c in ids for o in executed.get(c, [])})
            # Two intents of one task that both landed move the money twice.
            if len({c for c in ids if c in executed}) > 1:
                twice.append({"workflow_id": w, "task": task.name, "client_ids": ids,
                              "operations": ops})
    strays = [{"operation": op_id, "kind": kind, "audit_ref": ref}
              for op_id, kind, _c, ref in operations if ref not in every_intent]
    reused = sorted(c for c, n in every_intent.items() if n > 1)
    return {"operations": len(operations), "duplicates": twice, "strays": strays,
            "client_ids_stored_twice": reused}


async def lost_events(database_url: str, nats_url: str) -> dict[str, Any]:
    """The table against the JetStream copy, event by event: every stored event copied once."""
    import nats

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("select stream_id, version from events")
        table = {(str(s), int(v)) for s, v in await cur.fetchall()}
    copies: Counter[tuple[str, int]] = Counter()
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        async for msg in read_stream_messages(nc.jetstream(timeout=10), STREAM, "rebalancer.>"):
            body = json.loads(msg.data)
            copies[(str(body["stream_id"]), int(body["version"]))] += 1
    finally:
        await nc.close()
    lost = sorted(table - set(copies))
    return {"table": len(table), "copy": sum(copies.values()), "lost": len(lost),
            "lost_first": [f"{s} v{v}" for s, v in lost[:20]],
            "not_in_table": len(set(copies) - table),
            "copied_twice": sum(1 for n in copies.values() if n > 1)}


async def relay_caught_up(database_url: str, nats_url: str) -> bool:
    """Whether the copy holds as many messages as the table holds events."""
    import nats

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("select count(*) from events")
        row = await cur.fetchone()
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        info = await nc.jetstream(timeout=5).stream_info(STREAM)
    finally:
        await nc.close()
    return row is not None and info.state.messages >= int(row[0])


def kills_lived_through(streams: dict[str, list[RecordedEvent]],
                        killed_at: list[float]) -> dict[str, Any]:
    """How many kills fell between each workflow's first and last event: min, median, max."""
    counts = sorted(
        sum(events[0].recorded_at.timestamp() < k < events[-1].recorded_at.timestamp()
            for k in killed_at)
        for events in streams.values() if events)
    if not counts:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]}


def cli_check(env: dict[str, str], *args: str) -> dict[str, Any]:
    """`rebalancer ARGS --json` as a user runs it: its exit status and its JSON."""
    done = subprocess.run([sys.executable, "-m", "rebalancer", *args, "--json"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    try:
        body: Any = json.loads(done.stdout)
    except ValueError:
        body = {"stdout": done.stdout[-2000:], "stderr": done.stderr[-2000:]}
    return {"exit_status": done.returncode, "ok": done.returncode == 0, "output": body}
