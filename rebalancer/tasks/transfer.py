"""Spot <-> futures transfers inside one account, and master <-> sub account transfers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from decimal import Decimal
from typing import Any

from events.vocabulary import TaskKind, TaskState, TaskTrigger
from rebalancer.exchanges.base import (
    Exchange,
    HistoryMatch,
    MasterTransferRequest,
    Transfer,
    TransferRequest,
    TransferStatus,
    Wallet,
)
from rebalancer.specs.models import MasterTransferConfig, TransferConfig
from rebalancer.tasks.base import Processor, TaskContext, error, money, reconcile_lookup, send


class TransferProcessor(Processor):
    """Spot <-> futures. Binance takes no client id here: reconciliation matches the history."""

    kind = TaskKind.TRANSFER

    async def request(self, ctx: TaskContext) -> None:
        config = ctx.config(TransferConfig)
        request = TransferRequest(
            client_id=ctx.next_client_id(),
            currency=config.currency,
            amount=config.amount,
            from_wallet=Wallet(config.from_wallet),
            to_wallet=Wallet(config.to_wallet),
        )
        exchange = ctx.exchange(config.account)
        await _send(ctx, config.account, request, lambda: exchange.transfer(request))

    async def reconcile(self, ctx: TaskContext) -> None:
        found = await reconcile_lookup(ctx, lambda: self.lookup(ctx))
        if found is not None:
            await ctx.move(TaskTrigger.ACCEPT, request_result=_request_result(found))

    async def refresh(self, ctx: TaskContext) -> None:
        transfer = await self.lookup(ctx)
        if transfer is not None:
            await follow(ctx, transfer)

    async def lookup(self, ctx: TaskContext) -> Transfer | None:
        params = ctx.task.request_params or {}
        exchange = ctx.exchange(params["account"])
        match = await ctx.history_match(params["currency"], Decimal(params["amount"]))
        return await self._fetch(exchange, params["client_id"], match)

    async def _fetch(
        self, exchange: Exchange, client_id: str, match: HistoryMatch
    ) -> Transfer | None:
        return await exchange.fetch_transfer(client_id, match)


class MasterTransferProcessor(TransferProcessor):
    """Master <-> sub, with the master's credentials and Binance's clientTranId."""

    kind = TaskKind.MASTER_TRANSFER

    async def request(self, ctx: TaskContext) -> None:
        config = ctx.config(MasterTransferConfig)
        request = MasterTransferRequest(
            client_id=ctx.next_client_id(),
            currency=config.currency,
            amount=config.amount,
            from_account=config.from_account,
            to_account=config.to_account,
            from_wallet=Wallet(config.from_wallet),
            to_wallet=Wallet(config.to_wallet),
        )
        exchange = ctx.exchange(config.master_account)
        await _send(ctx, config.master_account, request, lambda: exchange.master_transfer(request))

    async def _fetch(
        self, exchange: Exchange, client_id: str, match: HistoryMatch
    ) -> Transfer | None:
        return await exchange.fetch_master_transfer(client_id, match)


async def _send(
    ctx: TaskContext,
    account: str,
    request: TransferRequest | MasterTransferRequest,
    call: Callable[[], Awaitable[Transfer]],
) -> None:
    """The intent (the request itself, money as strings) stored, then the one call."""
    params = {
        "account": account,
        **{
            key: str(value) if isinstance(value, Decimal | Wallet) else value
            for key, value in asdict(request).items()
        },
    }
    transfer = await send(ctx, TaskTrigger.SUBMIT, params, call)
    if transfer is not None:
        await ctx.move(TaskTrigger.ACCEPT, request_result=_request_result(transfer))
        if transfer.status in _FINAL:
            # The answer already tells how it ended (the connectors read it back from the
            # history): recorded now, not after one more look-up.
            await follow(ctx, transfer)


_FINAL = frozenset({TransferStatus.OK, TransferStatus.FAILED, TransferStatus.CANCELED})


async def follow(ctx: TaskContext, transfer: Transfer) -> None:
    result = {
        "id": transfer.exchange_id,
        "amount": money(transfer.amount),
        "status": transfer.status.value,
        "raw_status": transfer.raw_status,
    }
    if transfer.status == TransferStatus.OK:
        await ctx.move(
            TaskTrigger.COMPLETE, refresh_result={"result": result, "extra": {"status": "done"}}
        )
    elif transfer.status in (TransferStatus.FAILED, TransferStatus.CANCELED):
        await ctx.move(
            TaskTrigger.FAIL,
            error=error(
                "transfer_" + transfer.status.value,
                f"the exchange reports the transfer {transfer.raw_status or transfer.status}",
            ),
        )
    elif ctx.task.state == TaskState.REQUESTED:
        await ctx.move(
            TaskTrigger.PROGRESS, refresh_result={"result": result, "extra": {"status": "pending"}}
        )


def _request_result(transfer: Transfer) -> dict[str, Any]:
    return {"id": transfer.exchange_id, "status": transfer.status.value,
            "raw_status": transfer.raw_status}
