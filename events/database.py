"""The database boundary: connections to PostgreSQL and every psycopg error translated into ours."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Loader
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from events.errors import (
    EventStoreError,
    StoreQueryError,
    StoreUnavailableError,
    UndefinedTableError,
)

# Session settings for every connection. A transaction left open anywhere holds the snapshot
# barrier (and so every follower) back, hence the idle-in-transaction limit.
SESSION_OPTIONS = (
    "-c lock_timeout=5000 -c idle_in_transaction_session_timeout=60000 "
    "-c application_name=rebalancer"
)
XID8_OID = 5069
CONNECT_TIMEOUT = 10  # seconds, for connections outside the pool (sessions, LISTEN)

# The split that decides whether anyone retries. Unavailable: the server, the network or the
# pool failed us (lost connection, server shutting down, pool exhausted or closed, lock and
# statement timeouts, serialization failures): the same statement may well succeed later.
# Refused: PostgreSQL understood the statement and said no (syntax, undefined table or column,
# bad data, a violated constraint, an aborted transaction): retrying it is a loop, not a fix.
UNAVAILABLE: tuple[type[psycopg.Error], ...] = (
    PoolTimeout, PoolClosed, psycopg.OperationalError, psycopg.InterfaceError,
)
REFUSED: tuple[type[psycopg.Error], ...] = (
    psycopg.ProgrammingError, psycopg.DataError, psycopg.IntegrityError, psycopg.InternalError,
    psycopg.NotSupportedError,
)


def translate_error(error: psycopg.Error) -> EventStoreError:
    """A psycopg error as ours: one of UNAVAILABLE -> StoreUnavailableError, anything else
    PostgreSQL raised (REFUSED, or a code psycopg has no class for) -> StoreQueryError carrying
    the SQLSTATE, UndefinedTableError for a missing table."""
    if isinstance(error, PoolTimeout):
        return StoreUnavailableError("no database connection available")
    if isinstance(error, PoolClosed):
        return StoreUnavailableError("the database connection pool is closed")
    if isinstance(error, UNAVAILABLE):
        return StoreUnavailableError(f"PostgreSQL unavailable: {first_line(error)}")
    if isinstance(error, pg_errors.UndefinedTable):
        return UndefinedTableError(first_line(error), sqlstate=error.sqlstate)
    return StoreQueryError(first_line(error), sqlstate=error.sqlstate)


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Run the block with every psycopg error leaving it translated (see translate_error)."""
    try:
        yield
    except psycopg.Error as e:
        raise translate_error(e) from e


class _Xid8Loader(Loader):
    # psycopg has no loader for xid8 and would hand back a str; compared as strings,
    # "999" > "1000", which silently breaks any checkpoint compared in Python.
    def load(self, data: Any) -> int:
        return int(bytes(data))


async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Adapt what psycopg does not know (xid8); run on every connection we open."""
    conn.adapters.register_loader(XID8_OID, _Xid8Loader)


def open_pool(
    conninfo: str, *, min_size: int, max_size: int, timeout: float
) -> AsyncConnectionPool:
    """An unopened pool of autocommit connections with our session settings."""
    return AsyncConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True, "options": SESSION_OPTIONS},
        configure=configure,
        open=False,
        timeout=timeout,
    )


async def connect(conninfo: str) -> psycopg.AsyncConnection[Any]:
    """One autocommit connection outside any pool; raises StoreUnavailableError or
    StoreQueryError."""
    async with translated():
        # Bounded: a server that does not answer at all (a host gone) must not hang a follower.
        conn = await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, options=SESSION_OPTIONS, connect_timeout=CONNECT_TIMEOUT
        )
    await configure(conn)
    return conn


class Session:
    """A connection of its own, outside the pool, opened on first use and kept across uses.

    For session state that must neither leak to the pool's next borrower nor outlive a crash:
    advisory locks die with the connection. Closing the session ends whatever it holds.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.AsyncConnection[Any] | None = None

    @property
    def opened(self) -> bool:
        """True while the session holds an open connection (and so whatever it locked)."""
        return self._conn is not None and not self._conn.closed

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The session's connection, reopened when lost; a psycopg error in the block closes
        the session and leaves as StoreUnavailableError or StoreQueryError."""
        if self._conn is None or self._conn.closed:
            self._conn = None
            self._conn = await connect(self._conninfo)
        try:
            yield self._conn
        except psycopg.Error as e:
            await self.close()
            raise translate_error(e) from e

    async def close(self) -> None:
        """Close the connection (releasing its session locks); the next use opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


async def check_reachable(conninfo: str, timeout: float = 10.0) -> None:
    """Raise StoreUnavailableError with a one-line reason when PostgreSQL does not answer."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            conninfo, connect_timeout=max(1, round(timeout))
        )
    except psycopg.OperationalError as e:
        raise StoreUnavailableError(
            f"cannot reach PostgreSQL at {where(conninfo)}: {first_line(e)}"
        ) from e
    await conn.close()


def where(conninfo: str) -> str:
    """host:port/dbname of a connection string, never its password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(unparseable connection string)"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def first_line(error: BaseException) -> str:
    """The first line of an error's text (database errors carry multi-line details)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
