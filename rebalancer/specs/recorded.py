"""What each task kind records in its TaskStateChanged events: the paths `{$.task.path}` may use.

This is the contract between specs and the task processors: a processor must record every path
listed for its kind (a value may be null while unknown, e.g. a txid before broadcast), and a spec
may reference nothing else. Money is recorded as decimal strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from rebalancer.machines import TaskKind
from rebalancer.specs.models import CONFIG_MODELS


def _under(prefix: str, *fields: str) -> frozenset[str]:
    return frozenset(f"{prefix}.{field}" for field in fields)


_TRADE: Final = (
    _under("request_result", "order_id")
    | _under(
        "refresh_result.result",
        "amount", "cost", "fee", "fee_currency", "average_price", "filled", "status",
    )
    | _under(
        "refresh_result.extra",
        "cumulative_amount",  # base filled over all slices
        "cumulative_amount_excluding_fee",  # ... less any fee charged in base
        "cumulative_cost",  # quote paid (buy) or got (sell) at the fill prices, before fees
        # What left the account in quote for a buy: cost plus any fee taken in quote (null
        # for a sell).
        "cumulative_quote_spent",
        # What a sell left in the account in quote: cost less any fee taken in quote (null
        # for a buy). The built-in spec's last transfer moves this.
        "cumulative_quote_received",
        # Deprecated alias kept for existing specs: cumulative_quote_spent for a buy,
        # cumulative_quote_received for a sell. Misnamed: a buy's includes the fee.
        "cumulative_cost_excluding_fee",
        # The fee total when every fee was in one currency (result.fee_currency); null when
        # fees came in several (see fees).
        "cumulative_fee",
        # {currency: total}: every fee by the currency charged, a third one (BNB) included.
        "fees",
        "status",
        # Once the last order ended, in the plan's unit (amount_unit: base, or quote for a buy
        # by quote amount; amount_currency): planned, filled, unfilled and the filled fraction.
        "amount_unit", "amount_currency", "planned_amount", "filled_amount", "unfilled_amount",
        "filled_fraction",
        # Below the spec's min_filled_fraction: what stays unspent, [{account, currency,
        # amount, reason: partial_fill}] ([] otherwise).
        "remainders",
    )
)

_WITHDRAW: Final = (
    _under("request_result", "id")
    | _under(
        "refresh_result.result",
        "txid", "amount", "fee", "received", "network", "address", "status",
    )
    | _under("refresh_result.extra", "status", "remainders")
)

_DEPOSIT: Final = _under("refresh_result.result", "txid", "amount", "status", "internal")

_TRANSFER: Final = _under("request_result", "id") | _under(
    "refresh_result.result", "id", "amount", "status"
)

_OWN: Final[Mapping[TaskKind, frozenset[str]]] = {
    TaskKind.TRADE: _TRADE,
    TaskKind.WITHDRAW: _WITHDRAW,
    TaskKind.DEPOSIT: _DEPOSIT,
    TaskKind.TRANSFER: _TRANSFER,
    TaskKind.MASTER_TRANSFER: _TRANSFER,
}

RECORDED_FIELDS: Final[Mapping[TaskKind, frozenset[str]]] = MappingProxyType(
    {
        kind: frozenset(
            {
                "request_params.client_id",
                *_under("request_params", *CONFIG_MODELS[kind].model_fields),
                *_OWN[kind],
            }
        )
        for kind in TaskKind
    }
)


def result_path_ok(kind: TaskKind | str, path: str) -> bool:
    """Whether a task of `kind` records `path` (e.g. "refresh_result.result.txid")."""
    try:
        return path in RECORDED_FIELDS[TaskKind(kind)]
    except ValueError:
        return False


__all__ = ["RECORDED_FIELDS", "result_path_ok"]
