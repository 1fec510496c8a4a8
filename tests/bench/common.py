"""What both benchmarks share: a scratch database and the raw scan they are measured against."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg

from events.migrations import migrate

HOME = Path(".rebalancer-bench")


@contextlib.asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A migrated database of its own (REBALANCER_DATABASE_URL's server, else the embedded
    servers under .rebalancer-bench), dropped afterwards; servers it started are stopped."""
    admin_url = os.environ.get("REBALANCER_DATABASE_URL")
    started = False
    if not admin_url:
        from rebalancer import embedded

        started = not embedded.status(HOME)["postgresql"]
        admin_url = embedded.up(HOME).admin_database_url
    dbname = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"create database {dbname}")
    url = psycopg.conninfo.make_conninfo(admin_url, dbname=dbname)
    try:
        await migrate(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"drop database if exists {dbname} with (force)")
        if started:
            from rebalancer import embedded

            embedded.down(HOME)


async def raw_scan(url: str) -> int:
    """Every events row in global order through a server-side cursor: the read baseline."""
    n = 0
    async with (
        await psycopg.AsyncConnection.connect(url) as conn,
        conn.cursor(name="scan") as cur,
    ):
        cur.itersize = 2000
        await cur.execute("select * from events order by transaction_id, position")
        async for _ in cur:
            n += 1
    return n


def server_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("show server_version").fetchone()
    return str(row[0]) if row else "?"


def report(name: str, what: str, value: float, goal: float, *, at_most: bool = False,
           unit: str = "x") -> bool:
    """One goal's line: the figure, the goal, met or MISSED; returns whether it was met."""
    met = value <= goal if at_most else value >= goal
    sign = "<=" if at_most else ">="
    print(f"{name:<10} {what:<58} {value:>9.2f} {unit:<4} (goal {sign} {goal}) "
          f"{'met' if met else 'MISSED'}")
    return met


def note(name: str, what: str) -> None:
    print(f"{name:<10} {what}", flush=True)
