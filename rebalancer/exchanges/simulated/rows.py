"""Rows of sim.operations and sim.deposits as the port's models (exchanges/base.py)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg.rows import DictRow

from rebalancer.errors import AmbiguousOutcomeError
from rebalancer.exchanges.base import (
    Deposit,
    HistoryMatch,
    Order,
    OrderStatus,
    OrderType,
    Side,
    Transfer,
    TransferStatus,
    Wallet,
    Withdrawal,
)
from rebalancer.exchanges.simulated.spec import raw_status


def single_match(rows: list[DictRow], what: str, match: HistoryMatch) -> DictRow:
    if len(rows) > 1:
        raise AmbiguousOutcomeError(
            f"{len(rows)} {what}s of {match.amount.normalize():f} {match.currency} since"
            f" {match.since.isoformat()} match: cannot tell which one is ours",
            [{"id": str(row["id"]), "txid": row.get("txid"), "amount": str(row["amount"]),
              "at": row["created_at"].isoformat()} for row in rows])
    return rows[0]


def _plain(row: DictRow, *keys: str) -> dict[str, Any]:
    return {k: (str(row[k]) if isinstance(row[k], Decimal | datetime) else row[k])
            for k in keys}


def order_of(row: DictRow) -> Order:
    filled: Decimal = row["amount"]
    cost: Decimal = row["cost"]
    return Order(
        client_id=row["client_id"], exchange_id=str(row["id"]), symbol=row["symbol"],
        side=Side(row["side"]), type=OrderType(row["order_type"]),
        status=OrderStatus(row["status"]), amount=row["requested_amount"], filled=filled,
        cost=cost, fee=row["fee"], fee_currency=row["fee_currency"],
        average_price=cost / filled if filled else None, raw_status=row["raw_status"],
        raw=_plain(row, "id", "raw_status", "price", "quote_amount", "created_at"),
    )


def withdrawal_of(row: DictRow) -> Withdrawal:
    status = TransferStatus(row["status"])
    return Withdrawal(
        client_id=row["client_id"], exchange_id=str(row["id"]), currency=row["currency"],
        amount=row["amount"], fee=row["fee"], received=row["received"], address=row["address"],
        network=row["network"], status=status,
        txid=row["txid"] if status == TransferStatus.OK else None, internal=row["internal"],
        created_at=row["created_at"], raw_status=row["raw_status"],
        raw=_plain(row, "id", "raw_status", "to_account", "complete_at"),
    )


def deposit_of(row: DictRow) -> Deposit:
    status = TransferStatus(row["status"])
    return Deposit(
        exchange_id=str(row["id"]), currency=row["currency"], amount=row["amount"],
        address=row["address"], network=row["network"], status=status, txid=row["txid"],
        internal=row["internal"], created_at=row["sent_at"],
        raw_status=raw_status(row["exchange"],
                        "deposit_ok" if status == TransferStatus.OK else "deposit_pending"),
        raw=_plain(row, "id", "withdrawal_id", "arrive_at"),
    )


def transfer_of(row: DictRow) -> Transfer:
    return Transfer(
        client_id=row["client_id"], exchange_id=str(row["id"]), currency=row["currency"],
        amount=row["amount"], from_wallet=Wallet(row["from_wallet"]),
        to_wallet=Wallet(row["to_wallet"]), from_account=row["from_account"],
        to_account=row["to_account"], status=TransferStatus(row["status"]),
        created_at=row["created_at"], raw=_plain(row, "id", "raw_status"),
    )
