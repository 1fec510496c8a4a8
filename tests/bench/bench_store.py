"""Event store benchmark: each figure is a ratio against a raw baseline measured in the same run.

Run with `make bench` (or `python -m tests.bench.bench_store`). Uses REBALANCER_DATABASE_URL
when set, else the embedded servers under .rebalancer-bench; works in a scratch database.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import psycopg

from events.store import EventStore, NewEvent
from tests.bench.common import raw_scan, scratch_database, server_version

SINGLE_APPENDS = int(os.environ.get("BENCH_SINGLE_APPENDS", "3000"))
BATCHES = int(os.environ.get("BENCH_BATCHES", "300"))
BATCH_SIZE = 100
WRITER_APPENDS = int(os.environ.get("BENCH_WRITER_APPENDS", "1500"))
GOALS = {"single": 0.7, "batch": 0.4, "writers": 2.5, "read": 0.6}

DATA = {"task_index": 1, "task_name": "withdraw_to_interim", "kind": "withdraw",
        "trigger": "accept", "source": "submitting", "dest": "requested",
        "request_result": {"id": "w-123", "amount": "1.23450000", "currency": "ETH"}}
EVENT = NewEvent("TaskStateChanged", DATA, {"actor": "bench"})
RAW_INSERT = (
    "insert into bench_raw (stream_id, version, type, schema_version, data, metadata, hash)"
    " values (%s, %s, %s, 1, %s::jsonb, %s::jsonb, %s)"
)


def _stream() -> str:
    return f"workflow-{uuid.uuid4()}"


async def _timed(fn: Callable[[], Awaitable[int]]) -> float:
    start = time.perf_counter()
    count = await fn()
    return count / (time.perf_counter() - start)


async def bench_single(url: str, store: EventStore) -> tuple[float, float]:
    data, meta = json.dumps(DATA), json.dumps({"actor": "bench"})

    async def ours() -> int:
        streams = {_stream(): 0 for _ in range(50)}
        names = list(streams)
        for i in range(SINGLE_APPENDS):
            s = names[i % len(names)]
            await store.append(s, [EVENT], streams[s])
            streams[s] += 1
        return SINGLE_APPENDS

    async def raw() -> int:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            stream = _stream()
            for i in range(SINGLE_APPENDS):
                await conn.execute(
                    RAW_INSERT, (stream, i + 1, "TaskStateChanged", data, meta, b"h" * 32),
                    prepare=True,
                )
        return SINGLE_APPENDS

    return await _timed(ours), await _timed(raw)


async def bench_batch(url: str, store: EventStore) -> tuple[float, float]:
    data, meta = json.dumps(DATA), json.dumps({"actor": "bench"})

    async def ours() -> int:
        for _ in range(BATCHES):
            await store.append(_stream(), [EVENT] * BATCH_SIZE, 0)
        return BATCHES * BATCH_SIZE

    async def copy() -> int:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            for _ in range(BATCHES):
                stream = _stream()
                async with conn.cursor() as cur, cur.copy(
                    "copy bench_raw (stream_id, version, type, schema_version, data, metadata,"
                    " hash) from stdin"
                ) as cp:
                    for v in range(1, BATCH_SIZE + 1):
                        await cp.write_row(
                            (stream, v, "TaskStateChanged", 1, data, meta, b"h" * 32)
                        )
        return BATCHES * BATCH_SIZE

    return await _timed(ours), await _timed(copy)


def _writer_process(
    url: str, raw: bool, count: int, start_at: float, out: multiprocessing.Queue
) -> None:
    async def ours() -> None:
        async with await EventStore.open(url, min_size=1, max_size=2) as store:
            streams = {_stream(): 0 for _ in range(10)}
            names = list(streams)
            await asyncio.sleep(max(0.0, start_at - time.time()))
            begin = time.perf_counter()
            for i in range(count):
                s = names[i % len(names)]
                await store.append(s, [EVENT], streams[s])
                streams[s] += 1
            out.put((begin, time.perf_counter()))

    async def insert() -> None:
        data, meta, stream = json.dumps(DATA), json.dumps({"actor": "bench"}), _stream()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            begin = time.perf_counter()
            for i in range(count):
                await conn.execute(
                    RAW_INSERT, (stream, i + 1, "TaskStateChanged", data, meta, b"h" * 32),
                    prepare=True,
                )
            out.put((begin, time.perf_counter()))

    asyncio.run(insert() if raw else ours())


def bench_writers(url: str, raw: bool = False) -> tuple[float, float]:
    """Events/s with 4 writer processes and with 1, each appending single events."""

    def rate(writers: int) -> float:
        ctx = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue = ctx.Queue()
        start_at = time.time() + 3.0  # all processes begin together after importing
        procs = [
            ctx.Process(target=_writer_process, args=(url, raw, WRITER_APPENDS, start_at, out))
            for _ in range(writers)
        ]
        for p in procs:
            p.start()
        spans = [out.get(timeout=300) for _ in procs]
        for p in procs:
            p.join()
        wall = max(end for _, end in spans) - min(begin for begin, _ in spans)
        return writers * WRITER_APPENDS / wall

    return rate(4), rate(1)


async def bench_read(url: str, store: EventStore) -> tuple[float, float, int]:
    async def ours() -> int:
        n = 0
        async for _ in store.iter_all(batch=2000):
            n += 1
        return n

    async def raw() -> int:
        return await raw_scan(url)

    count = await ours()  # warm the cache so neither side pays for the first disk read
    return await _timed(ours), await _timed(raw), count


def _report(name: str, what: str, ours: float, base: float, goal: float, unit: str) -> bool:
    ratio = ours / base
    verdict = "ok" if ratio >= goal else "BELOW GOAL"
    print(f"{name:<8} {what:<52} ours {ours:>10,.0f} {unit:<9} baseline {base:>10,.0f}"
          f"  ratio {ratio:5.2f} (goal >= {goal}) {verdict}")
    return ratio >= goal


async def main() -> int:
    async with scratch_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("create table bench_raw (like events including all)")
        print(f"PostgreSQL {server_version(url)}, {os.cpu_count()} cores; "
              f"single={SINGLE_APPENDS} batches={BATCHES}x{BATCH_SIZE} "
              f"writer appends={WRITER_APPENDS}")
        results = []
        async with await EventStore.open(url, max_size=4) as store:
            ours, base = await bench_single(url, store)
            results.append(_report("single", "1-event appends/s vs prepared INSERT autocommit",
                                   ours, base, GOALS["single"], "events/s"))
            ours, base = await bench_batch(url, store)
            results.append(_report("batch", "100-event appends rows/s vs COPY of 100 rows",
                                   ours, base, GOALS["batch"], "rows/s"))
        four, one = bench_writers(url)
        results.append(_report("writers", "4 writer processes vs 1 (our appends)",
                               four, one, GOALS["writers"], "events/s"))
        # Not a goal: how far raw INSERTs scale on this machine, the ceiling for the above.
        four, one = bench_writers(url, raw=True)
        print(f"{'(ref)':<8} {'4 vs 1 writer processes of raw INSERTs':<52} "
              f"4: {four:>10,.0f} events/s 1: {one:>10,.0f}  ratio {four / one:5.2f}")
        async with await EventStore.open(url, max_size=2) as store:
            ours, base, count = await bench_read(url, store)
            results.append(_report("read", f"global-order read of {count:,} events vs raw cursor",
                                   ours, base, GOALS["read"], "events/s"))
        print(f"{sum(results)}/{len(results)} goals met")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
