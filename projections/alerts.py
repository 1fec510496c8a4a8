"""The `alerts` read model: one row per occurrence of a condition operators must hear about.

A failed workflow and every escalation of a task (stuck past its deadline, or an outcome
nobody can establish) are occurrences, keyed so that a re-delivered event or a rebuild never
fires the same alert twice. `relay_lag` occurrences are raised by the service into
`service_alerts` (no event describes them, so they are not part of what a rebuild makes).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from events.catalogue import TaskStateChanged, WorkflowStateChanged
from events.store import EventStore, RecordedEvent
from events.vocabulary import TaskTrigger, WorkflowState
from projections.workflows import workflow_id_of


class AlertsProjection:
    name = "alerts"
    tables: tuple[str, ...] = ("alerts",)

    def __init__(self, schema: str = "public") -> None:
        self.schema = schema
        self._insert = sql.SQL(
            "insert into {} (key, kind, workflow_id, task, message, since, details)"
            " values (%s, %s, %s, %s, %s, %s, %s) on conflict (key) do nothing"
        ).format(sql.Identifier(schema, "alerts"))

    async def apply_batch(self, conn: AsyncConnection[Any], events: list[RecordedEvent]) -> None:
        rows = [row for event in events if (row := alert_for(event)) is not None]
        if rows:
            async with conn.cursor() as cur:
                await cur.executemany(self._insert, rows)


def alert_for(event: RecordedEvent) -> tuple[Any, ...] | None:
    """The alert row an event raises, or None."""
    data = event.data
    workflow_id = workflow_id_of(event.stream_id)
    key = f"{workflow_id}:v{event.version}"
    if event.type == WorkflowStateChanged.type_name and data["dest"] == WorkflowState.FAILED:
        return (f"workflow_failed:{key}", "workflow_failed", workflow_id, None,
                data.get("reason") or "workflow failed", event.recorded_at, None)
    if event.type == TaskStateChanged.type_name and data["trigger"] == TaskTrigger.ESCALATE:
        error = data.get("error") or {}
        kind = "task_stuck" if error.get("code") == "deadline" else "needs_attention"
        # The candidates and the commands that settle it travel with the alert, and a partial
        # fill's figures (rebalancer/tasks/partial.py).
        details = {k: error[k] for k in ("candidates", "commands") if error.get(k)}
        details.update(partial_fill_details(data))
        return (f"{kind}:{key}", kind, workflow_id, data["task_name"],
                error.get("message") or "needs attention", event.recorded_at,
                Jsonb(details) if details else None)
    if event.type == TaskStateChanged.type_name and data["trigger"] in PARTIAL_LEVELS:
        found = partial_fill_details(data)
        if found:
            error = data.get("error") or {}
            level = PARTIAL_LEVELS[data["trigger"]]
            message = error.get("message") or found["partial_fill"].get("message") or (
                f"{data['task_name']} filled less than planned")
            return (f"partial_fill:{key}", "partial_fill", workflow_id, data["task_name"],
                    message, event.recorded_at, Jsonb({"level": level, **found}))
    return None


# A trade that ended below its filled fraction: carried on (`on_partial: continue`) is a
# warning, failed (`fail`) an error; `needs_attention` raises the needs_attention alert instead.
PARTIAL_LEVELS = {TaskTrigger.COMPLETE: "warning", TaskTrigger.FAIL: "error"}
_FIGURES = ("amount_unit", "amount_currency", "planned_amount", "filled_amount",
            "unfilled_amount", "filled_fraction")


def partial_fill_details(data: dict[str, Any]) -> dict[str, Any]:
    """A partial fill's figures, policy and remainders from a trade's move; {} for any other."""
    extra = (data.get("refresh_result") or {}).get("extra")
    if data.get("kind") != "trade" or not isinstance(extra, dict):
        return {}
    record = extra.get("partial_fill")
    if not isinstance(record, dict):
        return {}
    return {"partial_fill": {**record, **{k: extra.get(k) for k in _FIGURES}},
            "remainders": extra.get("remainders") or []}


# -- reading and delivering -------------------------------------------------------------------

_COLUMNS = "a.key, a.kind, a.workflow_id::text, a.task, a.message, a.since, a.details"
# Alerts from events and alerts raised by the service itself, read as one list.
_ALL = "(select * from alerts union all select * from service_alerts) a"


async def pending_alerts(store: EventStore, limit: int = 100) -> list[dict[str, Any]]:
    """Alerts not yet delivered, oldest first."""
    async with store.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"select {_COLUMNS} from {_ALL} left join alert_deliveries d on d.key = a.key"
            " where d.key is null order by a.since, a.key limit %s",
            (limit,),
        )
        return await cur.fetchall()


async def mark_delivered(store: EventStore, *keys: str) -> None:
    """Record these alerts as delivered (one statement for all of them)."""
    async with store.connection() as conn:
        await conn.execute(
            "insert into alert_deliveries (key) select unnest(%s::text[])"
            " on conflict (key) do nothing", (list(keys),)
        )


async def raise_alert(
    store: EventStore, key: str, kind: str, message: str, since: datetime,
    workflow_id: str | None = None, task: str | None = None,
) -> bool:
    """Record an occurrence that no event describes (relay_lag); False if it was known."""
    async with store.connection() as conn:
        cur = await conn.execute(
            "insert into service_alerts (key, kind, workflow_id, task, message, since)"
            " values (%s, %s, %s, %s, %s, %s) on conflict (key) do nothing returning key",
            (key, kind, workflow_id, task, message, since),
        )
        return await cur.fetchone() is not None


async def list_alerts(store: EventStore, limit: int = 50) -> list[dict[str, Any]]:
    """The newest alerts with whether each was delivered."""
    async with store.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"select {_COLUMNS}, d.published_at from {_ALL}"
            " left join alert_deliveries d on d.key = a.key"
            " order by a.since desc, a.key limit %s",
            (limit,),
        )
        return await cur.fetchall()
