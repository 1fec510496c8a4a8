"""Spot <-> futures transfers inside one account, and master <-> sub account transfers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rebalancer.exchanges.base import (
    MasterTransferRequest,
    Transfer,
    TransferRequest,
    TransferStatus,
    Wallet,
)
from rebalancer.machines import TaskKind, TaskState
from rebalancer.specs.models import MasterTransferConfig, TransferConfig
from rebalancer.tasks.base import Processor, TaskContext, error, money, reconcile_lookup, send


class TransferProcessor(Processor):
    """Spot <-> futures. Binance takes no client id here: reconciliation matches the history."""

    kind = TaskKind.TRANSFER

    async def request(self, ctx: TaskContext) -> None:
        config = ctx.config(TransferConfig)
        exchange = ctx.exchange(config.account)
        client_id = ctx.next_client_id()
        params = {
            "account": config.account,
            "currency": config.currency,
            "amount": str(config.amount),
            "from_wallet": config.from_wallet,
            "to_wallet": config.to_wallet,
            "client_id": client_id,
        }
        request = TransferRequest(
            client_id=client_id,
            currency=config.currency,
            amount=config.amount,
            from_wallet=Wallet(config.from_wallet),
            to_wallet=Wallet(config.to_wallet),
        )
        transfer = await send(ctx, "submit", params, lambda: exchange.transfer(request))
        if transfer is not None:
            await ctx.move("accept", request_result=_request_result(transfer))

    async def reconcile(self, ctx: TaskContext) -> None:
        found = await reconcile_lookup(ctx, lambda: self.lookup(ctx))
        if found is not None:
            await ctx.move("accept", request_result=_request_result(found))

    async def refresh(self, ctx: TaskContext) -> None:
        transfer = await self.lookup(ctx)
        if transfer is not None:
            await follow(ctx, transfer)

    async def lookup(self, ctx: TaskContext) -> Transfer | None:
        params = ctx.task.request_params or {}
        exchange = ctx.exchange(params["account"])
        match = await ctx.history_match(params["currency"], Decimal(params["amount"]))
        return await exchange.fetch_transfer(params["client_id"], match)


class MasterTransferProcessor(TransferProcessor):
    """Master <-> sub, with the master's credentials and Binance's clientTranId."""

    kind = TaskKind.MASTER_TRANSFER

    async def request(self, ctx: TaskContext) -> None:
        config = ctx.config(MasterTransferConfig)
        exchange = ctx.exchange(config.master_account)
        client_id = ctx.next_client_id()
        params = {
            "account": config.master_account,
            "from_account": config.from_account,
            "to_account": config.to_account,
            "currency": config.currency,
            "amount": str(config.amount),
            "from_wallet": config.from_wallet,
            "to_wallet": config.to_wallet,
            "client_id": client_id,
        }
        request = MasterTransferRequest(
            client_id=client_id,
            currency=config.currency,
            amount=config.amount,
            from_account=config.from_account,
            to_account=config.to_account,
            from_wallet=Wallet(config.from_wallet),
            to_wallet=Wallet(config.to_wallet),
        )
        transfer = await send(ctx, "submit", params, lambda: exchange.master_transfer(request))
        if transfer is not None:
            await ctx.move("accept", request_result=_request_result(transfer))

    async def lookup(self, ctx: TaskContext) -> Transfer | None:
        params = ctx.task.request_params or {}
        exchange = ctx.exchange(params["account"])
        match = await ctx.history_match(params["currency"], Decimal(params["amount"]))
        return await exchange.fetch_master_transfer(params["client_id"], match)


async def follow(ctx: TaskContext, transfer: Transfer) -> None:
    result = {
        "id": transfer.exchange_id,
        "amount": money(transfer.amount),
        "status": transfer.status.value,
    }
    if transfer.status == TransferStatus.OK:
        await ctx.move("complete", refresh_result={"result": result, "extra": {"status": "done"}})
    elif transfer.status in (TransferStatus.FAILED, TransferStatus.CANCELED):
        await ctx.move(
            "fail",
            error=error(
                "transfer_" + transfer.status.value,
                f"the exchange reports the transfer {transfer.status}",
            ),
        )
    elif ctx.task.state == TaskState.REQUESTED:
        await ctx.move(
            "progress", refresh_result={"result": result, "extra": {"status": "pending"}}
        )


def _request_result(transfer: Transfer) -> dict[str, Any]:
    return {"id": transfer.exchange_id, "status": transfer.status.value}
