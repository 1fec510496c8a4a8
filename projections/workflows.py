"""The `workflows` read model: one row per workflow, folded from its events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, sql

from events.catalogue import TaskStateChanged, WorkflowCreated, WorkflowStateChanged
from events.store import EventStore, RecordedEvent
from events.vocabulary import TaskState, WorkflowState
from projections import money


@dataclass
class TaskView:
    """What is known of one task: its state and the results the exchange reported."""

    index: int
    name: str
    kind: str
    state: TaskState = TaskState.CREATED
    trigger: str | None = None
    request_params: dict[str, Any] | None = None
    request_result: dict[str, Any] | None = None
    refresh_result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    updated_at: str | None = None


@dataclass
class WorkflowView:
    """The current state of one workflow, as far as its events up to `version` tell."""

    workflow_id: str
    stream_id: str
    spec_name: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    command_id: str = ""
    state: WorkflowState = WorkflowState.CREATED
    reason: str | None = None
    tasks: list[TaskView] = field(default_factory=list)
    error: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    version: int = 0
    last_position: int = 0
    # Derived from the tasks by `summarize` (projections/money.py), once per batch, not per
    # event: the spec's result, per-trade fills, the effective rate, fees and remainders.
    result: dict[str, Any] = field(default_factory=dict)
    fills: list[dict[str, Any]] = field(default_factory=list)
    rate: dict[str, Any] | None = None
    fees: dict[str, str] = field(default_factory=dict)
    remainders: list[dict[str, Any]] = field(default_factory=list)

    @property
    def current_task(self) -> TaskView | None:
        """The first task not done yet; None once every task is done (or there are none)."""
        return next((t for t in self.tasks if t.state != TaskState.DONE), None)

    def task(self, index: int, name: str, kind: str) -> TaskView:
        while len(self.tasks) <= index:
            self.tasks.append(TaskView(len(self.tasks), "", ""))
        task = self.tasks[index]
        if not task.name:
            task.name, task.kind = name, kind
        return task


class ProjectionError(Exception):
    """An event could not be applied to a read model (a poison event)."""


def workflow_id_of(stream_id: str) -> str:
    return stream_id.removeprefix("workflow-")


def apply(view: WorkflowView | None, event: RecordedEvent) -> WorkflowView:
    """Fold one event into `view` (None before the first); an already-seen version is skipped.

    Raises ProjectionError when the event cannot belong where it stands (e.g. a state change
    before the workflow was created).
    """
    if view is not None and event.version <= view.version:
        return view  # re-delivered: already applied
    data = event.data
    if event.type == WorkflowCreated.type_name:
        if view is not None:
            raise ProjectionError(f"{_where(event)}: WorkflowCreated for an existing workflow")
        view = WorkflowView(
            workflow_id=workflow_id_of(event.stream_id),
            stream_id=event.stream_id,
            spec_name=data["spec_name"],
            spec=data["spec"],
            params=data["params"],
            command_id=data["command_id"],
            created_at=event.recorded_at,
        )
        for index, task in enumerate(data["spec"].get("tasks") or []):
            view.tasks.append(
                TaskView(index, str(task.get("name", "")).lower(), str(task.get("kind", "")))
            )
    elif view is None:
        raise ProjectionError(f"{_where(event)}: {event.type} before WorkflowCreated")
    elif event.type == WorkflowStateChanged.type_name:
        view.state = WorkflowState(data["dest"])
        view.reason = data.get("reason")
    elif event.type == TaskStateChanged.type_name:
        moved = _decode_move(event)
        task = view.task(moved.task_index, moved.task_name, moved.kind)
        moved.merge_into(task)  # the aggregate's merge: the two folds cannot drift apart
        task.trigger = moved.trigger
        task.updated_at = event.recorded_at.isoformat()
        if moved.error is not None:
            view.error = {"task": task.name, **moved.error}
    else:
        raise ProjectionError(f"{_where(event)}: unknown event type {event.type!r}")
    view.version = event.version
    view.last_position = event.position
    view.updated_at = event.recorded_at
    return view


def fold(events: list[RecordedEvent]) -> WorkflowView | None:
    """Fold a whole stream (or its prefix) from nothing, its money figures summarized."""
    view: WorkflowView | None = None
    for event in events:
        view = apply(view, event)
    if view is not None:
        summarize(view)
    return view


def summarize(view: WorkflowView) -> WorkflowView:
    """Set the view's derived money figures from its tasks (see projections/money.py)."""
    view.result = money.evaluate_result(view.spec, view.params, view.tasks)
    view.fills = money.fills(view.tasks)
    view.fees = money.fees(view.tasks)
    view.remainders = money.remainders(view.tasks)
    view.rate = money.rate(view.params, to_amount_of(view), view.tasks)
    return view


def to_amount_of(view: WorkflowView) -> Any:
    """What arrived: the spec result's `to_amount` when the spec declares one, else (a spec
    without it) the last task's recorded amount once the workflow is done."""
    if "to_amount" in (view.spec.get("result") or {}):
        return view.result.get("to_amount")
    last = view.tasks[-1] if view.tasks else None
    if view.state == WorkflowState.DONE and last is not None and last.refresh_result:
        return (last.refresh_result.get("result") or {}).get("amount")
    return None


def _decode_move(event: RecordedEvent) -> TaskStateChanged:
    try:
        decoded = event.decode()
    except Exception as e:  # an upcaster may fail in any way on bad stored data
        raise ProjectionError(f"{_where(event)}: {e}") from e
    assert isinstance(decoded, TaskStateChanged)
    return decoded


def _where(event: RecordedEvent) -> str:
    return f"{event.stream_id} v{event.version} (position {event.position})"


# -- persistence ------------------------------------------------------------------------------

COLUMNS = (
    "workflow_id", "stream_id", "spec_name", "spec", "params", "command_id", "state", "reason",
    "current_task", "current_task_name", "tasks", "error", "from_amount", "from_currency",
    "to_amount", "to_currency", "created_at", "updated_at", "version", "last_position",
    "result", "fills", "rate", "fees", "remainders",  # migration 013
)


def to_row(view: WorkflowView) -> tuple[Any, ...]:
    """The `workflows` row for a view (JSON columns as text, amounts as exact strings)."""
    summarize(view)
    current = view.current_task
    to_amount = money.dec(to_amount_of(view))  # a numeric column: a non-number stays null
    return (
        view.workflow_id, view.stream_id, view.spec_name, json.dumps(view.spec),
        json.dumps(view.params), view.command_id, view.state, view.reason,
        None if current is None else current.index,
        None if current is None else current.name,
        # vars(), not asdict(): asdict deep-copies every nested result on every batch.
        json.dumps([vars(t) for t in view.tasks]),
        None if view.error is None else json.dumps(view.error),
        view.params.get("from_amount"), view.params.get("from_currency"),
        to_amount, view.params.get("to_currency"),
        view.created_at, view.updated_at, view.version, view.last_position,
        json.dumps(view.result), json.dumps(view.fills),
        None if view.rate is None else json.dumps(view.rate),
        json.dumps(view.fees), json.dumps(view.remainders),
    )


def from_row(row: dict[str, Any]) -> WorkflowView:
    """The view stored in a `workflows` row (as read with a dict row factory)."""
    return WorkflowView(
        workflow_id=str(row["workflow_id"]),
        stream_id=row["stream_id"],
        spec_name=row["spec_name"],
        spec=row["spec"],
        params=row["params"],
        command_id=row["command_id"],
        state=WorkflowState(row["state"]),
        reason=row["reason"],
        tasks=[_task_view(t) for t in row["tasks"]],
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        version=row["version"],
        last_position=row["last_position"],
        # Null in a row written before migration 013 (which resets the projection anyway).
        result=row.get("result") or {},
        fills=row.get("fills") or [],
        rate=row.get("rate"),
        fees=row.get("fees") or {},
        remainders=row.get("remainders") or [],
    )


def _task_view(stored: dict[str, Any]) -> TaskView:
    return TaskView(**{**stored, "state": TaskState(stored["state"])})


UPSERT_CHUNK = 500  # rows per statement: 25 parameters each, well under PostgreSQL's 65,535


class WorkflowsProjection:
    """Keeps `<schema>.workflows` in step with the events, one row per workflow."""

    name = "workflows"
    tables: tuple[str, ...] = ("workflows",)

    def __init__(self, schema: str = "public") -> None:
        self.schema = schema
        table = sql.Identifier(schema, "workflows")
        self._select = sql.SQL("select {} from {} where workflow_id = any(%s::uuid[])").format(
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), table
        )
        self._table = table
        self._row = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)))
        self._upserts: dict[int, bytes] = {}

    async def apply_batch(self, conn: AsyncConnection[Any], events: list[RecordedEvent]) -> None:
        """Apply events inside the caller's transaction: each workflow is read and written once."""
        ids = list(dict.fromkeys(workflow_id_of(e.stream_id) for e in events))
        views = await self._load(conn, ids)
        for event in events:
            workflow_id = workflow_id_of(event.stream_id)
            views[workflow_id] = apply(views.get(workflow_id), event)
        rows = [to_row(view) for view in views.values() if view is not None]
        # One multi-row statement per chunk rather than one per workflow (executemany).
        async with conn.cursor() as cur:
            for start in range(0, len(rows), UPSERT_CHUNK):
                chunk = rows[start:start + UPSERT_CHUNK]
                await cur.execute(
                    self._upsert(conn, len(chunk)), [value for row in chunk for value in row]
                )

    def _upsert(self, conn: AsyncConnection[Any], rows: int) -> bytes:
        query = self._upserts.get(rows)
        if query is None:
            query = sql.SQL(
                "insert into {} ({}) values {} on conflict (workflow_id) do update set {}"
            ).format(
                self._table,
                sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
                sql.SQL(", ").join([self._row] * rows),
                sql.SQL(", ").join(
                    sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in COLUMNS[1:]
                ),
            ).as_bytes(conn)
            if rows <= 32:  # the usual sizes, kept; a rebuild's big chunks are composed anew
                self._upserts[rows] = query
        return query

    async def _load(
        self, conn: AsyncConnection[Any], workflow_ids: list[str]
    ) -> dict[str, WorkflowView | None]:
        async with conn.cursor() as cur:
            await cur.execute(self._select, (workflow_ids,))
            rows = await cur.fetchall()
            assert cur.description is not None
            names = [d.name for d in cur.description]
        views: dict[str, WorkflowView | None] = {}
        for row in rows:
            view = from_row(dict(zip(names, row, strict=True)))
            views[view.workflow_id] = view
        return views


# -- reading the live read model (status, queries) ------------------------------------------


@dataclass(frozen=True)
class WorkflowSummary:
    """One line of the workflows list."""

    workflow_id: str
    spec_name: str
    state: str
    current_task: int | None
    current_task_name: str | None
    updated_at: datetime | None
    version: int


async def read_workflow(store: EventStore, workflow_id: str) -> WorkflowView | None:
    """The workflow's row in the live read model, None when the projection has none."""
    query = sql.SQL("select {} from {} where workflow_id = %s").format(
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        sql.Identifier("public", "workflows"),
    )
    rows = await store.fetch_dicts(query, (workflow_id,))
    return from_row(rows[0]) if rows else None


async def list_workflows(
    store: EventStore, *, state: str | None = None, limit: int = 20
) -> list[WorkflowSummary]:
    """The most recently updated workflows of the live read model, optionally in one state."""
    query = sql.SQL(
        "select workflow_id::text, spec_name, state, current_task, current_task_name,"
        " updated_at, version from {} where (%s::text is null or state = %s)"
        " order by updated_at desc nulls last, workflow_id limit %s"
    ).format(sql.Identifier("public", "workflows"))
    rows = await store.fetch_dicts(query, (state, state, limit))
    return [WorkflowSummary(**row) for row in rows]


@dataclass(frozen=True)
class WorkflowRow:
    """One line of the dashboard's list: the summary plus amount, age and the task's state."""

    workflow_id: str
    spec_name: str
    state: str
    from_amount: Any
    from_currency: str | None
    current_task: int | None
    current_task_name: str | None
    current_task_state: str | None
    created_at: datetime | None
    updated_at: datetime | None
    version: int


async def list_workflow_rows(
    store: EventStore, *, state: str | None = None, spec: str | None = None, limit: int = 100
) -> list[WorkflowRow]:
    """The most recently updated workflows, optionally of one state and one spec."""
    query = sql.SQL(
        "select workflow_id::text, spec_name, state, from_amount, from_currency, current_task,"
        " current_task_name, tasks -> current_task ->> 'state' as current_task_state,"
        " created_at, updated_at, version from {}"
        " where (%s::text is null or state = %s) and (%s::text is null or spec_name = %s)"
        " order by updated_at desc nulls last, workflow_id limit %s"
    ).format(sql.Identifier("public", "workflows"))
    rows = await store.fetch_dicts(query, (state, state, spec, spec, limit))
    return [WorkflowRow(**row) for row in rows]


async def spec_names(store: EventStore) -> list[str]:
    """The specs the read model has workflows of (the dashboard's filter)."""
    rows = await store.fetch_rows(
        sql.SQL("select distinct spec_name from {} order by 1").format(
            sql.Identifier("public", "workflows")), ())
    return [row[0] for row in rows]
