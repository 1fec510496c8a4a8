"""Engine benchmark: ours vs DBOS Transact, overlap of many workflows, SQL per step, RSS, profile.

Run with `make bench` (or `python -m tests.bench.bench_engine`; the DBOS side and py-spy need
the bench environment .venv-bench-dbos that `make bench` creates). Uses REBALANCER_DATABASE_URL
when set, else the embedded servers under .rebalancer-bench (where it loads pg_stat_statements,
restarting that PostgreSQL once); each measurement gets a scratch database of its own.

Sizes (defaults are the issue's; BENCH_QUICK=1 picks small ones, a run of about a minute):
BENCH_SEQUENTIAL, BENCH_CONCURRENT (vs DBOS), BENCH_OVERLAP (built-in-path workflows at once),
BENCH_OVERLAP_TIMEOUT, BENCH_BUDGET_SECONDS (the default-budget window), BENCH_SQL_WORKFLOWS,
BENCH_RSS_WORKFLOWS, BENCH_PROFILE_WORKFLOWS; BENCH_SECTIONS=dbos,overlap,sql,rss,profile;
BENCH_WORKER_CONCURRENCY (the engine's driver slots, 256 as `serve` has them).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg

from events.store import EventStore
from rebalancer.accounts import Accounts, load_accounts
from rebalancer.exchanges.base import Exchanges
from rebalancer.exchanges.simulated import SimulatedWorld
from tests.bench import engine_probes as probes
from tests.bench.common import HOME, note, report, scratch_database, server_version
from tests.bench.engine_harness import (
    DEFAULT,
    LIFTED,
    MEMORY_BALANCES,
    SEED_PARAMS,
    WORLD_BALANCES,
    budget_use,
    budgets,
    five_transfers,
    make_engine,
    running,
    seed_exchanges,
    seed_spec,
    start_many,
    transition_count,
    wait_settled,
)
from tests.bench.memory_exchange import MemoryExchanges
from tests.support.worker import write_world

QUICK = os.environ.get("BENCH_QUICK") == "1"


def _size(name: str, default: int, quick: int) -> int:
    return int(os.environ.get(f"BENCH_{name}", str(quick if QUICK else default)))


SEQUENTIAL = _size("SEQUENTIAL", 30, 5)
CONCURRENT = _size("CONCURRENT", 100, 20)
OVERLAP = _size("OVERLAP", 1000, 20)
OVERLAP_TIMEOUT = _size("OVERLAP_TIMEOUT", 900, 60)
BUDGET_SECONDS = _size("BUDGET_SECONDS", 60, 10)
SECTIONS = os.environ.get("BENCH_SECTIONS", "dbos,overlap,sql,rss,profile").split(",")
ROOT = Path(__file__).resolve().parents[2]
DBOS_PYTHON = Path(os.environ.get("BENCH_DBOS_PYTHON", ROOT / ".venv-bench-dbos/bin/python"))
GOALS = {"sequential": 2.0, "concurrent": 5.0, "overlap": 1.5, "budget": 0.9}


# -- 1. vs DBOS ---------------------------------------------------------------------------------

async def ours_rates(url: str, accounts: Accounts,
                     exchanges: Callable[[], Awaitable[Exchanges]]) -> tuple[float, float]:
    """Workflows/s of five transfers: one at a time (start -> done), then CONCURRENT at once."""
    spec = five_transfers(accounts)
    async with await EventStore.open(url, max_size=10) as store:
        ex = await exchanges()
        engine = make_engine(store, ex, accounts, LIFTED)
        async with running(engine, store):
            await _settle(store, await start_many(store, spec, {}, accounts, 2), 60)  # warm up
            start = time.perf_counter()
            for _ in range(SEQUENTIAL):
                await _settle(store, await start_many(store, spec, {}, accounts, 1), 60)
            sequential = SEQUENTIAL / (time.perf_counter() - start)
            start = time.perf_counter()
            ids = await start_many(store, spec, {}, accounts, CONCURRENT, parallel=CONCURRENT)
            await _settle(store, ids, 60 + CONCURRENT * 5)
            concurrent = CONCURRENT / (time.perf_counter() - start)
        close = getattr(ex, "close", None)
        if close is not None:
            await close()
    return sequential, concurrent


async def _settle(store: EventStore, ids: list[str], timeout: float) -> None:
    states, done = await wait_settled(store, ids, timeout=timeout, interval=0.002)
    if not done or set(states) != {"done"}:
        raise RuntimeError(f"bench workflows did not all finish: {states} of {len(ids)}")


def dbos_rates(admin_url: str) -> dict[str, float] | None:
    if not DBOS_PYTHON.exists():
        note("vs DBOS", f"skipped: no {DBOS_PYTHON} (make bench creates it with dbos)")
        return None
    suffix = uuid.uuid4().hex[:8]
    system_db, app_db = f"bench_dbos_sys_{suffix}", f"bench_dbos_app_{suffix}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"create database {app_db}")
    try:
        out = subprocess.run(
            [str(DBOS_PYTHON), str(ROOT / "tests/bench/dbos_side.py"),
             _url(admin_url, system_db), _url(admin_url, app_db),
             str(SEQUENTIAL), str(CONCURRENT)],
            capture_output=True, text=True, timeout=1800, env=_dbos_env(admin_url),
        )
        if out.returncode != 0:
            raise RuntimeError(f"the DBOS side failed:\n{out.stderr[-3000:]}")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            for db in (system_db, app_db):
                conn.execute(f"drop database if exists {db} with (force)")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _dbos_env(admin_url: str) -> dict[str, str]:
    """The environment of the DBOS side: the embedded server's password file, where the admin
    URL names one (a postgresql:// URL cannot carry it; libpq reads PGPASSFILE)."""
    passfile = psycopg.conninfo.conninfo_to_dict(admin_url).get("passfile")
    return {**os.environ, **({"PGPASSFILE": str(passfile)} if passfile else {})}


def _url(admin_url: str, dbname: str) -> str:
    """A postgresql:// URL (what DBOS takes) for another database of the same server."""
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    user, host, port = info.get("user", ""), info.get("host", "localhost"), info.get("port", 5432)
    password = f":{info['password']}" if info.get("password") else ""
    return f"postgresql://{user}{password}@{host}:{port}/{dbname}"


def _world_file() -> Path:
    """The demo world with the five transfers' USDT, under the bench's home."""
    (ROOT / HOME).mkdir(parents=True, exist_ok=True)
    return write_world(ROOT / HOME, balances=WORLD_BALANCES)


async def vs_dbos(admin_url: str, accounts: Accounts) -> list[bool]:
    async def memory() -> Exchanges:
        return MemoryExchanges(accounts, balances=MEMORY_BALANCES)

    async def world() -> Exchanges:
        return await SimulatedWorld.open(
            url, world=_world_file(), accounts=accounts,
            time_scale=1000.0, max_size=4)

    async with scratch_database() as url:
        sim_seq, sim_con = await ours_rates(url, accounts, world)
    async with scratch_database() as url:
        mem_seq, mem_con = await ours_rates(url, accounts, memory)
    theirs = dbos_rates(admin_url)
    note("vs DBOS", f"5-step workflows, {SEQUENTIAL} one at a time, {CONCURRENT} at once "
                    "(workflows/s, ours with budgets lifted)")
    note("", f"ours, simulated world:  sequential {sim_seq:8.2f}/s  concurrent {sim_con:8.2f}/s")
    note("", f"ours, in-memory double: sequential {mem_seq:8.2f}/s  concurrent {mem_con:8.2f}/s")
    if theirs is None:
        return []
    note("", f"DBOS {theirs['version']} (5 steps, one insert each): sequential "
             f"{theirs['sequential_per_s']:8.2f}/s  concurrent {theirs['concurrent_per_s']:8.2f}/s")
    note("", f"simulated world vs DBOS: sequential {sim_seq / theirs['sequential_per_s']:.3f}x"
             f"  concurrent {sim_con / theirs['concurrent_per_s']:.3f}x (not a goal)")
    return [
        report("vs DBOS", "in-memory, sequential: ours / DBOS",
               mem_seq / theirs["sequential_per_s"], GOALS["sequential"]),
        report("vs DBOS", f"in-memory, {CONCURRENT} at once: ours / DBOS",
               mem_con / theirs["concurrent_per_s"], GOALS["concurrent"]),
    ]


# -- 2. overlap ---------------------------------------------------------------------------------

async def overlap(accounts: Accounts) -> list[bool]:
    spec, params = seed_spec(), SEED_PARAMS
    async with scratch_database() as url, await EventStore.open(url, max_size=10) as store:
        engine = make_engine(store, seed_exchanges(accounts), accounts, LIFTED)
        async with running(engine, store):
            start = time.perf_counter()
            await _settle(store, await start_many(store, spec, params, accounts, 1), 300)
            one = time.perf_counter() - start
            steps_one = await transition_count(store)
            start = time.perf_counter()
            ids = await start_many(store, spec, params, accounts, OVERLAP, parallel=16)
            states, done = await wait_settled(store, ids, timeout=OVERLAP_TIMEOUT, interval=0.5)
            wall = time.perf_counter() - start
            steps = await transition_count(store, ids)
    note("overlap", f"built-in path, 100 ms per exchange call: one workflow {one:.1f} s "
                    f"({steps_one} steps); {OVERLAP} at once: "
                    + (f"{wall:.1f} s" if done else
                       f"{sum(states.values())} settled after {wall:.0f} s (stopped)")
                    + f", {steps / wall:.1f} steps/s, states {states}")
    results = [report("overlap", f"{OVERLAP} at once, budgets lifted: wall / one workflow's"
                      + ("" if done else " (lower bound)"), wall / one, GOALS["overlap"],
                      at_most=True)]
    # The default budgets are the live exchanges' published limits (Upbit orders 9/s per
    # account, ...): with this many workflows they, not the engine, must be the limit.
    async with scratch_database() as url, await EventStore.open(url, max_size=10) as store:
        exchanges, kept = seed_exchanges(accounts), budgets(DEFAULT)
        engine = make_engine(store, exchanges, accounts, budgets=kept)
        async with running(engine, store):
            ids = await start_many(store, spec, params, accounts, OVERLAP, parallel=16)
            before, counters = await transition_count(store), kept.counters()
            start = time.perf_counter()
            await asyncio.sleep(BUDGET_SECONDS)
            window = time.perf_counter() - start
            steps = await transition_count(store) - before
            use = budget_use(kept, counters, window)
    busiest = max(use, key=use.__getitem__, default="none")
    note("budget", f"{OVERLAP} built-in-path workflows, the live default budgets, {window:.0f} s "
                   f"window: {steps / window:.1f} steps/s; budget used: "
                   + ", ".join(f"{k} {v:.2f}" for k, v in sorted(use.items())))
    results.append(report("budget", f"busiest budget ({busiest}) used / its rate",
                          use.get(busiest, 0.0), GOALS["budget"]))
    return results


# -- main ---------------------------------------------------------------------------------------

async def main() -> int:
    admin_url, nats_url, started = probes.prepare_server()
    accounts = load_accounts()
    try:
        print(f"PostgreSQL {server_version(admin_url)}, {os.cpu_count()} cores; "
              f"sections {','.join(SECTIONS)}{' (quick sizes)' if QUICK else ''}")
        results: list[bool] = []
        if "dbos" in SECTIONS:
            results += await vs_dbos(admin_url, accounts)
        if "overlap" in SECTIONS:
            results += await overlap(accounts)
        if "sql" in SECTIONS:
            results += await probes.sql_per_step(accounts, nats_url)
        if "rss" in SECTIONS:
            results += await probes.peak_rss(accounts)
        if "profile" in SECTIONS:
            await probes.profile(accounts)
        print(f"{sum(results)}/{len(results)} engine goals met")
    finally:
        if started:
            from rebalancer import embedded

            embedded.down(HOME)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(asyncio.run(probes.child(sys.argv[2:])))
    sys.exit(asyncio.run(main()))

