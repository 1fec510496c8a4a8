"""Rebuilding the read models from the events, and verifying the live ones against a rebuild."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from psycopg import AsyncConnection, sql
from psycopg.rows import tuple_row

from events.errors import EventStoreError
from events.store import ORIGIN, Checkpoint, EventStore
from projections.runner import Projection, ProjectionRunner, default_projections, reset

LIVE_SCHEMA = "public"
SHADOW_SCHEMA = "rebalancer_verify"
CHECKPOINTS = "projection_checkpoints"
# Snapshot copies of the live tables live next to the shadow ones under this prefix.
LIVE_PREFIX = "live_"
# One verify at a time per database: they share (drop and recreate) the shadow schema.
VERIFY_LOCK = 0x7265_6276_6572_6966  # "rebverif"
REBUILD_BATCH = 1000

DifferenceKind = Literal["only_live", "only_rebuilt", "differs", "projection_stopped"]


class ReadModelError(EventStoreError):
    """The read models could not be compared (another verify running, a table without a
    primary key); SQL that fails leaves as the store's StoreQueryError or
    StoreUnavailableError."""


@dataclass(frozen=True)
class Difference:
    """One way a live read model disagrees with the one rebuilt from the events.

    `key` is the row's primary key as (column, value) pairs; `column` names the differing
    column (with a JSON path inside jsonb columns, e.g. `tasks[2].state`), None for a row
    found on one side only, whose whole row is then the value on that side.
    """

    table: str
    key: tuple[tuple[str, str], ...]
    column: str | None
    live: Any
    rebuilt: Any
    kind: DifferenceKind

    @property
    def key_text(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.key)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table, "key": dict(self.key), "column": self.column,
            "live": self.live, "rebuilt": self.rebuilt, "kind": self.kind,
        }


@dataclass(frozen=True)
class Verification:
    """What `compare` found: the differences, the live rows compared and where."""

    differences: list[Difference]
    rows: dict[str, int]  # live rows compared, per table
    checkpoints: dict[str, Checkpoint]  # the live checkpoint each projection was compared at
    shadow_schema: str = SHADOW_SCHEMA
    events_applied: dict[str, int] = field(default_factory=dict)  # by the shadow rebuild

    @property
    def ok(self) -> bool:
        return not self.differences


# -- rebuild ------------------------------------------------------------------------------------


async def rebuild(store: EventStore, projections: Sequence[Projection] | None = None) -> int:
    """Empty the live read models and apply every event again; returns the events applied.

    Also clears a poison stop, since the reset deletes the checkpoint rows. Readers see the
    tables empty, then filling, while it runs; a live runner (`rebalancer serve`) following
    the same projections meanwhile is harmless, as runners serialise on the checkpoint row.
    """
    chosen = list(projections) if projections is not None else default_projections(LIVE_SCHEMA)
    await reset(store, chosen)
    return await ProjectionRunner(store, chosen, batch_size=REBUILD_BATCH).catch_up()


# -- verify -------------------------------------------------------------------------------------


async def verify(store: EventStore) -> list[Difference]:
    """Every difference between the live read models and ones rebuilt from position zero."""
    return (await compare(store)).differences


async def compare(store: EventStore, *, shadow: str = SHADOW_SCHEMA) -> Verification:
    """Rebuild every read model into the `shadow` schema and diff it against the live one.

    The live tables and checkpoints are copied in one REPEATABLE READ transaction, so a live
    runner may keep going meanwhile; each shadow projection is then rebuilt exactly up to its
    live counterpart's checkpoint, so both sides stand at the same place in the global order.
    The shadow schema is dropped and recreated by each run and left behind for inspection.
    Raises ReadModelError when another verify holds the shadow schema, StoreQueryError or
    StoreUnavailableError when SQL fails.
    """
    live = default_projections(LIVE_SCHEMA)
    rebuilt = default_projections(shadow)
    tables = [table for projection in live for table in projection.tables]
    async with store.connection() as conn:
        cur = await conn.execute("select pg_try_advisory_lock(%s)", (VERIFY_LOCK,))
        locked = await cur.fetchone()
        if not (locked and locked[0]):
            raise ReadModelError(
                f"another verify is using schema {shadow}; try again when it has finished"
            )
        try:
            await _prepare_shadow(conn, shadow, tables)
            checkpoints = await _snapshot(conn, shadow, tables)
            applied: dict[str, int] = {}
            for projection in rebuilt:
                # Each to its own live checkpoint: live projections may stand apart.
                until = checkpoints[projection.name].checkpoint
                runner = ProjectionRunner(
                    store, [projection], batch_size=REBUILD_BATCH, until=until
                )
                applied[projection.name] = await runner.catch_up()
            differences = _checkpoint_differences(
                checkpoints, await _checkpoint_rows(conn, shadow, CHECKPOINTS), live
            )
            rows: dict[str, int] = {}
            for table in tables:
                differences += await _diff_table(conn, shadow, table)
                rows[table] = await _count(conn, shadow, LIVE_PREFIX + table)
        finally:
            await conn.execute("select pg_advisory_unlock(%s)", (VERIFY_LOCK,))
    return Verification(
        differences,
        rows,
        {name: row.checkpoint for name, row in checkpoints.items()},
        shadow,
        applied,
    )


@dataclass(frozen=True)
class _CheckpointRow:
    checkpoint: Checkpoint
    error: str | None


async def _prepare_shadow(conn: AsyncConnection[Any], shadow: str, tables: list[str]) -> None:
    schema = sql.Identifier(shadow)
    async with conn.transaction():
        await conn.execute(sql.SQL("drop schema if exists {} cascade").format(schema))
        await conn.execute(sql.SQL("create schema {}").format(schema))
        for table in [*tables, CHECKPOINTS]:
            source = sql.Identifier(LIVE_SCHEMA, table)
            for name in (table, LIVE_PREFIX + table):
                await conn.execute(
                    sql.SQL("create table {} (like {} including all)").format(
                        sql.Identifier(shadow, name), source
                    )
                )


async def _snapshot(
    conn: AsyncConnection[Any], shadow: str, tables: list[str]
) -> dict[str, _CheckpointRow]:
    """Copy the live tables and read their checkpoints as of one snapshot."""
    async with conn.transaction():
        # Must come first: the snapshot is taken by the transaction's first query. Kept short,
        # as any open transaction holds every follower's snapshot barrier back.
        await conn.execute("set transaction isolation level repeatable read")
        for table in [*tables, CHECKPOINTS]:
            await conn.execute(
                sql.SQL("insert into {} select * from {}").format(
                    sql.Identifier(shadow, LIVE_PREFIX + table),
                    sql.Identifier(LIVE_SCHEMA, table),
                )
            )
        return await _checkpoint_rows(conn, shadow, LIVE_PREFIX + CHECKPOINTS)


async def _checkpoint_rows(
    conn: AsyncConnection[Any], schema: str, table: str
) -> dict[str, _CheckpointRow]:
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(
        sql.SQL("select name, transaction_id::text, position, error from {}").format(
            sql.Identifier(schema, table)
        )
    )
    found = {
        name: _CheckpointRow(Checkpoint(int(txid), int(position)), error)
        for name, txid, position, error in await cur.fetchall()
    }
    # A projection that never ran stands at the origin; its rebuild applies nothing.
    for projection in default_projections(schema):
        found.setdefault(projection.name, _CheckpointRow(ORIGIN, None))
    return found


def _checkpoint_differences(
    live: dict[str, _CheckpointRow],
    rebuilt: dict[str, _CheckpointRow],
    projections: list[Projection],
) -> list[Difference]:
    differences = []
    for projection in projections:
        name = projection.name
        key = (("name", name),)
        mine, theirs = live[name], rebuilt[name]
        if mine.error is not None or theirs.error is not None:
            differences.append(
                Difference(CHECKPOINTS, key, "error", mine.error, theirs.error,
                           "projection_stopped")
            )
        elif mine.checkpoint != theirs.checkpoint:
            # The rebuild could not reach the live checkpoint: events the live model applied
            # are no longer readable in the same order.
            differences.append(
                Difference(CHECKPOINTS, key, "position", mine.checkpoint.position,
                           theirs.checkpoint.position, "differs")
            )
    return differences


async def _diff_table(conn: AsyncConnection[Any], shadow: str, table: str) -> list[Difference]:
    """Rows of the live snapshot and the shadow table that differ, matched by primary key.

    PostgreSQL narrows the comparison to the differing rows (by each type's own equality, so
    jsonb and numeric compare by value); Python names the differing columns.
    """
    columns = await _columns(conn, table)
    keys = await _primary_key(conn, table)
    n = len(columns)

    def side(alias: str) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(alias, c) for c in columns)

    query = sql.SQL(
        "select {live_cols}, {shadow_cols} from {live} as l full join {shadow} as s on {join}"
        " where ({live_cols}) is distinct from ({shadow_cols}) order by {order}"
    ).format(
        live_cols=side("l"),
        shadow_cols=side("s"),
        live=sql.Identifier(shadow, LIVE_PREFIX + table),
        shadow=sql.Identifier(shadow, table),
        join=sql.SQL(" and ").join(
            sql.SQL("{} = {}").format(sql.Identifier("l", k), sql.Identifier("s", k)) for k in keys
        ),
        order=sql.SQL(", ").join(
            sql.SQL("coalesce({}, {})").format(sql.Identifier("l", k), sql.Identifier("s", k))
            for k in keys
        ),
    )
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(query)
    differences: list[Difference] = []
    for row in await cur.fetchall():
        live = dict(zip(columns, row[:n], strict=True))
        rebuilt = dict(zip(columns, row[n:], strict=True))
        # Primary-key columns are never null, so a null key means a missing side.
        only_live = rebuilt[keys[0]] is None
        only_rebuilt = live[keys[0]] is None
        present = rebuilt if only_rebuilt else live
        key = tuple((k, str(present[k])) for k in keys)
        if only_live:
            differences.append(Difference(table, key, None, live, None, "only_live"))
        elif only_rebuilt:
            differences.append(Difference(table, key, None, None, rebuilt, "only_rebuilt"))
        else:
            for column in columns:
                for path, a, b in _value_differences(column, live[column], rebuilt[column]):
                    differences.append(Difference(table, key, path, a, b, "differs"))
    return differences


def _value_differences(path: str, live: Any, rebuilt: Any) -> list[tuple[str, Any, Any]]:
    """Where two column values differ, descending into JSON so a path names the spot."""
    if isinstance(live, dict) and isinstance(rebuilt, dict):
        found: list[tuple[str, Any, Any]] = []
        for key in [*live, *(k for k in rebuilt if k not in live)]:
            if (key in live) != (key in rebuilt) and live.get(key, rebuilt.get(key)) is None:
                # A key null on one side and absent on the other: only the objects show it.
                return [(path, live, rebuilt)]
            found += _value_differences(f"{path}.{key}", live.get(key), rebuilt.get(key))
        return found
    if isinstance(live, list) and isinstance(rebuilt, list) and len(live) == len(rebuilt):
        found = []
        for index, (a, b) in enumerate(zip(live, rebuilt, strict=True)):
            found += _value_differences(f"{path}[{index}]", a, b)
        return found
    # bool is an int in Python: True == 1 must still count as a difference in JSON.
    if live != rebuilt or isinstance(live, bool) != isinstance(rebuilt, bool):
        return [(path, live, rebuilt)]
    return []


async def _columns(conn: AsyncConnection[Any], table: str) -> list[str]:
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(
        "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0"
        " and not attisdropped order by attnum",
        (f"{LIVE_SCHEMA}.{table}",),
    )
    return [row[0] for row in await cur.fetchall()]


async def _primary_key(conn: AsyncConnection[Any], table: str) -> list[str]:
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(
        "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid"
        " and a.attnum = any(i.indkey) where i.indrelid = %s::regclass and i.indisprimary"
        " order by array_position(i.indkey::int2[], a.attnum)",
        (f"{LIVE_SCHEMA}.{table}",),
    )
    keys = [row[0] for row in await cur.fetchall()]
    if not keys:
        raise ReadModelError(f"{LIVE_SCHEMA}.{table} has no primary key to match rows by")
    return keys


async def _count(conn: AsyncConnection[Any], schema: str, table: str) -> int:
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(
        sql.SQL("select count(*) from {}").format(sql.Identifier(schema, table))
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


__all__ = [
    "SHADOW_SCHEMA",
    "Difference",
    "ReadModelError",
    "Verification",
    "compare",
    "rebuild",
    "verify",
]
