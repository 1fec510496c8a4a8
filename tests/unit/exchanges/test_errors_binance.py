"""Binance's special cases of the error sorting: ccxt's own mapping of its bodies, then ours."""

from __future__ import annotations

import json

import ccxt
import pytest

from rebalancer.exchanges.errors import Category, classify

R, F, U, D = (Category.RETRYABLE, Category.FINAL, Category.UNKNOWN_OUTCOME,
              Category.DUPLICATE)
SPOT = "https://api.binance.com/api/v3/order"
SAPI = "https://api.binance.com/sapi/v1/capital/withdraw/apply"


def raised(status: int, body: dict[str, object], url: str = SPOT) -> BaseException:
    """What ccxt's binance raises for this HTTP answer (its real handle_errors)."""
    client = ccxt.binance()
    text = json.dumps(body)
    try:
        client.handle_errors(status, "", url, "POST", {}, text, body, {}, "")
        client.handle_http_status_code(status, "", url, "POST", text)
    except ccxt.BaseError as e:
        e.http_status = status  # type: ignore[attr-defined]  # as ccxt_base keeps it
        return e
    raise AssertionError("ccxt raised nothing")


@pytest.mark.parametrize("status,body,url,on_read,on_money", [
    # -1006 / -1007: "execution status unknown": sent, maybe executed.
    (400, {"code": -1006, "msg": "Unexpected response. Execution status unknown."}, SPOT, R, U),
    (400, {"code": -1007, "msg": "Timeout waiting for response from backend server."}, SPOT,
     R, U),
    # A repeated newClientOrderId of an open order: InvalidOrder to ccxt, a duplicate to us.
    (400, {"code": -2010, "msg": "Duplicate order sent."}, SPOT, F, D),
    (400, {"code": -2010, "msg": "Account has insufficient balance for requested action."},
     SPOT, F, F),
    (400, {"code": -2013, "msg": "Order does not exist."}, SPOT, F, F),
    (400, {"code": -1013, "msg": "Filter failure: NOTIONAL"}, SPOT, F, F),
    (400, {"code": -1013, "msg": "Filter failure: LOT_SIZE"}, SPOT, F, F),
    (429, {"code": -1003, "msg": "Too many requests."}, SPOT, R, R),
    (418, {"code": -1003, "msg": "Way too many requests; IP banned."}, SPOT, R, R),
    (400, {"code": -1021, "msg": "Timestamp for this request is outside of the recvWindow."},
     SPOT, R, R),
    (401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}, SPOT, F, F),
    (400, {"code": -1022, "msg": "Signature for this request is not valid."}, SPOT, F, F),
    (400, {"code": -4026, "msg": "User has insufficient balance"}, SAPI, F, F),
    # Any HTTP 5xx on a money call: Binance says the outcome is unknown, whatever the body; a
    # read so answered is asked again.
    (502, {"error": "Bad Gateway"}, SPOT, R, U),
    (503, {"code": -1008, "msg": "Service Unavailable."}, SAPI, R, U),
    (500, {"code": -2010, "msg": "Account has insufficient balance for requested action."},
     SPOT, R, U),
])
def test_binance_answers_sort_into_the_right_category(
    status: int, body: dict[str, object], url: str, on_read: Category, on_money: Category,
) -> None:
    error = raised(status, body, url)
    assert classify(error, moves_money=False, http_status=status) == on_read
    assert classify(error, moves_money=True, http_status=status) == on_money
