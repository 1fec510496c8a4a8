"""The commands that settle a task in needs_attention, for every way a task gets there.

An escalation's `error.commands` are exact `rebalancer resolve WF TASK --outcome ...` lines the
service accepts for that task (docs/needs-attention.md). Which outcomes fit depends on what
`resend` does for the task as recorded: it sends a task back to `created`, and from there
a trade, withdrawal or transfer sends its money afresh under a new client id, while a deposit
only watches again. So `resend` is offered without a check only where nothing can be in
flight (no intent stored, or a deposit); for an intent the exchange may have carried out, it
is offered with the check written into its note, and `done` names the exchange id where one
was recorded (settling.py looks it up and fills the rest, as a completion would).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from events.vocabulary import TaskKind, TaskState
from rebalancer.exchanges.base import Deposit
from rebalancer.workflow import TaskRecord

# At most this many deposits are listed (the newest): an account's history can be long.
MAX_CANDIDATES = 10


def command(workflow_id: str, task: str, outcome: str, note: str,
            result: tuple[tuple[str, str], ...] = ()) -> str:
    """One resolve line; the note is single-quoted, so it never holds a quote itself."""
    facts = "".join(f" --result {key}={value}" for key, value in result)
    note = note.replace("'", "")
    return f"rebalancer resolve {workflow_id} {task} --outcome {outcome}{facts} --note '{note}'"


def commands_for(workflow_id: str, task: TaskRecord,
                 candidates: list[dict[str, Any]] | None = None) -> list[str]:
    """The commands that settle `task` as recorded when it escalates (its state before the
    escalation); `candidates` (a deposit's) each give a `done` naming their txid."""
    def line(outcome: str, note: str, *result: tuple[str, str]) -> str:
        return command(workflow_id, task.name, outcome, note, result)

    params = task.request_params or {}
    if task.kind == TaskKind.DEPOSIT:
        found = [line("done", f"checked: {c['txid']} is the deposit awaited, credited",
                      ("txid", c["txid"]))
                 for c in candidates or [] if c.get("txid") and not c.get("claimed_by_workflow")]
        return [*found,
                line("resend", "not credited yet: watch for it again"),
                line("failed", "checked: it will not be credited; recovering it by hand")]
    if task.state == TaskState.CREATED or (task.request_params is None and task.intents == 0):
        # No intent in flight: resending sends what was never sent.
        return [line("resend", "fixed: send it now"),
                line("failed", "do not send it")]
    exchange_id = (task.request_result or {}).get("id") or (
        task.request_result or {}).get("order_id")
    client = params.get("client_id") or task.client_id
    if task.kind == TaskKind.TRADE:
        order = exchange_id or client
        # A resend sends the current order again under a new client id: only once the
        # exchange shows the lost one never landed (a task found submitting).
        resend = [line("resend", f"checked: order {client} is not on the exchange;"
                                 " send it again")] if task.state == TaskState.SUBMITTING else []
        return [line("done", f"checked: order {order} ended; carry on with what filled"),
                *resend,
                line("failed", f"checked: order {order} is canceled on the exchange;"
                               " stop here, keep what filled")]
    if exchange_id is not None and task.state != TaskState.SUBMITTING:
        return [line("done", f"checked: {exchange_id} went through", ("id", str(exchange_id))),
                line("failed", f"checked: {exchange_id} failed on the exchange, nothing moved")]
    what = f"{params.get('amount')} {params.get('currency')}"
    return [line("resend", f"checked: no {task.kind} of {what} ({client}) on the exchange;"
                           " send it again"),
            line("failed", f"checked: no {task.kind} of {what} ({client}) on the exchange;"
                           " do not send it again")]


Claims = Callable[[str, datetime], Awaitable[list[dict[str, Any]]]]


async def deposit_candidates(deposits: list[Deposit], params: dict[str, Any],
                             claims: Claims | None, since: datetime) -> list[dict[str, Any]]:
    """The deposits of the awaited currency the account shows since the task's `since`, each
    with the workflow whose deposit task already recorded it (by id or txid), else None; the
    shape of an ambiguous match's candidates (tasks/base.py `attention`)."""
    claimed: dict[str, str] = {}
    if claims is not None:
        for claim in await claims(TaskKind.DEPOSIT.value, since):
            for key in (claim.get("id"), claim.get("txid")):
                if key:
                    claimed[str(key)] = claim["workflow_id"]
    found = []
    seen = sorted((d for d in deposits if d.currency == params.get("currency")),
                  key=lambda d: d.created_at)
    for d in seen[-MAX_CANDIDATES:]:
        owner = claimed.get(str(d.exchange_id)) or (claimed.get(d.txid) if d.txid else None)
        found.append({"id": d.exchange_id, "txid": d.txid, "amount": str(d.amount),
                      "at": d.created_at.isoformat(),
                      "claimed_by_workflow": owner})
    return found


__all__ = ["command", "commands_for", "deposit_candidates"]
