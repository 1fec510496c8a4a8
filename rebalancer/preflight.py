"""The pre-flight: a whole spec walked against the exchanges' current rules before any money
moves, through the port's read-only calls only (market, ticker_price, withdrawal_rules,
balance).

Amounts that depend on earlier results are estimated simply: a trade fills at the ticker
price less the taker fee (buy fee on top where the market says so), a withdrawal delivers
its amount less the fee, deposits and transfers pass their amount on. The walk predicts what
the task processors (rebalancer/tasks/) would compute and refuse, one line per problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from rebalancer.accounts import Accounts
from rebalancer.errors import RebalancerError, RetryableError
from rebalancer.exchanges.base import Exchanges, Wallet, floor_to
from rebalancer.specs.interpolation import ResolvedParams, references, render
from rebalancer.specs.models import WorkflowSpec


async def preflight_problems(spec: WorkflowSpec, params: ResolvedParams, accounts: Accounts,
                             exchanges: Exchanges) -> list[str]:
    """One line per problem, naming the task; empty when the walk finds nothing to refuse."""
    problems: list[str] = []
    carried: Decimal | None = None  # the previous task's estimated outcome amount
    for task in spec.tasks:
        label = f"task {task.name!r}"
        config = {key: (None if references(value) and "$." in str(value) else value)
                  for key, value in task.config.items()}
        try:
            values: dict[str, Any] = render(config, params, {})
        except RebalancerError as e:
            problems.append(f"{label}: {e}")
            carried = None
            continue
        amount_key = "quote_amount" if values.get("quote_amount") else "amount"
        # An amount an earlier task produces is not in the account yet: no balance to check.
        estimated = values.get(amount_key) is None and carried is not None
        if estimated:
            values[amount_key] = str(carried)
        try:
            carried = await _walk(task.kind.value, values, accounts, exchanges, problems, label,
                                  estimated)
        except RetryableError:
            # A rate limit or timeout says nothing about the spec: the caller may ask again
            # (the API answers `retryable`), a refusal would be for good.
            raise
        except RebalancerError as e:
            problems.append(f"{label}: {e}")
            carried = None
        if carried is None:
            break  # what follows depends on an amount that cannot be estimated
    return problems


async def _walk(kind: str, v: Mapping[str, Any], accounts: Accounts, exchanges: Exchanges,
                problems: list[str], label: str, estimated: bool) -> Decimal | None:
    given = v.get("quote_amount") or v.get("amount")
    amount = Decimal(str(given)) if given is not None else None
    if kind == "trade":
        port = exchanges.for_account(v["account"])
        symbol = f"{v['base_currency']}/{v['quote_currency']}"
        try:
            rules = await port.market(symbol)
        except RetryableError:
            raise
        except RebalancerError:
            problems.append(f"{label}: {port.exchange} has no market {symbol}")
            return None
        price = await port.ticker_price(symbol)
        if amount is None:
            return None
        buy = v.get("side") == "buy"
        by_quote = v.get("quote_amount") is not None
        if not by_quote:
            # The order goes out at the market's precision: what is below a step is not sold.
            amount = floor_to(amount, rules.amount_step)
        notional = amount if by_quote else amount * price
        if notional < rules.min_notional:
            problems.append(f"{label}: {notional} {rules.quote} is below the minimum order of"
                            f" {rules.min_notional} {rules.quote} on {symbol}")
        spend_currency, spend = (rules.quote, notional) if buy else (rules.base, amount)
        held = None if estimated else await port.balance(spend_currency, Wallet.SPOT)
        if held is not None and held < spend:
            problems.append(f"{label}: {v['account']} holds {held} {spend_currency},"
                            f" less than the {spend} it needs")
        fee = 1 - rules.taker_fee
        if buy:
            spent = notional / (1 + rules.taker_fee) if rules.buy_fee_on_top else notional
            return floor_to(spent / price * (1 if rules.buy_fee_on_top else fee),
                            rules.amount_step)
        return amount * price * fee
    if kind == "withdraw":
        source = accounts.get(v["from_account"])
        dest = accounts.get(v["to_account"])
        currency, network = v["currency"], v["network"]
        target = dest.deposit_address(currency, network)
        if target is None:
            problems.append(f"{label}: {dest.id} has no {currency} deposit address on {network}")
            return None
        if not source.allows(currency, target.address, target.network, target.tag):
            problems.append(f"{label}: {target.address} ({network}) is not on {source.id}'s"
                            " withdrawal allowlist")
            return None
        port = exchanges.for_account(source.id)
        limits = await port.withdrawal_rules(currency, network)
        if amount is None:
            return None
        spendable = amount if limits.fee_included else amount - limits.fee
        sent = floor_to(spendable, limits.multiple)
        if sent < limits.minimum:
            problems.append(f"{label}: about {sent} {currency} after the {limits.fee} fee is"
                            f" below the withdrawal minimum of {limits.minimum}")
            return None
        return sent - limits.fee if limits.fee_included else sent
    return amount  # deposits and transfers pass their amount on


__all__ = ["preflight_problems"]
