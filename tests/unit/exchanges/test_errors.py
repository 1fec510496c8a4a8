"""Every ccxt error class, and the special cases, sorted into what the caller must do."""

from __future__ import annotations

import inspect

import ccxt
import pytest

from rebalancer.errors import (
    DuplicateClientIdError,
    RejectedError,
    RetryableError,
    UnknownOutcomeError,
)
from rebalancer.exchanges.errors import RULES, Category, classify, scrub, translate

R, F, U, D = Category.RETRYABLE, Category.FINAL, Category.UNKNOWN_OUTCOME, Category.DUPLICATE

# (class, on a read, on a call that moves money): written out by hand, not derived from RULES.
EXPECTED: dict[type[Exception], tuple[Category, Category]] = {
    ccxt.BaseError: (R, U),
    ccxt.ExchangeError: (F, F),
    ccxt.ArgumentsRequired: (F, F),
    ccxt.AuthenticationError: (F, F),
    ccxt.AccountSuspended: (F, F),
    ccxt.PermissionDenied: (F, F),
    ccxt.AccountNotEnabled: (F, F),
    ccxt.BadRequest: (F, F),
    ccxt.BadSymbol: (F, F),
    ccxt.ExchangeClosedByUser: (F, F),
    ccxt.InsufficientFunds: (F, F),
    ccxt.InvalidAddress: (F, F),
    ccxt.AddressPending: (R, R),
    ccxt.InvalidOrder: (F, F),
    ccxt.ContractUnavailable: (F, F),
    ccxt.DuplicateOrderId: (F, D),
    ccxt.OrderImmediatelyFillable: (F, F),
    ccxt.OrderNotCached: (F, F),
    ccxt.OrderNotFillable: (F, F),
    ccxt.OrderNotFound: (F, F),
    ccxt.InvalidProxySettings: (F, F),
    ccxt.NotSupported: (F, F),
    ccxt.OperationRejected: (F, F),
    ccxt.ManualInteractionNeeded: (F, F),
    ccxt.MarketClosed: (F, F),
    ccxt.NoChange: (F, F),
    ccxt.MarginModeAlreadySet: (F, F),
    ccxt.RestrictedLocation: (F, F),
    ccxt.OperationFailed: (R, U),
    ccxt.BadResponse: (R, U),
    ccxt.NullResponse: (R, U),
    ccxt.CancelPending: (R, R),
    ccxt.NetworkError: (R, U),
    ccxt.DDoSProtection: (R, R),
    ccxt.ExchangeNotAvailable: (R, U),
    ccxt.OnMaintenance: (R, U),
    ccxt.InvalidNonce: (R, R),
    ccxt.ChecksumError: (R, R),
    ccxt.RateLimitExceeded: (R, R),
    ccxt.RequestTimeout: (R, U),
    ccxt.UnsubscribeError: (R, U),  # websocket only; never raised by a REST call
}


def all_ccxt_errors() -> set[type[Exception]]:
    return {c for _, c in inspect.getmembers(ccxt, inspect.isclass)
            if issubclass(c, ccxt.BaseError)}


def test_the_table_covers_every_error_class_ccxt_has() -> None:
    assert all_ccxt_errors() == set(EXPECTED), "a ccxt upgrade added or removed an error class"


@pytest.mark.parametrize("kind", sorted(EXPECTED, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_each_error_class_is_sorted_for_reads_and_for_money_calls(kind: type[Exception]) -> None:
    on_read, on_money = EXPECTED[kind]
    error = kind("binance something went wrong")
    assert classify(error, moves_money=False) == on_read
    assert classify(error, moves_money=True) == on_money


def test_subclasses_come_before_their_bases_in_the_rules() -> None:
    for i, (earlier, _, _) in enumerate(RULES):
        for later, _, _ in RULES[i + 1:]:
            assert not issubclass(later, earlier) or later is earlier, (
                f"{later.__name__} can never match: {earlier.__name__} comes first")


@pytest.mark.parametrize(("error", "status", "expected"), [
    # Binance -1006/-1007 are BadResponse, not NetworkError: unknown on a money call.
    (ccxt.BadResponse('binance {"code":-1006,"msg":"An unexpected response"}'), 400, U),
    (ccxt.BadResponse('binance {"code":-1007,"msg":"Timeout waiting for response"}'), 408, U),
    # Any HTTP 5xx on a money call is unknown, whatever the body made ccxt raise.
    (ccxt.InvalidOrder('binance {"code":-2010,"msg":"Account has insufficient balance"}'), 503, U),
    (ccxt.InsufficientFunds("upbit insufficient_funds"), 500, U),
    (ccxt.InsufficientFunds("upbit insufficient_funds"), 400, F),
    # A repeated client id: it landed, look it up (Binance says InvalidOrder, not DuplicateOrderId).
    (ccxt.InvalidOrder('binance {"code":-2010,"msg":"Duplicate order sent."}'), 400, D),
    (ccxt.DuplicateOrderId("binance duplicate"), 400, D),
    (ccxt.ExchangeError('upbit {"error":{"name":"duplicate_identifier"}}'), 400, D),
    (ccxt.BadRequest('binance {"code":-1021,"msg":"Timestamp outside recvWindow"}'), 400, F),
    (ccxt.InvalidNonce('binance {"code":-1021}'), 400, R),
    (ccxt.RateLimitExceeded("binance 429"), 429, R),
    (ccxt.DDoSProtection("binance 418"), 418, R),
    (ccxt.RequestTimeout("binance POST /api/v3/order"), None, U),
    (ValueError("a parsing bug after the request went out"), None, U),
])
def test_special_cases_on_a_money_call(error: Exception, status: int | None,
                                       expected: Category) -> None:
    assert classify(error, moves_money=True, http_status=status) == expected


def test_on_a_read_a_duplicate_marker_or_a_5xx_is_nothing_special() -> None:
    assert classify(ccxt.InvalidOrder("Duplicate order sent."), moves_money=False) == F
    assert classify(ccxt.ExchangeNotAvailable("502"), moves_money=False, http_status=502) == R


@pytest.mark.parametrize(("category_error", "ours"), [
    (ccxt.RateLimitExceeded("x"), RetryableError),
    (ccxt.InsufficientFunds("x"), RejectedError),
    (ccxt.RequestTimeout("x"), UnknownOutcomeError),
    (ccxt.InvalidOrder("Duplicate order sent."), DuplicateClientIdError),
])
def test_translate_gives_our_error_for_each_category(category_error: Exception,
                                                     ours: type[Exception]) -> None:
    assert type(translate(category_error, what="create order", moves_money=True)) is ours


def test_messages_lose_signatures_tokens_and_secrets() -> None:
    error = ccxt.RequestTimeout(
        "binance GET https://api.binance.com/sapi/v1/capital/withdraw/history?withdrawOrderId=w1"
        "&timestamp=1&signature=9f86d081884c7d659a2feaa0c55ad015 headers {'X-MBX-APIKEY': "
        "'AKIAKEY123'} Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig and s3cr3t")
    text = str(translate(error, what="withdrawal", moves_money=False,
                         secrets=("AKIAKEY123", "s3cr3t")))
    for leaked in ("9f86d081884c7d659a2feaa0c55ad015", "AKIAKEY123", "eyJhbGciOiJIUzI1NiJ9",
                   "s3cr3t"):
        assert leaked not in text
    assert "withdrawOrderId=w1" in text  # what is not secret still helps the operator
    assert scrub("signature=abc&x=1") == "signature=***&x=1"
