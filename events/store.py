"""PostgreSQL event store: atomic appends, stream reads and a gap-free global-order read."""

# Over ~400 lines for a reason: one class whose append and read paths share the invariants of
# the global order and the hash chain (docs/contracts.md §1), with the records they return; the
# connection handling and error translation live apart, in events/database.py.

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from events.catalogue import Catalogue, Event
from events.catalogue import catalogue as default_catalogue
from events.database import (
    SESSION_OPTIONS,
    UNAVAILABLE,
    Session,
    check_reachable,
    connect,
    first_line,
    open_pool,
    translated,
    where,
)
from events.errors import (
    ConcurrencyError,
    InvalidEventError,
    StoreQueryError,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "rebalancer_events"
NOTIFY_MIN_INTERVAL = 0.01  # seconds between two wake-ups sent by one store
STREAM_ID_PATTERN = re.compile(
    r"^workflow-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
# Keys that must never reach an event: credentials end up in logs, NATS and audits forever.
SECRET_KEYS = (
    "api_key", "apikey", "secret", "api_secret", "secret_key", "password", "passphrase",
    "signature", "private_key", "token", "access_token",
)
_SECRET_KEY = re.compile(
    r'"(' + "|".join(SECRET_KEYS) + r')"\s*:', re.IGNORECASE
)
# SQLSTATEs of an append that lost the race: the unique (stream_id, version) key, or the
# version check inside append_events().
_VERSION_CLASH = frozenset({pg_errors.UniqueViolation.sqlstate, "RB409"})

_COLUMNS = (
    "position, transaction_id, stream_id, version, type, schema_version, data, metadata, "
    "recorded_at, hash"
)


class Checkpoint(NamedTuple):
    """A place in the global order: the last (transaction_id, position) a reader has seen."""

    transaction_id: int
    position: int


ORIGIN = Checkpoint(0, 0)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append given as a type name and plain data (validated by the catalogue)."""

    type: str
    data: Mapping[str, Any]
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append landed: the stream's new version and the events' global positions."""

    stream_id: str
    version: int
    positions: tuple[int, ...]
    transaction_id: int
    # The rows as stored, so the appender can apply them without reading them back.
    records: tuple[RecordedEvent, ...] = ()

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.transaction_id, self.positions[-1])


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """One stored row."""

    position: int
    transaction_id: int
    stream_id: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime
    hash: bytes

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.transaction_id, self.position)

    def decode(self, catalogue: Catalogue = default_catalogue) -> Event:
        """The newest-shape event model (old schema versions are upcast)."""
        return catalogue.decode(self.type, self.schema_version, self.data)


@dataclass(frozen=True, slots=True)
class StreamProblem:
    """Something wrong found when re-checking a stored stream."""

    stream_id: str
    version: int
    position: int | None
    message: str


class EventStore:
    """Append-only event store on a psycopg async pool.

    Raises ConcurrencyError on a version clash, InvalidEventError for refused input,
    StoreUnavailableError when PostgreSQL cannot be reached and StoreQueryError when it
    refuses a statement. Other modules run their SQL through `connection()` and
    `transaction()`, which translate errors the same way; the pool stays private.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        catalogue: Catalogue = default_catalogue,
        stream_id_pattern: re.Pattern[str] = STREAM_ID_PATTERN,
    ) -> None:
        self._pool = pool
        self._conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
        self._catalogue = catalogue
        self._stream_id_pattern = stream_id_pattern
        self._notify_wanted = asyncio.Event()
        self._notifier: asyncio.Task[None] | None = None
        self._closing = False
        self._notify_conn: psycopg.AsyncConnection[Any] | None = None
        # Since when pooled work has failed for PostgreSQL being away: one log line when an
        # outage begins and one when the next block succeeds, whoever runs them.
        self._down_since: float | None = None

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        **kwargs: Any,
    ) -> EventStore:
        """Connect (checking the server answers first, for a clear error) and open a pool."""
        await check_reachable(conninfo, connect_timeout)
        pool = open_pool(
            conninfo, min_size=min_size, max_size=max_size, timeout=connect_timeout
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout as e:
            await pool.close()
            raise StoreUnavailableError(f"cannot reach PostgreSQL at {where(conninfo)}") from e
        return cls(pool, **kwargs)

    async def close(self) -> None:
        """Send any wake-up still owed to followers, then close the pool."""
        self._closing = True
        if self._notifier is not None:
            self._notify_wanted.set()
            await self._notifier
            self._notifier = None
        if self._notify_conn is not None:
            await self._notify_conn.close()
        await self._pool.close()

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def catalogue(self) -> Catalogue:
        return self._catalogue

    # -- the boundary ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled autocommit connection for the block; any psycopg error in it leaves as
        StoreUnavailableError (unreachable, pool exhausted or closed, timeouts) or
        StoreQueryError (the statement or its data refused; UndefinedTableError for a missing
        table), the original as its cause."""
        try:
            async with translated(), self._pool.connection() as conn:
                try:
                    yield conn
                except psycopg.Error as e:
                    # Whatever PostgreSQL said last, a connection that broke under the block is
                    # an outage (a backend killed mid-statement, a server restarting), never a
                    # SQL bug.
                    if (conn.broken or conn.closed) and not isinstance(e, UNAVAILABLE):
                        raise StoreUnavailableError(
                            f"PostgreSQL unavailable: the connection broke ({first_line(e)})"
                        ) from e
                    raise
        except StoreUnavailableError as e:
            if self._down_since is None and not self._closing:
                self._down_since = time.monotonic()
                log.warning("PostgreSQL at %s unreachable (%s); retrying", where(self._conninfo),
                            e)
            raise
        if self._down_since is not None:
            away, self._down_since = time.monotonic() - self._down_since, None
            log.warning("PostgreSQL at %s back after %.1f s", where(self._conninfo), away)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Like `connection()`, inside one transaction that commits when the block ends and
        rolls back when it raises; raises StoreUnavailableError or StoreQueryError likewise."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    def session(self) -> Session:
        """A connection of its own outside the pool, kept across uses, for session state such
        as advisory locks; its `connection()` raises as this store's does."""
        return Session(self._conninfo)

    # -- writing ---------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event | NewEvent],
        expected_version: int,
        metadata: Mapping[str, Any] | None = None,
        event_metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> AppendResult:
        """Append `events` atomically after `expected_version` (0 for a new stream).

        `metadata` is merged under each event's own metadata (`event_metadata[i]` for the i-th
        event, or a NewEvent's). Raises ConcurrencyError when the
        stream is not at `expected_version` and InvalidEventError for refused input; either
        way nothing is appended.
        """
        if not self._stream_id_pattern.match(stream_id):
            raise InvalidEventError(
                f"stream id {stream_id!r} is not of the form {self._stream_id_pattern.pattern}"
            )
        if not events:
            raise InvalidEventError("nothing to append")
        if expected_version < 0:
            raise InvalidEventError("expected_version must be >= 0")
        shared = json.dumps(dict(metadata or {}), separators=(",", ":"), default=str)
        parts: list[str] = []
        stored: list[tuple[Event, str, str]] = []
        if event_metadata is not None and len(event_metadata) != len(events):
            raise InvalidEventError("event_metadata must have one entry per event")
        for i, event in enumerate(events):
            model, own = self._validated(event)
            extra = event_metadata[i] if event_metadata is not None else None
            if extra:
                own = {**own, **extra}
            meta = (
                json.dumps({**(metadata or {}), **own}, separators=(",", ":"), default=str)
                if own else shared
            )
            data = model.model_dump_json()
            _refuse_secrets(meta, "metadata")
            _refuse_secrets(data, model.type_name)
            # Pieces are already JSON; joining them avoids re-encoding every payload.
            parts.append(
                f'{{"type":{json.dumps(model.type_name)},"schema_version":'
                f'{model.schema_version},"data":{data},"metadata":{meta}}}'
            )
            stored.append((model, data, meta))
        try:
            async with self.connection() as conn:
                cur = await conn.execute(
                    "select out_position, out_transaction_id, out_version, out_recorded_at,"
                    " out_hash from append_events(%s, %s, %s::jsonb)",
                    (stream_id, expected_version, "[" + ",".join(parts) + "]"),
                )
                rows = await cur.fetchall()
        except StoreQueryError as e:
            if e.sqlstate in _VERSION_CLASH:
                raise ConcurrencyError(
                    f"stream {stream_id} is no longer at version {expected_version}"
                ) from e.__cause__
            raise
        self._wake_followers()
        rows.sort(key=lambda r: r[2])
        records = tuple(
            # The data as the database holds it: the JSON sent, parsed back.
            RecordedEvent(position, transaction_id, stream_id, version, model.type_name,
                          model.schema_version, json.loads(data), json.loads(meta),
                          recorded_at, bytes(digest))
            for (position, transaction_id, version, recorded_at, digest), (model, data, meta)
            in zip(rows, stored, strict=True)
        )
        return AppendResult(
            stream_id=stream_id,
            version=rows[-1][2],
            positions=tuple(row[0] for row in rows),
            transaction_id=rows[0][1],
            records=records,
        )

    def _validated(self, event: Event | NewEvent) -> tuple[Event, dict[str, Any]]:
        if isinstance(event, NewEvent):
            return self._catalogue.validate(event.type, event.data), dict(event.metadata)
        if not isinstance(event, Event):
            raise InvalidEventError(f"cannot append a {type(event).__name__}")
        registered = self._catalogue.model(event.type_name)
        if type(event) is not registered:
            raise InvalidEventError(f"{event.type_name} is registered as another class")
        return event, {}

    # NOTIFY takes a database-wide lock at commit and holds it through the WAL flush, so
    # notifying inside the append transaction would serialise every concurrent appender.
    # Instead one background task per store sends a NOTIFY after appends have committed,
    # coalescing bursts; followers also poll on a timer, so a lost wake-up only delays them.
    def _wake_followers(self) -> None:
        self._notify_wanted.set()
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._notify_loop())

    async def _notify_loop(self) -> None:
        # Stopped by `_closing`, not by cancellation: a cancel landing inside the pool's
        # getconn was seen to be absorbed, leaving close() waiting forever.
        while True:
            await self._notify_wanted.wait()
            self._notify_wanted.clear()
            try:
                await self._notify_once()
            except Exception:  # PostgreSQL away (any way): a task must not die of it
                conn, self._notify_conn = self._notify_conn, None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                if not self._closing:
                    await asyncio.sleep(0.5)  # the followers' poll covers the lost wake-up
            if self._closing:
                return
            # Appends during this pause share the next NOTIFY: a busy writer sends at most one
            # per interval instead of doubling its round trips.
            await asyncio.sleep(NOTIFY_MIN_INTERVAL)

    async def _notify_once(self) -> None:
        # Its own connection rather than the pool's: borrowing a pooled one made the next
        # appends alternate between two server backends, which cost them about a quarter.
        if self._notify_conn is None or self._notify_conn.closed:
            self._notify_conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, options=SESSION_OPTIONS, connect_timeout=5
            )
        await self._notify_conn.execute("select pg_notify(%s, '')", (NOTIFY_CHANNEL,))

    # -- reading ---------------------------------------------------------------------------

    async def stream_version(self, stream_id: str) -> int:
        """The stream's last version, 0 when it does not exist."""
        row = await self._fetchone(
            "select coalesce(max(version), 0) from events where stream_id = %s", (stream_id,)
        )
        return int(row[0]) if row else 0

    async def read_stream(
        self, stream_id: str, after_version: int = 0, up_to_version: int | None = None
    ) -> list[RecordedEvent]:
        """Events of one stream in version order, after `after_version` up to `up_to_version`."""
        query = f"select {_COLUMNS} from events where stream_id = %s and version > %s"
        params: list[Any] = [stream_id, after_version]
        if up_to_version is not None:
            query += " and version <= %s"
            params.append(up_to_version)
        rows = await self.fetch_rows(query + " order by version", params)
        return [RecordedEvent(*row) for row in rows]

    async def read_all(
        self, after: Checkpoint = ORIGIN, limit: int = 1000,
        *, on: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[RecordedEvent]:
        """Up to `limit` events of the global order after `after`, never skipping one; `on` a
        connection of the caller's (a Session's) instead of a pooled one.

        Positions come from a sequence and are taken before commit, so a transaction that
        commits late can insert a position below one a reader has already passed. The order
        here is (transaction_id, position), read only below the snapshot's xmin: every
        transaction with a lower id has finished, so nothing can appear behind the reader
        later. A long-open transaction anywhere therefore holds readers back.
        """
        query = (
            f"select {_COLUMNS} from events"
            " where (transaction_id, position) > (%s::text::xid8, %s)"
            " and transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
            " order by transaction_id, position limit %s"
        )
        params = (str(after.transaction_id), after.position, limit)
        if on is None:
            rows = await self.fetch_rows(query, params)
        else:
            cur = on.cursor(row_factory=tuple_row)
            await cur.execute(query, params)
            rows = await cur.fetchall()
        return [RecordedEvent(*row) for row in rows]

    async def iter_all(
        self, after: Checkpoint = ORIGIN, batch: int = 1000
    ) -> AsyncIterator[RecordedEvent]:
        """Every event of the global order after `after` that is readable now."""
        while True:
            events = await self.read_all(after, batch)
            for event in events:
                yield event
            if len(events) < batch:
                return
            after = events[-1].checkpoint

    async def head(self) -> Checkpoint:
        """The last readable place in the global order (ORIGIN for an empty store)."""
        row = await self._fetchone(
            "select transaction_id, position from events"
            " where transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
            " order by transaction_id desc, position desc limit 1",
            (),
        )
        return Checkpoint(row[0], row[1]) if row else ORIGIN

    async def verify_stream(self, stream_id: str) -> list[StreamProblem]:
        """Re-check a stored stream: versions contiguous from 1 and the hash chain intact.

        A hash_version other than 1 or 2 is checked as v2 and so fails: an intruder cannot
        switch a row to a form it does not hash."""
        # Each row is checked with the canonical form its hash_version names (v1 before
        # migration 012, v2 since: position and recorded_at covered too).
        rows = await self.fetch_rows(
            "select position, version, hash, hash_version, case hash_version when 1 then"
            " event_canonical(stream_id, version, type, schema_version, data, metadata)"
            " else event_canonical_v2(position, stream_id, version, type, schema_version,"
            " data, metadata, recorded_at) end from events where stream_id = %s"
            " order by version",
            (stream_id,),
        )
        problems: list[StreamProblem] = []
        previous = b""
        expected_version = 1
        newest_form = 1
        for position, version, stored_hash, form, canonical in rows:
            if form < newest_form:
                # Appends only ever write the newest form: a v1 row after a v2 one was
                # downgraded, to hide an edit of what only v2 covers.
                problems.append(
                    StreamProblem(
                        stream_id, version, position,
                        f"hash version {form} follows version {newest_form}",
                    )
                )
            newest_form = max(newest_form, form)
            if version != expected_version:
                problems.append(
                    StreamProblem(
                        stream_id, version, position,
                        f"version {version} follows {expected_version - 1}: "
                        f"{version - expected_version} event(s) missing",
                    )
                )
            digest = hashlib.sha256(previous + bytes(canonical)).digest()
            if digest != bytes(stored_hash):
                problems.append(
                    StreamProblem(
                        stream_id, version, position,
                        "hash does not match the event's content and its predecessor's hash",
                    )
                )
            previous = bytes(stored_hash)
            expected_version = version + 1
        return problems

    async def events_of_command(self, command_id: str) -> list[RecordedEvent]:
        """Events appended with `metadata.command_id` = `command_id`, in global order."""
        rows = await self.fetch_rows(
            f"select {_COLUMNS} from events where metadata ->> 'command_id' = %s"
            " and metadata ? 'command_id' order by transaction_id, position",
            (command_id,),
        )
        return [RecordedEvent(*row) for row in rows]

    async def remember_outcome(self, command_id: str, kind: str, reply: Mapping[str, Any]) -> None:
        """Keep the reply to a refused command (it appended nothing) for a repeat of its id."""
        async with self.connection() as conn:
            await conn.execute(
                "insert into command_outcomes (command_id, kind, reply) values (%s, %s, %s)"
                " on conflict (command_id) do nothing",
                (command_id, kind, json.dumps(dict(reply), default=str)),
            )

    async def bind_command(
        self, command_id: str, kind: str, body_hash: str, workflow_id: str | None
    ) -> tuple[bool, str, str, str | None, Any]:
        """Bind `command_id` to a command unless it is bound already. Returns (bound now, and
        the binding's kind, body hash, workflow id and time): the first command's, either way."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "insert into command_ids (command_id, kind, body_hash, workflow_id)"
                " values (%s, %s, %s, %s) on conflict (command_id) do nothing"
                " returning recorded_at",
                (command_id, kind, body_hash, workflow_id),
            )
            mine = await cur.fetchone()
            if mine is not None:
                return True, kind, body_hash, workflow_id, mine[0]
            cur = await conn.execute(
                "select kind, body_hash, workflow_id, recorded_at from command_ids"
                " where command_id = %s",
                (command_id,),
            )
            row = await cur.fetchone()
        assert row is not None  # bound by another, and rows are never deleted
        return False, row[0], row[1], row[2], row[3]

    async def recall_outcome(self, command_id: str) -> dict[str, Any] | None:
        """The kept reply to a refused command, None when there is none."""
        row = await self._fetchone(
            "select reply from command_outcomes where command_id = %s", (command_id,)
        )
        return None if row is None else dict(row[0])

    async def claimed_exchange_ids(
        self, kind: str, since: datetime, other_than: str
    ) -> frozenset[str]:
        """Exchange ids that tasks of `kind` recorded (request_result.id) since `since`, in
        streams other than `other_than`: operations that are somebody else's."""
        rows = await self.fetch_rows(
            "select distinct data -> 'request_result' ->> 'id' from events"
            " where type = 'TaskStateChanged' and recorded_at >= %s and stream_id <> %s"
            " and data ->> 'kind' = %s and data -> 'request_result' ->> 'id' is not null",
            (since, other_than, kind),
        )
        return frozenset(str(row[0]) for row in rows)

    async def claims(
        self, kind: str, since: datetime, other_than: str
    ) -> list[dict[str, Any]]:
        """The operations other workflows' tasks of `kind` recorded as theirs since `since`:
        {id, workflow_id, task, currency, amount, txid, at}, one per (stream, task, id)."""
        rows = await self.fetch_rows(
            "select stream_id, data ->> 'task_name', data -> 'request_params',"
            " data -> 'request_result' ->> 'id', data -> 'refresh_result' -> 'result',"
            " recorded_at from events where type = 'TaskStateChanged' and recorded_at >= %s"
            " and stream_id <> %s and data ->> 'kind' = %s order by position",
            (since, other_than, kind),
        )
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for stream_id, task, params, exchange_id, result, at in rows:
            # A deposit records its exchange id only in its result (it sends no request).
            exchange_id = exchange_id if exchange_id is not None else (result or {}).get("id")
            entry = seen.setdefault((stream_id, task), {
                "workflow_id": stream_id.removeprefix("workflow-"), "task": task, "id": None,
                "currency": None, "amount": None, "txid": None, "at": None})
            if params:
                entry.update(currency=params.get("currency"), amount=params.get("amount"))
            if exchange_id is not None and entry["id"] != exchange_id:
                entry.update(id=exchange_id, at=at.isoformat())
            if result and result.get("txid"):
                entry["txid"] = result["txid"]
        return [entry for entry in seen.values() if entry["id"] is not None]

    def listen(self) -> Notifications:
        """A dedicated connection LISTENing for appends; use as an async context manager."""
        return Notifications(self._conninfo)

    async def fetch_dicts(self, query: Any, params: Sequence[Any]) -> list[dict[str, Any]]:
        """Rows of a read-only query as dicts, database errors translated; for read models."""
        return await self._fetch(query, params, dict_row)

    async def fetch_rows(self, query: Any, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Rows of a read-only query as tuples, database errors translated."""
        return await self._fetch(query, params, tuple_row)

    async def _fetch(self, query: Any, params: Sequence[Any], factory: Any) -> list[Any]:
        async with self.connection() as conn:
            cur = conn.cursor(row_factory=factory)
            await cur.execute(query, params)
            return list(await cur.fetchall())

    async def _fetchone(self, query: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        rows = await self.fetch_rows(query, params)
        return rows[0] if rows else None


class Notifications:
    """Wakes a follower when events were appended (NOTIFY), with a timeout for polling."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> Notifications:
        self._conn = await connect(self._conninfo)
        try:
            async with translated():
                await self._conn.execute(f"listen {NOTIFY_CHANNEL}")
        except BaseException:
            await self._conn.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def wait(self, timeout: float, coalesce: float = 0.0) -> bool:
        """True when at least one notification arrived within `timeout` seconds; then, for
        `coalesce` seconds more, takes in those that follow, so that a burst of appends wakes
        the follower once. Raises StoreUnavailableError when the connection is lost."""
        assert self._conn is not None, "use Notifications as an async context manager"
        woke = False
        async with translated():
            async for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                woke = True
            if woke and coalesce > 0:
                async for _ in self._conn.notifies(timeout=coalesce):
                    pass
        return woke


def _refuse_secrets(encoded: str, where: str) -> None:
    # Checked on the encoded JSON (every key appears as "key":) so nested payloads cost one
    # regex scan rather than a walk in Python.
    found = _SECRET_KEY.search(encoded)
    if found:
        raise InvalidEventError(f"{where}: key {found.group(1)!r} looks like a secret; not stored")
