"""How many events the store, or one stream of it, holds: the one count the tests compare."""

from __future__ import annotations

import psycopg

from events.store import EventStore


async def event_count(source: EventStore | str, stream_id: str | None = None) -> int:
    """Events stored (in `stream_id`, or in all streams), from a store or a database URL.

    It counts rows rather than reading a stream's version, so a test that deleted an event
    sees the gap.
    """
    query = "select count(*) as n from events where %s::text is null or stream_id = %s"
    params = (stream_id, stream_id)
    if isinstance(source, EventStore):
        [row] = await source.fetch_dicts(query, params)
        return int(row["n"])
    async with await psycopg.AsyncConnection.connect(source) as conn:
        cur = await conn.execute(query, params)
        found = await cur.fetchone()
    assert found is not None
    return int(found[0])
