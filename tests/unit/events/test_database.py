"""translate_error: which psycopg errors are an outage (retry) and which a refused statement."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg_pool import PoolClosed, PoolTimeout

from events.database import first_line, translate_error, translated
from events.errors import StoreQueryError, StoreUnavailableError, UndefinedTableError

UNAVAILABLE = [
    PoolTimeout("couldn't get a connection after 10.00 sec"),
    PoolClosed("the pool 'pool-1' is already closed"),
    psycopg.OperationalError("consuming input failed: server closed the connection"),
    psycopg.InterfaceError("the connection is lost"),
    pg_errors.AdminShutdown("terminating connection due to administrator command"),
    pg_errors.QueryCanceled("canceling statement due to statement timeout"),
    pg_errors.LockNotAvailable("canceling statement due to lock timeout"),
    pg_errors.SerializationFailure("could not serialize access"),
    # What a restart (`pg_ctl restart -m immediate`) was seen to raise, and its neighbours.
    pg_errors.CrashShutdown("terminating connection because of crash of another server process"),
    pg_errors.CannotConnectNow("the database system is starting up"),
    pg_errors.ConnectionFailure("server closed the connection unexpectedly"),
    pg_errors.TooManyConnections("sorry, too many clients already"),
    pg_errors.DeadlockDetected("deadlock detected"),
]
REFUSED = [
    psycopg.ProgrammingError("syntax error at or near \"selec\""),
    psycopg.DataError("invalid input syntax for type uuid"),
    psycopg.IntegrityError("null value in column \"owner\""),
    psycopg.InternalError("current transaction is aborted"),
    psycopg.NotSupportedError("cannot use this feature"),
    psycopg.DatabaseError("an error with a code psycopg has no class for"),
    pg_errors.SyntaxError("syntax error at or near \"selec\""),
    pg_errors.UndefinedColumn("column \"nope\" does not exist"),
    pg_errors.CheckViolation("new row violates check constraint"),
    pg_errors.NotNullViolation("null value in column \"owner\""),
    pg_errors.UniqueViolation("duplicate key value violates unique constraint"),
    pg_errors.NumericValueOutOfRange("numeric field overflow"),
    pg_errors.InFailedSqlTransaction("current transaction is aborted"),
    pg_errors.InsufficientPrivilege("permission denied for table events"),
]


@pytest.mark.parametrize("error", UNAVAILABLE, ids=lambda e: type(e).__name__)
def test_an_outage_is_translated_to_store_unavailable(error: psycopg.Error) -> None:
    translated_error = translate_error(error)
    assert type(translated_error) is StoreUnavailableError


@pytest.mark.parametrize("error", REFUSED, ids=lambda e: type(e).__name__)
def test_a_refused_statement_is_a_query_error_with_its_sqlstate(error: psycopg.Error) -> None:
    translated_error = translate_error(error)
    assert type(translated_error) is StoreQueryError
    assert not isinstance(translated_error, StoreUnavailableError)
    assert translated_error.sqlstate == error.sqlstate
    assert str(translated_error) == first_line(error)


def test_a_missing_table_is_its_own_query_error() -> None:
    missing = pg_errors.UndefinedTable('relation "workflows" does not exist')
    translated_error = translate_error(missing)
    assert isinstance(translated_error, UndefinedTableError)
    assert isinstance(translated_error, StoreQueryError)
    assert translated_error.sqlstate == "42P01"


def test_the_pool_timeout_says_no_connection_was_available() -> None:
    assert str(translate_error(PoolTimeout("after 10 s"))) == "no database connection available"


def test_a_multi_line_error_becomes_its_first_line() -> None:
    error = pg_errors.UndefinedColumn('column "nope" does not exist\nLINE 1: select nope\n')
    assert str(translate_error(error)) == 'column "nope" does not exist'


async def test_translated_keeps_the_psycopg_error_as_the_cause() -> None:
    original = pg_errors.UndefinedColumn('column "nope" does not exist')
    with pytest.raises(StoreQueryError) as caught:
        async with translated():
            raise original
    assert caught.value.__cause__ is original


async def test_translated_lets_other_errors_through_unchanged() -> None:
    with pytest.raises(KeyError):
        async with translated():
            raise KeyError("not a database error")
