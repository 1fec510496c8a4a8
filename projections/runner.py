"""Catch-up runner: feeds the global event order to projections, each with its own checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from psycopg import AsyncConnection, sql
from psycopg.rows import tuple_row

from events.concurrency import first_of
from events.errors import StoreQueryError, StoreUnavailableError
from events.store import ORIGIN, Checkpoint, EventStore, RecordedEvent
from projections.alerts import AlertsProjection
from projections.exposure import ExposureProjection
from projections.workflows import WorkflowsProjection

log = logging.getLogger(__name__)


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

    Each batch is applied and the checkpoint advanced in one transaction, so a crash between
    the two leaves neither; an event at or below the checkpoint (a re-delivery) is dropped.
    A poison event stops its own projection with PoisonEventError recorded in the checkpoint
    row; the other projections keep running. A statement PostgreSQL refuses while applying a
    batch points at an event as any other failure does; refused outside one (reading events
    or checkpoints) it is a bug in the runner's SQL, and `run` logs and raises it rather than
    retrying it as an outage.
    """

    def __init__(
        self,
        store: EventStore,
        projections: Sequence[Projection],
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        until: Checkpoint | None = None,
    ) -> None:
        self._store = store
        self._projections = list(projections)
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._until = until
        self.stopped: dict[str, PoisonEventError] = {}
        # Test hook: called after a batch is applied and before its checkpoint is written.
        self.before_checkpoint: Callable[[str, list[RecordedEvent]], None] | None = None

    async def catch_up(self) -> int:
        """Apply everything readable now to every projection; returns the events applied."""
        total = 0
        with fewer_collections():
            total = await self._catch_up_all()
        return total

    async def _catch_up_all(self) -> int:
        total = 0
        for projection in self._projections:
            if projection.name in self.stopped:
                continue
            try:
                total += await self._catch_up_one(projection)
            except PoisonEventError as e:
                log.error("%s", e)
                self.stopped[projection.name] = e
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Catch up, then wait for NOTIFY (or the poll interval) and again, until `stop`."""
        while not stop.is_set():
            try:
                async with self._store.listen() as notifications:
                    while not stop.is_set():
                        await self.catch_up()
                        await first_of(notifications.wait(self._poll_interval), stop.wait())
            except StoreUnavailableError as e:
                log.warning("projection runner lost the database (%s); retrying", e)
                await asyncio.sleep(self._poll_interval)
            except StoreQueryError as e:
                log.error("projection runner: PostgreSQL refused a statement (SQLSTATE %s),"
                          " stopping: %s", e.sqlstate, e)
                raise

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

    async def _catch_up_one(self, projection: Projection) -> int:
        applied = 0
        checkpoint = await self._stored_checkpoint(projection)
        while True:
            events = [
                e for e in await self._store.read_all(checkpoint, self._batch_size)
                if self._until is None or e.checkpoint <= self._until
            ]
            # Re-delivery guard: never apply what the checkpoint already covers.
            events = [e for e in events if e.checkpoint > checkpoint]
            if not events:
                return applied
            try:
                await self._commit(projection, events, checkpoint)
            except _Moved:
                checkpoint = await self._stored_checkpoint(projection)
                continue
            except StoreUnavailableError:
                raise  # not the event's fault: the caller retries later
            except Exception:
                # Find the poison event: commit what precedes it one event at a time.
                for event in events:
                    try:
                        await self._commit(projection, [event], checkpoint)
                    except _Moved:
                        break  # another runner got here first; start again from its checkpoint
                    except StoreUnavailableError:
                        raise
                    except Exception as e:
                        error = PoisonEventError.at(projection.name, event, e)
                        await self._record_error(projection, error)
                        raise error from e
                    applied += 1
                    checkpoint = event.checkpoint
                checkpoint = await self._stored_checkpoint(projection)
                continue
            applied += len(events)
            checkpoint = events[-1].checkpoint

    async def _stored_checkpoint(self, projection: Projection) -> Checkpoint:
        async with self._store.connection() as conn:
            row = await _checkpoint_row(conn, projection)
        if row[3] is not None:
            # Stopped by an earlier run; a rebuild (`rebalancer replay`) clears it.
            raise PoisonEventError(projection.name, row[3], row[4])
        return Checkpoint(int(row[0]), int(row[1]))

    async def _commit(
        self, projection: Projection, events: list[RecordedEvent], after: Checkpoint
    ) -> None:
        table = sql.Identifier(projection.schema, "projection_checkpoints")
        async with self._store.transaction() as conn:
            # Several runners (one per worker process) may follow the same projection: the
            # row lock serialises them and the check makes the loser drop its batch.
            cur = conn.cursor(row_factory=tuple_row)
            await cur.execute(
                sql.SQL(
                    "select transaction_id::text, position from {} where name = %s for update"
                ).format(table),
                (projection.name,),
            )
            row = await cur.fetchone()
            if row is None or Checkpoint(int(row[0]), int(row[1])) != after:
                raise _Moved()
            await projection.apply_batch(conn, events)
            if self.before_checkpoint is not None:
                self.before_checkpoint(projection.name, events)
            last = events[-1].checkpoint
            await conn.execute(
                sql.SQL(
                    "update {} set transaction_id = %s::text::xid8, position = %s,"
                    " events_applied = events_applied + %s, updated_at = now() where name = %s"
                ).format(table),
                (str(last.transaction_id), last.position, len(events), projection.name),
            )

    async def _record_error(self, projection: Projection, error: PoisonEventError) -> None:
        async with self._store.connection() as conn:
            await conn.execute(
                sql.SQL(
                    "update {} set error = %s, error_position = %s, updated_at = now()"
                    " where name = %s"
                ).format(sql.Identifier(projection.schema, "projection_checkpoints")),
                (str(error), error.position, projection.name),
            )


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
