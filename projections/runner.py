"""Catch-up runner: feeds the global event order to projections, each with its own checkpoint."""

# Over ~400 lines for a reason: the shared read, the compare-and-set claim of the checkpoints
# and the poison search are one invariant (each event applied once to each projection, a poison
# event stopping only its own) and read best together.

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from psycopg import AsyncConnection, sql
from psycopg import errors as pg_errors
from psycopg.rows import tuple_row

from events.concurrency import first_of
from events.errors import StoreUnavailableError
from events.store import ORIGIN, Checkpoint, EventStore, RecordedEvent
from projections.alerts import AlertsProjection
from projections.exposure import ExposureProjection
from projections.workflows import WorkflowsProjection

log = logging.getLogger(__name__)

# After a NOTIFY, wait this long (seconds) for more before reading: a burst of appends from a
# busy worker becomes one batch (one read, one transaction) instead of one per append.
COALESCE = 0.03
MAX_BACKOFF = 5.0  # seconds between reconnect attempts while PostgreSQL is away


class Projection(Protocol):
    """A read model fed by the runner; `apply_batch` runs inside the runner's transaction."""

    name: str
    schema: str
    tables: tuple[str, ...]

    async def apply_batch(
        self, conn: AsyncConnection[Any], events: list[RecordedEvent]
    ) -> None: ...


def default_projections(schema: str = "public") -> list[Projection]:
    """Every read model of the product, writing into `schema`."""
    return [WorkflowsProjection(schema), ExposureProjection(schema), AlertsProjection(schema)]


@dataclass(frozen=True)
class ProjectionStatus:
    name: str
    checkpoint: Checkpoint
    events_applied: int
    error: str | None
    error_position: int | None


_gc_depth = [0]
_gc_saved: list[int] = []


@contextlib.contextmanager
def fewer_collections(threshold: int = 50_000) -> Iterator[None]:
    """Run the cyclic GC less often while folding many events.

    A rebuild allocates millions of small dicts and views that live on; with the default
    young-generation threshold (700) the collector rescans the growing heap over and over, which
    cost a third of the fold's time on 10,000 workflows. Nothing here makes reference cycles
    that need collecting promptly, so the threshold is raised for the duration and restored.
    """
    # Runners overlap (the engine's and serve's own): the outermost one sets and restores.
    if _gc_depth[0] == 0:
        _gc_saved[:] = gc.get_threshold()
        gc.set_threshold(max(threshold, _gc_saved[0]), *_gc_saved[1:])
    _gc_depth[0] += 1
    try:
        yield
    finally:
        _gc_depth[0] -= 1
        if _gc_depth[0] == 0:
            gc.set_threshold(*_gc_saved)


class _Moved(Exception):
    """Another runner advanced this projection's checkpoint first."""


class _ApplyFailed(Exception):
    """A projection raised while applying a batch (its cause says what)."""


class PoisonEventError(Exception):
    """A projection could not apply an event; it stops there, the others go on."""

    def __init__(self, projection: str, message: str, position: int | None) -> None:
        self.projection = projection
        self.position = position
        super().__init__(message)

    @classmethod
    def at(cls, projection: str, event: RecordedEvent, cause: BaseException) -> PoisonEventError:
        return cls(
            projection,
            f"projection {projection} stopped at {event.type} {event.stream_id} v{event.version}"
            f" (position {event.position}): {type(cause).__name__}: {cause}",
            event.position,
        )


class ProjectionRunner:
    """Applies every event exactly once to each projection.

    One read of the global order feeds every projection, and one transaction applies the
    batch to all of them and advances their checkpoints, so a crash in between leaves neither;
    an event at or below a projection's checkpoint (a re-delivery) is dropped. Checkpoints are
    kept in memory and verified at commit by a compare-and-set on the stored ones, so several
    runners on one database still apply each event once: the loser rolls back and re-reads.
    When the shared transaction fails, each projection is committed alone, and a poison event
    stops its own projection with PoisonEventError recorded in the checkpoint row; the others
    keep running. `catch_up` raises what the database raised; `run` never ends for it (see
    there).
    """

    def __init__(
        self,
        store: EventStore,
        projections: Sequence[Projection],
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        until: Checkpoint | None = None,
        coalesce: float = COALESCE,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self._store = store
        self._projections = list(projections)
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._until = until
        self._coalesce = coalesce
        self._max_backoff = max_backoff
        # What this runner believes each checkpoint is; the commit's compare-and-set checks it.
        self._checkpoints: dict[str, Checkpoint] = {}
        self.stopped: dict[str, PoisonEventError] = {}
        # Test hook: called after a batch is applied and before its transaction commits.
        self.before_checkpoint: Callable[[str, list[RecordedEvent]], None] | None = None

    async def catch_up(self) -> int:
        """Apply everything readable now to every projection; returns the events applied."""
        with fewer_collections():
            return await self._catch_up_all()

    async def run(self, stop: asyncio.Event) -> None:
        """Catch up, then wait for NOTIFY (or the poll interval) and again, until `stop`.

        Never ends before `stop`: a follower that stops would end `serve`, and with it the
        worker, for what is only a read model falling behind. PostgreSQL away is a WARNING and
        retried with backoff; anything else (a statement refused, a bug) is an ERROR with its
        traceback, retried with a longer backoff, so it shows in the log and heals once fixed.
        A poison event stops only its projection (see `stopped`).
        """
        failures = 0
        while not stop.is_set():
            try:
                async with self._store.listen() as notifications:
                    while not stop.is_set():
                        await self.catch_up()
                        if failures:
                            log.info("projection runner: following the events again")
                            failures = 0
                        await first_of(
                            notifications.wait(self._poll_interval, coalesce=self._coalesce),
                            stop.wait(),
                        )
                return
            except StoreUnavailableError as e:
                failures += 1
                delay = backoff(self._poll_interval, failures, self._max_backoff)
                log.warning("projection runner: database unavailable (%s); retrying in %.1fs",
                            e, delay)
            except Exception as e:
                failures += 1
                delay = backoff(self._poll_interval, failures, self._max_backoff * 6)
                sqlstate = getattr(e, "sqlstate", None)
                log.error("projection runner failed (%s%s); retrying in %.1fs",
                          f"SQLSTATE {sqlstate}: " if sqlstate else "", e, delay, exc_info=True)
            await first_of(asyncio.sleep(delay), stop.wait())

    async def status(self) -> list[ProjectionStatus]:
        result = []
        async with self._store.connection() as conn:
            for projection in self._projections:
                row = await _checkpoint_row(conn, projection)
                result.append(
                    ProjectionStatus(
                        projection.name, Checkpoint(int(row[0]), int(row[1])), int(row[2]),
                        row[3], row[4],
                    )
                )
        return result

    # -- catching up -----------------------------------------------------------------------

    async def _catch_up_all(self) -> int:
        total = 0
        while True:
            active = await self._active()
            if not active:
                return total
            start = min(self._checkpoints[p.name] for p in active)
            read = await self._store.read_all(start, self._batch_size)
            events = [e for e in read if self._until is None or e.checkpoint <= self._until]
            # Re-delivery guard: never apply what a checkpoint already covers.
            pending = {
                p.name: [e for e in events if e.checkpoint > self._checkpoints[p.name]]
                for p in active
            }
            work = [p for p in active if pending[p.name]]
            if work:
                total += await self._apply(work, pending)
            if len(read) < self._batch_size or len(events) < len(read):
                return total  # caught up (or at `until`): no second read to find nothing

    async def _active(self) -> list[Projection]:
        """The projections not stopped, their checkpoints loaded (one statement per schema for
        those this runner does not know yet)."""
        unknown = [
            p for p in self._projections
            if p.name not in self.stopped and p.name not in self._checkpoints
        ]
        if unknown:
            await self._load_checkpoints(unknown)
        return [p for p in self._projections if p.name not in self.stopped]

    async def _apply(self, work: list[Projection], pending: dict[str, list[RecordedEvent]]) -> int:
        try:
            await self._commit(work, pending)
        except _Moved:
            self._forget(work)
            return 0
        except StoreUnavailableError:
            # The commit may or may not have landed: re-read rather than guess.
            self._forget(work)
            raise
        except _ApplyFailed:
            # Which projection failed, and at which event, is found by committing each alone.
            applied = 0
            for projection in work:
                events = pending[projection.name]
                attempts = [events] if len(work) > 1 else [[event] for event in events]
                with contextlib.suppress(PoisonEventError):  # recorded, logged; others go on
                    applied += await self._apply_alone(projection, events, attempts)
            return applied
        self._advance(work, pending)
        return sum(len(pending[p.name]) for p in work)

    async def _apply_alone(
        self, projection: Projection, events: list[RecordedEvent],
        attempts: list[list[RecordedEvent]],
    ) -> int:
        applied = 0
        for batch in attempts:
            try:
                await self._commit([projection], {projection.name: batch})
            except _Moved:
                self._forget([projection])
                return applied  # another runner got here first; the next read starts from it
            except StoreUnavailableError:
                self._forget([projection])
                raise
            except _ApplyFailed as e:
                if len(batch) > 1:
                    # Find the poison event: commit what precedes it one event at a time.
                    rest = events[events.index(batch[0]):]
                    return applied + await self._apply_alone(
                        projection, rest, [[event] for event in rest])
                cause = e.__cause__ or e
                error = PoisonEventError.at(projection.name, batch[0], cause)
                log.error("%s", error)
                await self._record_error(projection, error)
                self.stopped[projection.name] = error
                self._forget([projection])
                raise error from cause
            self._advance([projection], {projection.name: batch})
            applied += len(batch)
        return applied

    def _advance(self, done: list[Projection], batches: dict[str, list[RecordedEvent]]) -> None:
        for projection in done:
            self._checkpoints[projection.name] = batches[projection.name][-1].checkpoint

    def _forget(self, projections: list[Projection]) -> None:
        for projection in projections:
            self._checkpoints.pop(projection.name, None)

    # -- checkpoints -----------------------------------------------------------------------

    async def _load_checkpoints(self, projections: list[Projection]) -> None:
        async with self._store.connection() as conn:
            for schema, group in _by_schema(projections).items():
                table = sql.Identifier(schema, "projection_checkpoints")
                names = [p.name for p in group]
                await conn.execute(
                    sql.SQL("insert into {} (name) select unnest(%s::text[])"
                            " on conflict (name) do nothing").format(table),
                    (names,),
                )
                cur = conn.cursor(row_factory=tuple_row)
                await cur.execute(
                    sql.SQL("select name, transaction_id::text, position, error, error_position"
                            " from {} where name = any(%s)").format(table),
                    (names,),
                )
                for name, transaction_id, position, error, error_position in (
                    await cur.fetchall()
                ):
                    if error is not None:
                        # Stopped by an earlier run; a rebuild (`rebalancer replay`) clears it.
                        stop = PoisonEventError(name, error, error_position)
                        if name not in self.stopped:
                            log.error("%s", stop)
                        self.stopped[name] = stop
                    else:
                        self._checkpoints[name] = Checkpoint(int(transaction_id), int(position))

    async def _commit(
        self, projections: list[Projection], batches: dict[str, list[RecordedEvent]]
    ) -> None:
        """Claim the checkpoints and apply the batches in one transaction. Raises _Moved when
        another runner advanced one first, _ApplyFailed when a projection (not the runner's own
        SQL) failed, StoreUnavailableError when PostgreSQL went away."""
        claimed = False
        try:
            async with self._store.transaction() as conn:
                # Read models are rebuilt from the events: a batch lost with the server (its
                # commit not yet flushed) rolls back with its checkpoint and is applied again,
                # so it need not wait for the WAL flush the event appends queue for.
                await conn.execute("set local synchronous_commit = off")
                # The compare-and-set comes first: it locks the checkpoint rows, so a second
                # runner on the same projections waits here, before it has written anything,
                # and then finds the checkpoints moved and rolls back (raising _Moved).
                for schema, group in _by_schema(projections).items():
                    await self._claim(conn, schema, group, batches)
                claimed = True
                for projection in projections:
                    events = batches[projection.name]
                    await projection.apply_batch(conn, events)
                    if self.before_checkpoint is not None:
                        self.before_checkpoint(projection.name, events)
        except (_Moved, StoreUnavailableError) as e:
            if isinstance(e.__cause__, pg_errors.DeadlockDetected):
                raise _Moved() from e  # two runners claimed in opposite orders: re-read
            raise
        except Exception as e:
            if claimed:
                raise _ApplyFailed() from e
            raise  # the runner's own checkpoint SQL: a bug or a schema change, not an event

    async def _claim(
        self, conn: AsyncConnection[Any], schema: str, projections: list[Projection],
        batches: dict[str, list[RecordedEvent]],
    ) -> None:
        rows: list[Any] = []
        for projection in projections:
            old = self._checkpoints[projection.name]
            new = batches[projection.name][-1].checkpoint
            rows += [projection.name, str(old.transaction_id), old.position,
                     str(new.transaction_id), new.position, len(batches[projection.name])]
        values = sql.SQL(", ").join(
            sql.SQL("(%s::text, %s::text::xid8, %s::bigint, %s::text::xid8, %s::bigint,"
                    " %s::bigint)") for _ in projections
        )
        cur = await conn.execute(
            sql.SQL(
                "update {} c set transaction_id = v.new_tx, position = v.new_pos,"
                " events_applied = c.events_applied + v.n, updated_at = now()"
                " from (values {}) v(name, old_tx, old_pos, new_tx, new_pos, n)"
                " where c.name = v.name and c.transaction_id = v.old_tx"
                " and c.position = v.old_pos and c.error is null"
            ).format(sql.Identifier(schema, "projection_checkpoints"), values),
            rows,
        )
        if cur.rowcount != len(projections):
            raise _Moved()

    async def _record_error(self, projection: Projection, error: PoisonEventError) -> None:
        async with self._store.connection() as conn:
            await conn.execute(
                sql.SQL(
                    "update {} set error = %s, error_position = %s, updated_at = now()"
                    " where name = %s"
                ).format(sql.Identifier(projection.schema, "projection_checkpoints")),
                (str(error), error.position, projection.name),
            )


def backoff(base: float, failures: int, cap: float) -> float:
    """Seconds to wait after the `failures`-th failure in a row: doubling from `base`."""
    return float(min(cap, max(base, 0.05) * 2 ** min(failures - 1, 10)))


def _by_schema(projections: list[Projection]) -> dict[str, list[Projection]]:
    groups: dict[str, list[Projection]] = {}
    for projection in projections:
        groups.setdefault(projection.schema, []).append(projection)
    return groups


async def _checkpoint_row(conn: AsyncConnection[Any], projection: Projection) -> tuple[Any, ...]:
    table = sql.Identifier(projection.schema, "projection_checkpoints")
    await conn.execute(
        sql.SQL("insert into {} (name) values (%s) on conflict (name) do nothing").format(table),
        (projection.name,),
    )
    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(
        sql.SQL(
            "select transaction_id::text, position, events_applied, error, error_position"
            " from {} where name = %s"
        ).format(table),
        (projection.name,),
    )
    row = await cur.fetchone()
    assert row is not None
    return tuple(row)


async def reset(store: EventStore, projections: Sequence[Projection]) -> None:
    """Empty the projections' tables and checkpoints (for a rebuild from position zero)."""
    async with store.transaction() as conn:
        for projection in projections:
            for table in projection.tables:
                await conn.execute(
                    sql.SQL("truncate {}").format(sql.Identifier(projection.schema, table))
                )
            await conn.execute(
                sql.SQL("delete from {} where name = %s").format(
                    sql.Identifier(projection.schema, "projection_checkpoints")
                ),
                (projection.name,),
            )


__all__ = [
    "ORIGIN",
    "PoisonEventError",
    "Projection",
    "ProjectionRunner",
    "ProjectionStatus",
    "default_projections",
    "reset",
]
