"""Upbit's own error bodies through ccxt's real error mapping, sorted at our boundary."""

from __future__ import annotations

import json

import ccxt
import ccxt.async_support as ccxt_async
import pytest

from rebalancer.exchanges.errors import Category, classify

R, F, U, D = (Category.RETRYABLE, Category.FINAL, Category.UNKNOWN_OUTCOME,
              Category.DUPLICATE)


def upbit_error(status: int, body: object) -> ccxt.BaseError:
    """What ccxt raises for Upbit's answer `body` with HTTP `status` (its handle_errors, then
    its HTTP status table, as in ccxt's own fetch)."""
    client = ccxt_async.upbit()
    text = json.dumps(body)
    url = "https://api.upbit.com/v1/orders"
    try:
        client.handle_errors(status, "", url, "POST", {}, text, client.parse_json(text), {}, "")
        client.handle_http_status_code(status, "", url, "POST", text)
    except ccxt.BaseError as e:
        e.http_status = status  # as the base client keeps it
        return e
    raise AssertionError(f"ccxt raised nothing for {status} {body}")


def named(name: str, message: str = "") -> dict[str, object]:
    return {"error": {"name": name, "message": message}}


# (HTTP status, body, category on a read, category on an order/withdraw call)
CASES = [
    (400, named("insufficient_funds_bid", "주문가능한 금액(KRW)이 부족합니다."), F, F),
    (400, named("insufficient_funds_withdraw"), F, F),
    (400, named("under_min_total_bid", "최소주문금액 이상으로 주문해주세요"), F, F),
    (400, named("invalid_price_bid", "주문가격 단위를 잘못 입력하셨습니다."), F, F),
    (400, named("withdraw_address_not_registerd"), F, F),
    (400, named("validation_error", "side is missing, side does not have a valid value"), F, F),
    (404, named("order_not_found", "주문을 찾지 못했습니다."), F, F),
    (401, named("jwt_verification", "Jwt 토큰 검증에 실패했습니다."), F, F),
    (401, named("invalid_access_key"), F, F),
    (401, named("out_of_scope", "권한이 부족합니다."), F, F),
    # A used identifier: the first order landed; on a read it is merely a refusal.
    (400, named("duplicate_identifier", "identifier already used"), F, D),
    # 429 has a plain-text body: ccxt's HTTP status table decides.
    (429, None, R, R),
    # 5xx: nothing happened on a read; on a money call it may have been executed.
    (500, None, R, U),
    (502, {"error": "Bad Gateway"}, R, U),
    # A 5xx with an Upbit error body is an ExchangeError to ccxt (its handle_errors runs before
    # the HTTP status); the status it came with still makes it retryable on a read.
    (503, named("server_error", "잠시 후 다시 시도해주세요"), R, U),
]


@pytest.mark.parametrize(("status", "body", "on_read", "on_money"), CASES)
def test_upbit_errors_are_sorted(status: int, body: object, on_read: Category,
                                 on_money: Category) -> None:
    error = upbit_error(status, body)
    assert classify(error, moves_money=False, http_status=status) == on_read
    assert classify(error, moves_money=True, http_status=status) == on_money
