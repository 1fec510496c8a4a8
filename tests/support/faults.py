"""Choosing the simulated world's fault seed so that exactly the calls a test names are hit."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from rebalancer.exchanges.simulated.faults import draw


async def fault_counter(database_url: str) -> int:
    """How many fault draws the world on this database has made so far."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("select value from sim.fault_counter")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def seed_hitting(kind: str, probability: float, after: int, hits: Sequence[bool]) -> int:
    """A fault seed under which the next draws (after `after`) hit `kind` exactly as `hits`
    says: e.g. [False, True] lets the next call through and faults the one after it.

    Only calls that can be faulted draw: with `reject` (money moves only) alone, reads do not
    count; with `timeout` every call does.
    """
    return next(
        seed
        for seed in range(100_000)
        if all(
            (draw(seed, after + 1 + i, kind) < probability) == hit for i, hit in enumerate(hits)
        )
    )
