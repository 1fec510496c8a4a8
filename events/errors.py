"""Errors raised by the event store and the catalogue."""


class EventStoreError(Exception):
    """Base of every error the events package raises."""


class ConcurrencyError(EventStoreError):
    """The stream moved past the expected version: reload it and decide again."""


class InvalidEventError(EventStoreError):
    """An event was refused before anything was stored (bad type, data or stream id)."""


class UnknownEventTypeError(InvalidEventError):
    """No event class is registered under that type name and schema version."""


class DuplicateRegistrationError(EventStoreError):
    """An event type name or an upcaster was registered twice."""


class StoreUnavailableError(EventStoreError):
    """PostgreSQL cannot be reached or refused the connection; retry later."""


class StoreQueryError(EventStoreError):
    """PostgreSQL refused a statement or its data (a SQL bug, a missing table, a violated
    constraint): retrying the same statement cannot help, so it is never taken for an outage.

    `sqlstate` is PostgreSQL's five-character error code, for callers that must tell one case.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class UndefinedTableError(StoreQueryError):
    """A statement named a table that does not exist (e.g. read models never set up here)."""
