"""Withdrawals: allowlist and fee policy first, intent stored, then one call; followed to done."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from events.vocabulary import TaskKind, TaskState, TaskTrigger
from rebalancer.exchanges.base import TransferStatus, Withdrawal, WithdrawRequest, floor_to
from rebalancer.specs.models import WithdrawConfig
from rebalancer.tasks.base import (
    Processor,
    TaskContext,
    error,
    money,
    reconcile_lookup,
    send,
)


class WithdrawProcessor(Processor):
    kind = TaskKind.WITHDRAW

    async def request(self, ctx: TaskContext) -> None:
        config = ctx.config(WithdrawConfig)
        source = ctx.accounts.get(config.from_account)
        dest = ctx.accounts.get(config.to_account)
        target = dest.deposit_address(config.currency, config.network)
        if target is None:
            networks = [a.network for a in dest.addresses(config.currency)]
            where = f"it has {config.currency} on {', '.join(networks)}" if networks else (
                f"it has no {config.currency} address at all")
            await ctx.move(
                TaskTrigger.FAIL,
                error=error(
                    "no_deposit_address",
                    f"{config.to_account} has no {config.currency} address on"
                    f" {config.network} ({where})",
                    networks=networks,
                ),
            )
            return
        # The address's own tag (memo) is the one sent; a spec naming another is a mistake
        # that would lose the deposit.
        if config.tag is not None and config.tag != target.tag:
            await ctx.move(
                TaskTrigger.FAIL,
                error=error(
                    "tag_mismatch",
                    f"tag {config.tag!r} is not the tag of {config.to_account}'s"
                    f" {config.currency} address on {config.network}"
                    f" ({target.tag!r})",
                ),
            )
            return
        # Our own allowlist, checked before the exchange is ever called.
        if not source.allows(config.currency, target.address, target.network, target.tag):
            await ctx.move(
                TaskTrigger.FAIL,
                error=error(
                    "address_not_allowed",
                    f"{target.address} ({target.network}) is not on {source.id}'s"
                    " withdrawal allowlist",
                ),
            )
            return
        exchange = ctx.exchange(config.from_account)
        rules = await exchange.withdrawal_rules(config.currency, config.network)
        available = config.amount
        # Binance counts the fee inside the amount; Upbit charges it on top.
        spendable = available if rules.fee_included else available - rules.fee
        amount = floor_to(spendable, rules.multiple)
        if amount < rules.minimum:
            await ctx.move(
                TaskTrigger.FAIL,
                error=error(
                    "below_minimum",
                    f"{amount} {config.currency} is below the withdrawal minimum {rules.minimum}",
                    available=str(available),
                ),
            )
            return
        left = spendable - amount
        remainders = (
            [{"currency": config.currency, "amount": str(left), "reason": "withdrawal_min_amount"}]
            if left > 0
            else []
        )
        client_id = ctx.next_client_id()
        params: dict[str, Any] = {
            "from_account": config.from_account,
            "to_account": config.to_account,
            "currency": config.currency,
            "amount": str(amount),
            "available": str(available),
            "address": target.address,
            "network": target.network,
            "tag": target.tag,
            "fee": str(rules.fee),
            "fee_included": rules.fee_included,
            "remainders": remainders,
            "client_id": client_id,
        }
        request = WithdrawRequest(
            client_id=client_id,
            currency=config.currency,
            amount=amount,
            address=target.address,
            network=target.network,
            tag=target.tag,
        )
        withdrawal = await send(ctx, TaskTrigger.SUBMIT, params, lambda: exchange.withdraw(request))
        if withdrawal is not None:
            await ctx.move(TaskTrigger.ACCEPT, request_result=_request_result(withdrawal))

    async def reconcile(self, ctx: TaskContext) -> None:
        found = await reconcile_lookup(ctx, lambda: self._lookup(ctx))
        if found is not None:
            await ctx.move(TaskTrigger.ACCEPT, request_result=_request_result(found))

    async def refresh(self, ctx: TaskContext) -> None:
        withdrawal = await self._lookup(ctx)
        if withdrawal is None:
            return  # acknowledged but not in the history yet: the deadline guards this
        params = ctx.task.request_params or {}
        result = _result(withdrawal)
        state = ctx.task.state
        if withdrawal.status == TransferStatus.OK:
            if state == TaskState.REQUESTED:
                await ctx.move(
                    TaskTrigger.PROGRESS,
                    refresh_result={"result": result, "extra": {"status": "processing"}}
                )
            await ctx.move(
                TaskTrigger.COMPLETE,
                refresh_result={
                    "result": result,
                    "extra": {"status": "done", "remainders": params.get("remainders", [])},
                },
            )
        elif withdrawal.status in (TransferStatus.FAILED, TransferStatus.CANCELED):
            await ctx.move(
                TaskTrigger.FAIL,
                error=error(
                    "withdrawal_" + withdrawal.status.value,
                    f"the exchange reports the withdrawal {withdrawal.raw_status}",
                ),
            )
        elif state == TaskState.REQUESTED:
            await ctx.move(
                TaskTrigger.PROGRESS,
                refresh_result={"result": result, "extra": {"status": "processing"}}
            )
        elif _recorded(ctx, "txid") != withdrawal.txid or (
                _recorded(ctx, "raw_status") != withdrawal.raw_status):
            # A txid appeared, or a new raw status (an unknown one included, never guessed:
            # recorded so that the deadline can name it).
            await ctx.move(
                TaskTrigger.UPDATE,
                refresh_result={"result": result, "extra": {"status": "processing"}}
            )

    async def _lookup(self, ctx: TaskContext) -> Withdrawal | None:
        params = ctx.task.request_params or {}
        exchange = ctx.exchange(params["from_account"])
        match = await ctx.history_match(
            params["currency"], Decimal(params["amount"]), params["address"]
        )
        return await exchange.fetch_withdrawal(params["client_id"], match)


def _recorded(ctx: TaskContext, key: str) -> str | None:
    result = (ctx.task.refresh_result or {}).get("result") or {}
    return result.get(key)


def _request_result(withdrawal: Withdrawal) -> dict[str, Any]:
    return {
        "id": withdrawal.exchange_id,
        "status": withdrawal.status.value,
        "raw_status": withdrawal.raw_status,
    }


def _result(withdrawal: Withdrawal) -> dict[str, Any]:
    return {
        "id": withdrawal.exchange_id,
        "txid": withdrawal.txid,
        "amount": money(withdrawal.amount),
        "fee": money(withdrawal.fee),
        "received": money(withdrawal.received),
        "network": withdrawal.network,
        "address": withdrawal.address,
        "status": withdrawal.status.value,
        "internal": withdrawal.internal,
        "raw_status": withdrawal.raw_status,
    }
