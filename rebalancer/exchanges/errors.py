"""ccxt's errors sorted at the boundary into what the caller must do: retry, stop, or reconcile."""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum

import ccxt

from rebalancer.errors import (
    DuplicateClientIdError,
    RebalancerError,
    RejectedError,
    RetryableError,
    UnknownOutcomeError,
)


class Category(StrEnum):
    RETRYABLE = "retryable"  # nothing happened: back off, ask again
    FINAL = "final"  # the exchange refused: it will refuse again
    UNKNOWN_OUTCOME = "unknown_outcome"  # sent, no reliable answer: look it up by client id
    DUPLICATE = "duplicate"  # the client id was used: the first request landed, look it up


R, F, U, D = Category.RETRYABLE, Category.FINAL, Category.UNKNOWN_OUTCOME, Category.DUPLICATE

# (error class, category on a read, category on a call that moves money). Subclasses come
# before their bases: the first row the error is an instance of decides.
RULES: tuple[tuple[type[Exception], Category, Category], ...] = (
    # -- OperationFailed: the request may or may not have been executed
    (ccxt.RateLimitExceeded, R, R),  # refused before execution (HTTP 429 / -1003)
    (ccxt.DDoSProtection, R, R),  # the same, from a front door (HTTP 418 / Cloudflare)
    (ccxt.InvalidNonce, R, R),  # timestamp outside recvWindow: refused unexecuted
    (ccxt.OnMaintenance, R, U),  # a 5xx may follow a request that was executed
    (ccxt.ExchangeNotAvailable, R, U),  # HTTP 5xx or connection reset: Binance says unknown
    (ccxt.RequestTimeout, R, U),  # sent, no answer in time (-1007 on futures)
    (ccxt.NetworkError, R, U),
    (ccxt.NullResponse, R, U),
    (ccxt.BadResponse, R, U),  # Binance -1006/-1007: "execution status unknown"
    (ccxt.CancelPending, R, R),
    (ccxt.OperationFailed, R, U),  # -1006 on futures endpoints
    # -- ExchangeError: the exchange answered and refused
    (ccxt.DuplicateOrderId, F, D),
    (ccxt.OrderNotFound, F, F),
    (ccxt.InsufficientFunds, F, F),
    (ccxt.InvalidOrder, F, F),
    (ccxt.AddressPending, R, R),  # the address is being generated: ask again later
    (ccxt.InvalidAddress, F, F),
    (ccxt.AccountSuspended, F, F),
    (ccxt.PermissionDenied, F, F),
    (ccxt.AuthenticationError, F, F),
    (ccxt.BadSymbol, F, F),
    (ccxt.BadRequest, F, F),
    (ccxt.ArgumentsRequired, F, F),
    (ccxt.NotSupported, F, F),
    (ccxt.OperationRejected, F, F),
    (ccxt.ExchangeError, F, F),  # an error code ccxt does not know: the exchange refused
    (ccxt.BaseError, R, U),
)

# Refusals that mean "this client id was already used": the first request landed. Binance
# answers a repeated newClientOrderId with InvalidOrder "Duplicate order sent." (-2010), not
# DuplicateOrderId; Upbit refuses a used `identifier` with an error whose name says so.
DUPLICATE_MARKERS = re.compile(r"duplicate order sent|duplicate.{0,20}identifier|identifier.{0,40}"
                               r"(already|duplicat)|clientTranId.{0,30}(exist|duplicat)|"
                               r"withdrawOrderId.{0,30}(exist|duplicat)", re.IGNORECASE)


def classify(
    error: BaseException, *, moves_money: bool, http_status: int | None = None
) -> Category:
    """What the caller must do after `error` from a read (`moves_money=False`) or from an
    order, withdrawal or transfer call.

    A money call answered with HTTP 5xx is an unknown outcome whatever the body says (Binance:
    "the execution status is unknown"), a read so answered is retryable; a refusal that names a
    used client id is a duplicate.
    """
    if http_status is not None and http_status >= 500:
        # The exchange broke, whatever its body said: a read is asked again, a money call
        # may have been executed.
        return U if moves_money else R
    if moves_money and isinstance(error, ccxt.ExchangeError) and DUPLICATE_MARKERS.search(
            str(error)):
        return D
    for kind, on_read, on_money in RULES:
        if isinstance(error, kind):
            return on_money if moves_money else on_read
    # Not a ccxt error (a bug in parsing, a closed session): the request may have gone out.
    return U if moves_money else R


# Signatures and tokens that may appear in ccxt's messages (they quote the URL and the body).
_SIGNED = re.compile(r"(signature=|Bearer\s+|X-MBX-APIKEY['\"]?:\s*['\"]?)[^&\s'\"]+",
                     re.IGNORECASE)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without any signature, bearer token or the given secret strings."""
    text = _SIGNED.sub(lambda m: m.group(1) + "***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def translate(error: BaseException, *, what: str, moves_money: bool,
              secrets: Iterable[str] = ()) -> RebalancerError:
    """Our error for `error` raised by the call described by `what` (its message scrubbed)."""
    status = getattr(error, "http_status", None)
    category = classify(error, moves_money=moves_money, http_status=status)
    detail = scrub(f"{what}: {type(error).__name__}: {_first_line(error)}", secrets)
    match category:
        case Category.DUPLICATE:
            return DuplicateClientIdError(detail)
        case Category.UNKNOWN_OUTCOME:
            return UnknownOutcomeError(detail)
        case Category.FINAL:
            return RejectedError(detail)
        case _:
            return RetryableError(detail)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:500] if lines else ""


__all__ = ["RULES", "Category", "classify", "scrub", "translate"]
