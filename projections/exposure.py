"""The `exposure` read model: amounts in transit per account and currency.

A withdrawal is in transit from the moment its intent is stored (`submitting`: it may have
landed) until the workflow's deposit task for the same account and currency is done (the
deposits being watched are kept as zero-amount rows of kind `deposit` for that match); a
withdrawal that failed, was canceled or never landed (`reset`) is not. Spot<->futures and
master<->sub transfers are in transit from `submitting` until they are done.

A row's amount is the one requested until a withdrawal's refresh reports `received` (what the
destination will be credited: less the fee where the exchange counts it inside the amount).
`read_exposure` is what `rebalancer exposure` shows, remainders left behind included.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from psycopg import AsyncConnection, sql

from events.catalogue import TaskStateChanged
from events.store import EventStore, RecordedEvent
from events.vocabulary import TASK_TERMINAL, TaskKind, TaskState, TaskTrigger
from projections.workflows import ProjectionError, workflow_id_of

K, S = TaskKind, TaskState
# Moves after which the task's money is certainly not (or no longer) on its way: a withdrawal
# that is done is still on its way until its deposit arrives; a transfer that is done has landed.
CLOSING: dict[str, frozenset[TaskState]] = {
    K.WITHDRAW: frozenset({S.FAILED, S.CANCELED}),
    K.TRANSFER: TASK_TERMINAL,
    K.MASTER_TRANSFER: TASK_TERMINAL,
}
# Where the money of a moving task is on its way (or may be): the row follows the task's state.
IN_TRANSIT = frozenset({S.REQUESTED, S.PROCESSING, S.NEEDS_ATTENTION, S.DONE})


class ExposureProjection:
    """Keeps `<schema>.exposure_items` (one row per moving task); `exposure` sums them."""

    name = "exposure"
    tables: tuple[str, ...] = ("exposure_items",)

    def __init__(self, schema: str = "public") -> None:
        self.schema = schema
        table = sql.Identifier(schema, "exposure_items")
        self._open = sql.SQL(
            "insert into {} (workflow_id, task_index, kind, from_account, to_account, currency,"
            " amount, status, since, last_version) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " on conflict (workflow_id, task_index) do update set status = excluded.status,"
            " amount = excluded.amount, last_version = excluded.last_version"
            " where {}.last_version < excluded.last_version"
        ).format(table, table)
        self._watched = sql.SQL(
            "delete from {} where workflow_id = %s and task_index = %s and kind = %s"
        ).format(table)
        # The oldest withdrawal of the workflow to the watched account and currency arrived.
        self._arrived = sql.SQL(
            "delete from {t} where ctid = (select w.ctid from {t} w join {t} d"
            " on d.workflow_id = w.workflow_id and d.to_account = w.to_account"
            " and d.currency = w.currency"
            " where d.workflow_id = %s and d.task_index = %s and d.kind = %s"
            " and w.kind = %s order by w.task_index limit 1)"
        ).format(t=table)

    async def apply_batch(self, conn: AsyncConnection[Any], events: list[RecordedEvent]) -> None:
        # Moves of withdrawals and transfers touch only their own task's row, so between two
        # deposit moves (which match rows across tasks) they are sent as a few multi-row
        # statements: the n-th move of every task in one round, rounds in order. Deposit moves
        # go one by one, in their place. Pipelined: no statement needs another's result.
        async with conn.pipeline(), conn.cursor() as cur:
            rounds: dict[tuple[str, int], list[tuple[str, tuple[Any, ...]]]] = {}
            for event in events:
                if event.type != TaskStateChanged.type_name:
                    continue
                data = event.data
                kind = data["kind"]
                workflow_id = workflow_id_of(event.stream_id)
                if kind == K.DEPOSIT:
                    await self._flush(cur, rounds)
                    await self._deposit(cur, event, workflow_id)
                    continue
                if kind in CLOSING:
                    move = self._move(event, workflow_id)
                    if move is not None:
                        rounds.setdefault((workflow_id, data["task_index"]), []).append(move)
            await self._flush(cur, rounds)

    def _move(self, event: RecordedEvent, workflow_id: str) -> tuple[str, tuple[Any, ...]] | None:
        data = event.data
        kind, dest, index = data["kind"], data["dest"], data["task_index"]
        if dest in CLOSING[kind] or data["trigger"] == TaskTrigger.RESET:
            return "close", (workflow_id, index)
        if dest == S.SUBMITTING:
            params = data.get("request_params") or {}
            return "open", (workflow_id, index, kind, params.get("from_account"),
                            params.get("to_account"), params.get("currency"),
                            _amount(params, event), dest, event.recorded_at, event.version)
        if dest in IN_TRANSIT:
            # The status follows the task; the amount is as requested until the exchange says
            # what the destination will be credited (a withdrawal's `received`: less the fee
            # where the fee is counted inside the amount), then that.
            return "status", (workflow_id, index, dest, event.version, _received(data))
        return None

    async def _flush(
        self, cur: Any, moves: dict[tuple[str, int], list[tuple[str, tuple[Any, ...]]]]
    ) -> None:
        table = sql.Identifier(self.schema, "exposure_items")
        depth = max((len(m) for m in moves.values()), default=0)
        for n in range(depth):
            by_kind: dict[str, list[tuple[Any, ...]]] = {}
            for task_moves in moves.values():
                if n < len(task_moves):
                    what, values = task_moves[n]
                    by_kind.setdefault(what, []).append(values)
            for what, rows in by_kind.items():
                await cur.execute(_statement(what, table, len(rows)),
                                  [value for row in rows for value in row])
        moves.clear()

    async def _deposit(self, cur: Any, event: RecordedEvent, workflow_id: str) -> None:
        # The deposit's account and currency come with its first move (`watch`); later moves
        # do not repeat them, so the watch is kept as a zero-amount row until it ends.
        data = event.data
        index = data["task_index"]
        if data["dest"] == S.REQUESTED and data["trigger"] == TaskTrigger.WATCH:
            params = data.get("request_params") or {}
            await cur.execute(
                self._open,
                (workflow_id, index, K.DEPOSIT, None, params.get("account"),
                 params.get("currency"), Decimal(0), "watching", event.recorded_at,
                 event.version),
            )
        elif data["dest"] in TASK_TERMINAL:
            if data["dest"] == S.DONE:
                await cur.execute(self._arrived, (workflow_id, index, K.DEPOSIT, K.WITHDRAW))
            await cur.execute(self._watched, (workflow_id, index, K.DEPOSIT))


_OPEN_COLUMNS = ("workflow_id, task_index, kind, from_account, to_account, currency, amount,"
                 " status, since, last_version")


def _statement(what: str, table: sql.Identifier, rows: int) -> sql.Composed:
    """One statement doing `what` (open, status, close) for `rows` distinct tasks."""
    if what == "open":
        row = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * 10))
        return sql.SQL(
            "insert into {t} (" + _OPEN_COLUMNS + ") values {v}"
            " on conflict (workflow_id, task_index) do update set status = excluded.status,"
            " amount = excluded.amount, last_version = excluded.last_version"
            " where {t}.last_version < excluded.last_version"
        ).format(t=table, v=sql.SQL(", ").join([row] * rows))
    if what == "status":
        values = sql.SQL(", ").join(
            [sql.SQL("(%s::uuid, %s::int, %s::text, %s::int, %s::numeric)")] * rows)
        return sql.SQL(
            "update {t} e set status = v.status, last_version = v.version,"
            " amount = coalesce(v.amount, e.amount) from (values {v})"
            " v(workflow_id, task_index, status, version, amount)"
            " where e.workflow_id = v.workflow_id"
            " and e.task_index = v.task_index and e.last_version < v.version"
        ).format(t=table, v=values)
    values = sql.SQL(", ").join([sql.SQL("(%s::uuid, %s::int)")] * rows)
    return sql.SQL(
        "delete from {t} e using (values {v}) v(workflow_id, task_index)"
        " where e.workflow_id = v.workflow_id and e.task_index = v.task_index"
    ).format(t=table, v=values)


def _received(data: dict[str, Any]) -> Decimal | None:
    """What a withdrawal's move reports the destination will be credited, if it does."""
    if data["kind"] != K.WITHDRAW:
        return None
    result = (data.get("refresh_result") or {}).get("result")
    if not isinstance(result, dict):
        return None
    try:
        received = Decimal(str(result["received"]))
    except (KeyError, InvalidOperation):
        return None
    return received if received.is_finite() and received > 0 else None


def _amount(params: dict[str, Any], event: RecordedEvent) -> Decimal:
    try:
        return Decimal(str(params["amount"]))
    except (KeyError, InvalidOperation) as e:
        raise ProjectionError(
            f"{event.stream_id} v{event.version}: a {event.data['kind']} entering submitting"
            " must carry request_params.amount"
        ) from e


# -- reading the live read model (`rebalancer exposure`) -------------------------------------

_ITEMS = (
    "select e.to_account as account, e.currency, e.workflow_id::text as workflow_id,"
    " w.spec_name, w.state as workflow_state, e.task_index, w.tasks -> e.task_index ->> 'name'"
    " as task, e.kind, e.from_account, e.amount, e.status, e.since"
    " from {items} e left join {workflows} w on w.workflow_id = e.workflow_id"
    " where e.kind <> 'deposit'"
    " order by e.to_account, e.currency, e.since, e.workflow_id, e.task_index"
)
_TOTALS = "select account, currency, amount, items, oldest from {} order by account, currency"
_REMAINDERS = (
    "select r ->> 'account' as account, r ->> 'currency' as currency,"
    " (r ->> 'amount')::numeric as amount, r ->> 'reason' as reason, r ->> 'task' as task,"
    " w.workflow_id::text as workflow_id, w.spec_name, w.state as workflow_state, w.updated_at"
    " from {} w cross join lateral jsonb_array_elements(coalesce(w.remainders, '[]')) r"
    " order by 1, 2, w.updated_at, w.workflow_id"
)


async def read_exposure(store: EventStore, schema: str = "public") -> dict[str, Any]:
    """Money in transit by workflow and its totals per account and currency (the `exposure`
    view), and remainders left behind per account, from the live read models."""
    items = await store.fetch_dicts(sql.SQL(_ITEMS).format(
        items=sql.Identifier(schema, "exposure_items"),
        workflows=sql.Identifier(schema, "workflows")), ())
    totals = await store.fetch_dicts(
        sql.SQL(_TOTALS).format(sql.Identifier(schema, "exposure")), ())
    left = await store.fetch_dicts(
        sql.SQL(_REMAINDERS).format(sql.Identifier(schema, "workflows")), ())
    left_totals: dict[tuple[str, str], dict[str, Any]] = {}
    for row in left:
        key = (row["account"], row["currency"])
        entry = left_totals.setdefault(key, {"account": row["account"],
                                             "currency": row["currency"],
                                             "amount": Decimal(0), "items": 0})
        entry["amount"] += row["amount"]
        entry["items"] += 1
    return {"in_transit": items, "totals": totals, "remainders": left,
            "remainder_totals": list(left_totals.values())}
