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
