"""Synthetic, legal workflow histories (via the catalogue and the machines) for tests, benches.

Each history follows the built-in path and stops at a random point: done, failed at a task,
parked in needs_attention, canceled, paused, or still running. The generator also says what
money it left in transit, so read models can be checked against an independent account.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from events.catalogue import Event, TaskStateChanged, WorkflowCreated, WorkflowStateChanged
from rebalancer.machines import TaskKind, task_machine, workflow_machine

SEED_TASKS: list[tuple[str, str]] = [
    ("buy_in_source_spot", "trade"),
    ("withdraw_to_interim", "withdraw"),
    ("await_deposit_interim", "deposit"),
    ("withdraw_to_master", "withdraw"),
    ("await_deposit_master", "deposit"),
    ("master_to_sub", "master_transfer"),
    ("sell_in_sub_spot", "trade"),
    ("sub_spot_to_futures", "transfer"),
]
ROUTE = {  # where each moving task sends money: (from, to)
    "withdraw_to_interim": ("upbit-personal", "binance-personal"),
    "withdraw_to_master": ("binance-personal", "binance-corp-master"),
    "master_to_sub": ("binance-corp-master", "binance-corp-sub"),
    "sell_in_sub_spot": ("binance-corp-sub", "binance-corp-sub"),
    "sub_spot_to_futures": ("binance-corp-sub", "binance-corp-sub"),
}
DEPOSIT_ACCOUNT = {"await_deposit_interim": "binance-personal",
                   "await_deposit_master": "binance-corp-master"}


@dataclass
class History:
    """One workflow's events, split into the appends an engine would make."""

    stream_id: str
    appends: list[list[Event]] = field(default_factory=list)
    final_state: str = "created"
    task_states: list[str] = field(default_factory=list)
    in_transit: dict[tuple[str, str], Decimal] = field(default_factory=dict)

    @property
    def events(self) -> list[Event]:
        return [e for batch in self.appends for e in batch]


class _Builder:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.workflow_state = "created"

    def workflow(self, trigger: str, reason: str | None = None) -> WorkflowStateChanged:
        source = self.workflow_state
        dest = workflow_machine().next_state(source, trigger)
        self.workflow_state = dest
        return WorkflowStateChanged(trigger=trigger, source=source, dest=dest, reason=reason)


def make_history(rng: random.Random, *, amount: Decimal | None = None) -> History:
    """A random legal history of the built-in path."""
    stream_id = f"workflow-{uuid.UUID(int=rng.getrandbits(128), version=4)}"
    amount = amount or Decimal(rng.randrange(5_000, 5_000_000)) * 10
    history = History(stream_id)
    b = _Builder(rng)
    spec = {"name": "upbit_to_binance_sub_futures",
            "tasks": [{"name": n, "kind": k, "config": {}} for n, k in SEED_TASKS]}
    params = {"from_account": "upbit-personal", "to_account": "binance-corp-sub",
              "from_currency": "KRW", "interim_currency": "ETH", "to_currency": "USDT",
              "from_amount": str(amount)}
    history.appends.append([
        WorkflowCreated(spec_name="upbit_to_binance_sub_futures", spec=spec, params=params,
                        command_id=f"cmd-{rng.getrandbits(64):x}"),
        b.workflow("start"),
    ])
    outcome = rng.choices(
        ["done", "failed", "needs_attention", "canceled", "paused", "running"],
        weights=[60, 10, 8, 7, 5, 10],
    )[0]
    stop_at = rng.randrange(len(SEED_TASKS)) if outcome != "done" else len(SEED_TASKS)
    coin = (amount / Decimal(4_000_000)).quantize(Decimal("0.00000001"))
    history.task_states = ["created"] * len(SEED_TASKS)
    for index, (name, kind) in enumerate(SEED_TASKS):
        if index == stop_at:
            _stop(history, b, index, name, kind, outcome, coin)
            break
        for batch in _run_task(history, index, name, kind, coin, rng):
            history.appends.append(batch)
    else:
        history.appends.append([b.workflow("complete")])
    history.final_state = b.workflow_state
    return history


def done_history(seed: int) -> History:
    """A synthetic history that ran every task to the end."""
    rng = random.Random(seed)
    while True:
        history = make_history(rng)
        if history.final_state == "done":
            return history


def _move(history: History, index: int, name: str, kind: str, trigger: str,
          **carried: Any) -> TaskStateChanged:
    source = history.task_states[index]
    dest = task_machine(TaskKind(kind)).next_state(source, trigger)
    history.task_states[index] = dest
    return TaskStateChanged(task_index=index, task_name=name, kind=kind, trigger=trigger,
                            source=source, dest=dest, **carried)


def _params(name: str, kind: str, coin: Decimal, index: int) -> dict[str, Any]:
    if kind == "deposit":
        return {"account": DEPOSIT_ACCOUNT[name], "currency": "ETH", "txid": f"tx-{index}"}
    frm, to = ROUTE.get(name, ("upbit-personal", "upbit-personal"))
    currency = "USDT" if name == "sub_spot_to_futures" else "ETH"
    return {"from_account": frm, "to_account": to, "currency": currency, "amount": str(coin),
            "client_id": f"rb-{index}-1"}


def _run_task(history: History, index: int, name: str, kind: str, coin: Decimal,
              rng: random.Random) -> list[list[Event]]:
    params = _params(name, kind, coin, index)
    result = {"result": {"amount": str(coin), "txid": f"tx-{index}"},
              "extra": {"cumulative_amount_excluding_fee": str(coin), "status": "done"}}
    if kind == "deposit":
        steps = [[_move(history, index, name, kind, "watch", request_params=params)],
                 [_move(history, index, name, kind, "progress")],
                 [_move(history, index, name, kind, "complete", refresh_result=result)]]
        _arrive(history, params)
        return steps
    steps = [[_move(history, index, name, kind, "submit", request_params=params)],
             [_move(history, index, name, kind, "accept", request_result={"id": f"x{index}"})]]
    if kind in ("withdraw", "transfer", "master_transfer"):
        _depart(history, name, kind, params)
    if kind == "trade":
        steps.append([_move(history, index, name, kind, "open")])
        for _ in range(rng.randrange(3)):
            steps.append([_move(history, index, name, kind, "fill", refresh_result=result)])
    elif kind == "withdraw":
        steps.append([_move(history, index, name, kind, "progress")])
        steps.append([_move(history, index, name, kind, "update", refresh_result=result)])
    else:
        steps.append([_move(history, index, name, kind, "progress")])
    steps.append([_move(history, index, name, kind, "complete", refresh_result=result)])
    if kind in ("transfer", "master_transfer"):
        _arrive(history, {"account": params["to_account"], "currency": params["currency"]},
                amount=Decimal(params["amount"]))
    return steps


def _depart(history: History, name: str, kind: str, params: dict[str, Any]) -> None:
    key = (params["to_account"], params["currency"])
    history.in_transit[key] = history.in_transit.get(key, Decimal(0)) + Decimal(params["amount"])


def _arrive(history: History, params: dict[str, Any], amount: Decimal | None = None) -> None:
    key = (params["account"], params["currency"])
    if key in history.in_transit:
        left = history.in_transit[key] - (amount if amount is not None else history.in_transit[key])
        if left:
            history.in_transit[key] = left
        else:
            del history.in_transit[key]


def _stop(history: History, b: _Builder, index: int, name: str, kind: str, outcome: str,
          coin: Decimal) -> None:
    params = _params(name, kind, coin, index)
    first = "watch" if kind == "deposit" else "submit"
    history.appends.append([_move(history, index, name, kind, first, request_params=params)])
    if kind in ("withdraw", "transfer", "master_transfer"):
        _depart(history, name, kind, params)
    if outcome == "failed":
        error = {"code": "rejected", "message": "insufficient funds"}
        history.appends.append([_move(history, index, name, kind, "fail", error=error),
                                b.workflow("fail", "task failed")])
        if kind != "deposit":
            _arrive(history, {"account": params.get("to_account"),
                              "currency": params.get("currency")})
    elif outcome == "needs_attention":
        history.appends.append([
            _move(history, index, name, kind, "escalate",
                  error={"code": "unknown_outcome", "message": "exchange cannot tell"}),
            b.workflow("escalate", "task needs attention"),
        ])
    elif outcome == "canceled":
        history.appends.append([_move(history, index, name, kind, "cancel"),
                                b.workflow("cancel", "operator")])
        if kind != "deposit":
            _arrive(history, {"account": params.get("to_account"),
                              "currency": params.get("currency")})
    elif outcome == "paused":
        history.appends.append([b.workflow("pause", "operator")])
    # "running": left in flight as it is


def interleaved(histories: list[History], rng: random.Random) -> list[tuple[str, int, list[Event]]]:
    """All appends of all histories as (stream, expected_version, events), interleaved randomly
    while keeping each stream's own order."""
    queues = [list(h.appends) for h in histories]
    versions = [0] * len(histories)
    out = []
    live = [i for i, q in enumerate(queues) if q]
    while live:
        i = rng.choice(live)
        batch = queues[i].pop(0)
        out.append((histories[i].stream_id, versions[i], batch))
        versions[i] += len(batch)
        if not queues[i]:
            live.remove(i)
    return out
