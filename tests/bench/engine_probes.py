"""bench_engine's probes: SQL statements per step, peak RSS of waiting workflows, a profile.

The RSS and profile runs are child processes (`python -m tests.bench.bench_engine --child ...`)
so that nothing else the bench did shows in their peak memory or their samples.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from events.store import EventStore
from rebalancer.accounts import Accounts, load_accounts
from rebalancer.exchanges.base import Exchanges
from rebalancer.specs.models import WorkflowSpec
from tests.bench.common import HOME, note, report, scratch_database
from tests.bench.engine_harness import (
    LIFTED,
    MEMORY_BALANCES,
    SEED_PARAMS,
    all_workflow_ids,
    five_transfers,
    followers_caught_up,
    make_engine,
    never_arriving_deposit,
    poll_until,
    running,
    seed_exchanges,
    seed_spec,
    start_many,
    transition_count,
    wait_settled,
    waiting_count,
)
from tests.bench.memory_exchange import MemoryExchanges

QUICK = os.environ.get("BENCH_QUICK") == "1"
SQL_WORKFLOWS = int(os.environ.get("BENCH_SQL_WORKFLOWS", "10" if QUICK else "100"))
RSS_WORKFLOWS = int(os.environ.get("BENCH_RSS_WORKFLOWS", "1000" if QUICK else "10000"))
RSS_TIMEOUT = int(os.environ.get("BENCH_RSS_TIMEOUT", "600"))
PROFILE_WORKFLOWS = int(os.environ.get("BENCH_PROFILE_WORKFLOWS", "30" if QUICK else "200"))
ROOT = Path(__file__).resolve().parents[2]
PY_SPY = Path(os.environ.get("BENCH_PY_SPY", ROOT / ".venv-bench-dbos/bin/py-spy"))
PROFILE_OUT = ROOT / HOME / "profile-top.txt"
OUR_CODE = re.compile(r"\((events|projections|rebalancer)/")
GOALS = {"sql": 10.0, "rss_mb": 150.0}


def prepare_server() -> tuple[str, str | None, bool]:
    """(admin URL, NATS URL or None, whether the bench started the embedded servers).

    On the bench's own embedded PostgreSQL, pg_stat_statements is preloaded (ALTER SYSTEM and
    one restart, kept in .rebalancer-bench); a server given by REBALANCER_DATABASE_URL is left
    as it is, and the SQL probe falls back to transaction counts if it lacks the extension.
    """
    given = os.environ.get("REBALANCER_DATABASE_URL")
    if given:
        return given, os.environ.get("REBALANCER_NATS_URL"), False
    from rebalancer import embedded

    started = not embedded.status(HOME)["postgresql"]
    info = embedded.up(HOME)
    with psycopg.connect(info.admin_database_url, autocommit=True) as conn:
        row = conn.execute("show shared_preload_libraries").fetchone()
        available = conn.execute("select 1 from pg_available_extensions"
                                 " where name = 'pg_stat_statements'").fetchone()
        if available and row and "pg_stat_statements" not in str(row[0]):
            conn.execute("alter system set shared_preload_libraries = 'pg_stat_statements'")
            restart = True
        else:
            restart = False
    if restart:
        embedded.down(HOME)
        info = embedded.up(HOME)
    return info.admin_database_url, info.nats_url, started


# -- 3. SQL statements per step -----------------------------------------------------------------

STATEMENTS = """
    select query, calls from pg_stat_statements
    where dbid = (select oid from pg_database where datname = current_database())
    and query not like '%bench_poll%' and query not like '%pg_stat%' order by calls desc"""
XACTS = ("select xact_commit + xact_rollback from pg_stat_database"
         " where datname = current_database()")


async def sql_per_step(accounts: Accounts, nats_url: str | None) -> list[bool]:
    """Statements per step on two loads: five transfers with nothing to wait for, and the seed
    path at 100 ms per exchange call (its waits cost statements that append nothing). The goal
    is the built-in path's: what a real load costs."""
    await sql_load("five transfers, zero latency", five_transfers(accounts), {},
                   MemoryExchanges(accounts, balances=MEMORY_BALANCES), accounts, nats_url)
    per_step = await sql_load("built-in path, 100 ms per call", seed_spec(), SEED_PARAMS,
                              seed_exchanges(accounts), accounts, nats_url)
    if per_step is None:
        return []
    return [report("sql", "statements per step, built-in path (pg_stat_statements)", per_step,
                   GOALS["sql"], at_most=True, unit="")]


async def sql_load(what: str, spec: WorkflowSpec, params: dict[str, str],
                   exchanges: Exchanges, accounts: Accounts, nats_url: str | None
                   ) -> float | None:
    """SQL_WORKFLOWS workflows of `spec` at once under the engine, the projections and the
    relay; the bench's own polls are left out. Statements per step, None if not countable."""
    async with scratch_database() as url, await EventStore.open(url, max_size=10) as store:
        with psycopg.connect(url, autocommit=True) as conn:
            try:
                conn.execute("create extension if not exists pg_stat_statements")
                conn.execute("select 1 from pg_stat_statements limit 1")
                server_side = True
            except psycopg.Error:
                server_side = False
        ids = await start_many(store, spec, params, accounts, SQL_WORKFLOWS)
        with psycopg.connect(url, autocommit=True) as conn:
            if server_side:
                conn.execute("select pg_stat_statements_reset()")
            xacts_before = _one(conn, XACTS)
        engine = make_engine(store, exchanges, accounts, LIFTED)
        async with running(engine, store, relay_url=nats_url):
            states, _ = await wait_settled(store, ids, timeout=900, interval=0.2)
            await poll_until(lambda: followers_caught_up(store), timeout=30)
        # Backends report their transaction counts at most once a second: wait for the last.
        await asyncio.sleep(1.2)
        with psycopg.connect(url, autocommit=True) as conn:
            xacts = _one(conn, XACTS) - xacts_before
            rows = conn.execute(STATEMENTS).fetchall() if server_side else []
        steps = await transition_count(store, ids)
    followers = "engine, projections" + (", relay" if nats_url else " (no NATS: no relay)")
    note("sql", f"{what}: {SQL_WORKFLOWS} workflows at once on the in-memory double "
                f"({followers}), {steps} steps, states {states}")
    # Each autocommit statement is a transaction of its own; the bench's polls are among them.
    note("", f"server transactions (pg_stat_database): {xacts / steps:.1f} per step")
    if not server_side:
        note("", "pg_stat_statements not loadable on this server: statements not counted")
        return None
    total = sum(calls for _, calls in rows)
    note("", f"statements per step {total / steps:.1f} (pg_stat_statements), by kind: "
             + ", ".join(f"{kind} {n / steps:.1f}" for kind, n in _kinds(rows).most_common(8)))
    for query, calls in rows[:6]:
        note("", f"  {calls / steps:5.2f}/step  {' '.join(str(query).split())[:100]}")
    return float(total / steps)


def _one(conn: psycopg.Connection[Any], query: str) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _kinds(rows: list[tuple[Any, ...]]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for query, calls in rows:
        text = " ".join(str(query).lower().split())
        word = text.split(" ", 1)[0] if text else "?"
        if word in ("begin", "commit", "rollback", "set", "listen", "notify", "unlisten"):
            kinds[word] += calls
        elif "checkpoint" in text:
            kinds["checkpoints"] += calls
        elif word == "select" and " from events" in text:
            kinds["event reads"] += calls
        elif "lease" in text or "schedule" in text:
            kinds["leases/schedule"] += calls
        else:
            kinds[word] += calls
    return kinds


# -- 4. peak RSS --------------------------------------------------------------------------------

async def peak_rss(accounts: Accounts) -> list[bool]:
    async with scratch_database() as url:
        async with await EventStore.open(url, max_size=10) as store:
            await start_many(store, never_arriving_deposit(accounts), {}, accounts,
                             RSS_WORKFLOWS)
        result = _child("rss", url, RSS_WORKFLOWS)
    note("rss", f"{RSS_WORKFLOWS} workflows waiting on a deposit under one engine (with its "
                f"projections): {result['waiting']} waiting, each polled twice, after "
                f"{result['seconds']:.0f} s; "
                f"RSS {result['rss_mb']:.0f} MB now, {result['before_mb']:.0f} MB before "
                "the engine ran")
    return [report("rss", "peak RSS (VmHWM) of the worker process", result["peak_mb"],
                   GOALS["rss_mb"], at_most=True, unit="MB")]


def _child(kind: str, url: str, n: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench_engine", "--child", kind, url, str(n)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=RSS_TIMEOUT + 300,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def child(args: list[str]) -> int:
    """The child side of the RSS and profile runs: one engine over the workflows already
    started in database `url`; prints a JSON line."""
    kind, url, n = args[0], args[1], int(args[2])
    accounts = load_accounts()
    before = _status_mb("VmRSS")
    async with await EventStore.open(url, max_size=10) as store:
        exchanges = MemoryExchanges(accounts, balances=MEMORY_BALANCES)
        engine = make_engine(store, exchanges, accounts, LIFTED)
        if kind == "profile":  # imports done: the profiler attaches now, then says go
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        start = time.perf_counter()
        async with running(engine, store):
            if kind == "rss":
                async def all_waiting() -> bool:
                    return await waiting_count(store) >= n

                await poll_until(all_waiting, timeout=RSS_TIMEOUT, interval=1.0)
                waiting = await waiting_count(store)

                async def two_rounds() -> bool:
                    # Every waiting workflow looked at its deposits twice: the steady state.
                    return sum(exchanges.book.calls.values()) >= 2 * n

                await poll_until(two_rounds, timeout=RSS_TIMEOUT, interval=1.0)
            else:
                await wait_settled(store, await all_workflow_ids(store), timeout=RSS_TIMEOUT)
                waiting = 0
    print(json.dumps({"before_mb": before, "rss_mb": _status_mb("VmRSS"),
                      "peak_mb": _status_mb("VmHWM"), "waiting": waiting,
                      "seconds": time.perf_counter() - start}))
    return 0


# -- 5. profile ---------------------------------------------------------------------------------

async def profile(accounts: Accounts) -> None:
    if not _have_py_spy():
        note("profile", f"skipped: no {PY_SPY} (make bench installs py-spy in the bench venv)")
        return
    raw = PROFILE_OUT.with_suffix(".raw")
    async with scratch_database() as url:
        async with await EventStore.open(url, max_size=10) as store:
            await start_many(store, five_transfers(accounts), {}, accounts, PROFILE_WORKFLOWS)
        result = _profiled_child(url, PROFILE_WORKFLOWS, raw)
    top = top_frames(raw, f"py-spy, {PROFILE_WORKFLOWS} five-transfer workflows at once on"
                     f" the in-memory double, engine + projections, {result['seconds']:.1f} s"
                     " (on-CPU samples only)")
    note("profile", f"{PROFILE_WORKFLOWS} workflows in {result['seconds']:.1f} s; top frames "
                    f"in {PROFILE_OUT.relative_to(ROOT)}:")
    for line in top.splitlines()[2:10]:
        note("", line)


def _profiled_child(url: str, n: int, raw: Path) -> dict[str, Any]:
    """The profile child under py-spy, attached once its imports and set-up are done, so the
    samples are the run's alone."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bench_engine", "--child", "profile", url, str(n)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the profile child did not start")
    spy = subprocess.Popen(
        [str(PY_SPY), "record", "--pid", str(proc.pid), "--format", "raw", "--function",
         "--rate", "250", "--nonblocking", "-o", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let py-spy attach before the run starts
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = proc.stdout.read()
    proc.wait(timeout=RSS_TIMEOUT)
    spy.wait(timeout=60)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _have_py_spy() -> bool:
    PROFILE_OUT.parent.mkdir(parents=True, exist_ok=True)
    return PY_SPY.exists()


def top_frames(raw: Path, title: str, n: int = 25) -> str:
    """Self and inclusive sample shares per frame from py-spy's collapsed stacks in `raw`,
    written to PROFILE_OUT under `title` and returned."""
    collapsed = raw.read_text()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    total = total or 1
    lines = ["self %   frame (by samples in the frame itself)", "-" * 40]
    lines += [f"{100 * c / total:6.1f}  {f}" for f, c in own.most_common(n)]
    lines += ["", "incl %  frame of ours (events/, projections/, rebalancer/) by samples with it"
              " on the stack", "-" * 40]
    ours = [(f, c) for f, c in inclusive.most_common() if OUR_CODE.search(f)][:n]
    lines += [f"{100 * c / total:6.1f}  {f}" for f, c in ours]
    text = "\n".join(lines) + "\n"
    PROFILE_OUT.write_text(f"{title}, {total} samples\n\n{text}")
    return text
