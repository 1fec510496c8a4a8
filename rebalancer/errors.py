"""The domain's error hierarchy; the store's errors are re-used where they mean the same."""

from events.errors import ConcurrencyError, StoreUnavailableError


class RebalancerError(Exception):
    """Base of every domain error."""


class SpecError(RebalancerError):
    """A spec or a reference in it is bad; refused before any workflow starts."""


class IllegalTransitionError(RebalancerError):
    """A state machine table does not allow this (state, trigger) move."""


class RetryableError(RebalancerError):
    """Back off and retry: network, rate limit, exchange down, database down."""


class RejectedError(RebalancerError):
    """Final refusal: insufficient funds, invalid address, permission, bad request."""


class NoSuchWalletError(RejectedError):
    """The account has no such wallet (Upbit has no futures wallet)."""


class UnknownOutcomeError(RebalancerError):
    """Sent, but no answer: reconcile by client id before anything else."""


class AmbiguousOutcomeError(UnknownOutcomeError):
    """Several operations in the history could be ours: `candidates` lists each one the port
    saw ({id, txid, amount, at}), so an operator can be told which to check."""

    def __init__(self, message: str, candidates: list[dict[str, str | None]]) -> None:
        super().__init__(message)
        self.candidates = candidates


class DuplicateClientIdError(UnknownOutcomeError):
    """The client id was used before: the request may already have landed, so reconcile by
    client id instead of sending it again."""


class InfraError(RebalancerError):
    """An embedded server could not be started, stopped or reached."""


class ComponentFailedError(RebalancerError):
    """One component of `serve` ended unexpectedly; the others were stopped with it."""


__all__ = [
    "ComponentFailedError",
    "ConcurrencyError",
    "DuplicateClientIdError",
    "IllegalTransitionError",
    "InfraError",
    "NoSuchWalletError",
    "RebalancerError",
    "RejectedError",
    "RetryableError",
    "SpecError",
    "StoreUnavailableError",
    "UnknownOutcomeError",
]
