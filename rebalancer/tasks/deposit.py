"""Deposits: nothing is sent; the task watches the account until the money has arrived."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from events.vocabulary import TaskKind, TaskState, TaskTrigger
from rebalancer.exchanges.base import Deposit, TransferStatus, normalise_txid
from rebalancer.specs.models import DepositConfig
from rebalancer.tasks.base import HISTORY_SLACK, Processor, TaskContext, error, money
from rebalancer.tasks.remedies import commands_for, deposit_candidates


class DepositProcessor(Processor):
    kind = TaskKind.DEPOSIT

    async def request(self, ctx: TaskContext) -> None:
        config = ctx.config(DepositConfig)
        # Internal transfers can land before this task starts, so look back to the
        # workflow's start, not to now.
        since = (ctx.workflow.created_at or ctx.now) - HISTORY_SLACK
        await ctx.move(
            TaskTrigger.WATCH,
            request_params={
                "account": config.account,
                "currency": config.currency,
                "txid": config.txid,
                "amount": money(config.amount),
                "from_account": config.from_account,
                "since": since.isoformat(),
            },
        )

    async def refresh(self, ctx: TaskContext) -> None:
        params = ctx.task.request_params or {}
        exchange = ctx.exchange(params["account"])
        deposits = await exchange.fetch_deposits(
            params["currency"], datetime.fromisoformat(params["since"])
        )
        deposit = match_deposit(deposits, params)
        if deposit is None:
            return  # not seen yet: waiting is the normal case; the deadline guards it
        result = _result(deposit)
        state = ctx.task.state
        if deposit.status == TransferStatus.OK:
            await ctx.move(
                TaskTrigger.COMPLETE, refresh_result={"result": result, "extra": {"status": "done"}}
            )
        elif deposit.status in (TransferStatus.FAILED, TransferStatus.CANCELED):
            # The money left the sender and was not credited (a rejected or returned deposit,
            # Binance's "wrong deposit"): only an operator can recover it.
            since = datetime.fromisoformat(params["since"])
            candidates = await deposit_candidates([deposit], params, ctx.claims, since)
            await ctx.move(TaskTrigger.ESCALATE, refresh_result={"result": result}, error=error(
                "deposit_" + deposit.status.value,
                f"the exchange reports the deposit {deposit.raw_status!r}"
                f" ({deposit.amount} {deposit.currency}, txid {deposit.txid})",
                candidates=candidates,
                commands=commands_for(ctx.workflow.workflow_id, ctx.task, candidates)))
        elif state == TaskState.REQUESTED:
            await ctx.move(
                TaskTrigger.PROGRESS,
                refresh_result={"result": result, "extra": {"status": "confirming"}}
            )
        elif _raw_status_of(ctx) != deposit.raw_status:
            # Still on its way, in a new raw status (an unknown one included, never guessed):
            # recorded, so the deadline can name it.
            await ctx.move(
                TaskTrigger.UPDATE,
                refresh_result={"result": result, "extra": {"status": "confirming"}}
            )


def _raw_status_of(ctx: TaskContext) -> str | None:
    return ((ctx.task.refresh_result or {}).get("result") or {}).get("raw_status")


def match_deposit(deposits: list[Deposit], params: dict[str, Any]) -> Deposit | None:
    """By txid when the withdrawal had one; else (internal transfers) by the exact amount.

    Amount matching can only tell deposits apart by amount: two workflows awaiting the same
    amount of the same currency on the same account at the same time would be ambiguous.
    """
    txid = normalise_txid(params.get("txid"))
    if txid:
        return next((d for d in deposits if normalise_txid(d.txid) == txid), None)
    amount = params.get("amount")
    if amount is None:
        return None
    wanted = Decimal(amount)
    candidates = [d for d in deposits if d.amount == wanted]
    return candidates[0] if candidates else None


def _result(deposit: Deposit) -> dict[str, Any]:
    return {
        "id": deposit.exchange_id,
        "txid": deposit.txid,
        "amount": money(deposit.amount),
        "status": deposit.status.value,
        "internal": deposit.internal,
        "raw_status": deposit.raw_status,
    }
