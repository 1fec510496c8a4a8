"""Audit of stored streams: hash chains, version sequences, decoding and machine legality, and
the table against the JetStream copy and the keyed chain anchors (rebalancer/audit_copy.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from psycopg import sql

from events.catalogue import (
    Catalogue,
    TaskStateChanged,
    WorkflowCreated,
    WorkflowStateChanged,
)
from events.catalogue import catalogue as default_catalogue
from events.errors import UndefinedTableError
from events.store import STREAM_ID_PATTERN, EventStore, RecordedEvent, StreamProblem
from events.vocabulary import TaskKind
from rebalancer.audit_copy import OutsideRecord, read_outside
from rebalancer.audit_findings import CHECKS, Finding
from rebalancer.errors import RebalancerError
from rebalancer.workflow import StreamFold, TaskRecord

STREAM_PAGE: Final = 500  # stream ids fetched per query when auditing every stream
_KINDS: Final = frozenset(kind.value for kind in TaskKind)


class AuditInputError(RebalancerError, ValueError):
    """The workflow id to audit is not a UUID or names no stream (a usage error: exit 2)."""


@dataclass
class AuditReport:
    """What an audit looked at and everything it found wrong."""

    streams: int
    events: int
    findings: list[Finding]
    # What the JetStream copy and the anchors were: checked, or why not.
    outside: str = "not checked against the JetStream copy"

    @property
    def bad_streams(self) -> list[str]:
        """The ids of the streams with at least one finding, sorted."""
        return sorted({finding.stream_id for finding in self.findings})

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "streams": self.streams,
            "events": self.events,
            "bad_streams": self.bad_streams,
            "findings": [asdict(finding) for finding in self.findings],
            "jetstream": self.outside,
        }


async def audit(
    store: EventStore,
    workflow_id: str | None = None,
    *,
    read_model_schema: str = "public",
    outside: OutsideRecord | None = None,
) -> AuditReport:
    """Audit one workflow's stream, or every stream in the store.

    Streams are read one at a time, so memory holds one stream, never the whole store. Raises
    AuditInputError for a workflow id that is not a UUID or has neither events nor a read-model
    row, StoreUnavailableError / StoreQueryError when the database fails.

    `outside` is the JetStream copy and the anchors, read before the table (`read_outside`):
    whatever the relay published was stored before, so the copy is never ahead of an intact
    table. Streams it names that the table lacks altogether are findings too.
    """
    read_model = _ReadModel(store, read_model_schema)
    outside = outside or OutsideRecord.unchecked("no NATS given")
    report = AuditReport(streams=0, events=0, findings=list(outside.unreadable),
                         outside=outside.note)
    if workflow_id is not None:
        stream_id = stream_id_of(workflow_id)
        # The read model is read before the stream: a version it saw was already stored then,
        # and an append racing the audit can only lengthen the stream, never fake a lost tail.
        seen = await read_model.versions([stream_id])
        known_outside = outside.has(stream_id)
        count, findings = await _audit_stream(store, stream_id, seen.get(stream_id), outside)
        if count == 0 and stream_id not in seen and not known_outside:
            raise AuditInputError(f"workflow {workflow_id} has no events")
        report.streams, report.events = 1, count
        report.findings.extend(findings)
        return report
    async for page in _stream_pages(store):
        seen = await read_model.versions(page)
        for stream_id in page:
            count, findings = await _audit_stream(store, stream_id, seen.get(stream_id), outside)
            report.streams += 1
            report.events += count
            report.findings.extend(findings)
    # Workflows the read model knows but whose every event is gone: no stream page names them.
    orphans = await read_model.orphans()
    for stream_id, version in orphans:
        report.streams += 1
        report.findings.append(_missing_tail(stream_id, version, 0))
    if outside.checked and outside.event_count == 0:
        report.findings.extend(await _copy_gone(store))
    # Streams only the copy or the anchors still know (the read-model row deleted too).
    orphan_ids = {stream_id for stream_id, _ in orphans}
    for stream_id, findings in outside.leftovers():
        report.streams += stream_id not in orphan_ids
        report.findings.extend(findings)
    return report


def stream_id_of(workflow_id: str) -> str:
    """`workflow-<uuid>` for a workflow id (the bare UUID, or the stream id itself).

    Raises AuditInputError when it is not a UUID.
    """
    text = workflow_id.strip().removeprefix("workflow-")
    try:
        return f"workflow-{uuid.UUID(text)}"
    except ValueError:
        raise AuditInputError(f"workflow id {workflow_id!r} is not a UUID") from None


def check_events(
    stream_id: str,
    events: Sequence[RecordedEvent],
    catalogue: Catalogue | None = None,
) -> list[Finding]:
    """Decode every event and replay the machines over one stream's stored events.

    Pure: no database. Checking goes on after a bad event, from the state that event stored,
    so one run names every bad event rather than the first.
    """
    replay = _Replay(stream_id, default_catalogue if catalogue is None else catalogue)
    for event in events:
        replay.feed(event)
    return replay.findings


def format_report(report: AuditReport) -> str:
    """A summary line, then one line per finding."""
    head = f"audited {_count(report.streams, 'stream')}, {_count(report.events, 'event')}"
    if report.ok:
        return f"{head}: all intact\n{report.outside}"
    bad = len(report.bad_streams)
    lines = [f"{head}: {_count(len(report.findings), 'finding')} in {_count(bad, 'stream')}"]
    lines.extend(finding.line() for finding in report.findings)
    lines.append(report.outside)
    return "\n".join(lines)


async def run_audit(
    database_url: str, workflow_id: str | None, as_json: bool, connect_timeout: float = 10.0,
    *, nats_url: str | None = None, chain_key_file: Path | None = None,
    no_nats_reason: str = "no NATS given",
) -> tuple[int, str]:
    """Open the store, audit, and return (exit status, output): 0 when intact, 1 otherwise.

    With `nats_url`, the table is also checked against the JetStream copy and the anchors
    (their MACs with the key in `chain_key_file`); without it, or with NATS unreachable, the
    output says it was not. Raises AuditInputError for a bad or unknown workflow id,
    StoreUnavailableError when the database cannot be reached.
    """
    report = await audit_database(database_url, workflow_id, nats_url=nats_url,
                                  chain_key_file=chain_key_file,
                                  connect_timeout=connect_timeout,
                                  no_nats_reason=no_nats_reason)
    text = json.dumps(report.to_json(), indent=2) if as_json else format_report(report)
    return (0 if report.ok else 1), text


async def audit_database(
    database_url: str, workflow_id: str | None, *, nats_url: str | None = None,
    chain_key_file: Path | None = None, connect_timeout: float = 10.0,
    no_nats_reason: str = "no NATS given",
) -> AuditReport:
    """`audit` on a store opened for it, with the JetStream copy read first when `nats_url`
    is given (as `run_audit`, whose errors it raises)."""
    stream_id = None if workflow_id is None else stream_id_of(workflow_id)  # refuse early
    outside = (
        await read_outside(nats_url, stream_id, chain_key_file, connect_timeout=connect_timeout)
        if nats_url is not None else OutsideRecord.unchecked(no_nats_reason)
    )
    async with await EventStore.open(database_url, max_size=2,
                                     connect_timeout=connect_timeout) as store:
        return await audit(store, workflow_id, outside=outside)


async def record_forced_replay(store: EventStore, report: AuditReport) -> None:
    """Leave a row in replay_log: a rebuild ran over this failed audit (`replay --force`)."""
    async with store.connection() as conn:
        await conn.execute(
            "insert into replay_log (action, findings, bad_streams, details)"
            " values ('replay --force', %s, %s, %s::jsonb)",
            (len(report.findings), report.bad_streams,
             json.dumps({"findings": [finding.line() for finding in report.findings][:1000],
                         "jetstream": report.outside})),
        )


async def _copy_gone(store: EventStore) -> list[Finding]:
    # JetStream refuses to delete a message of the copy, not to delete the whole stream: an
    # empty copy after the relay said it published is that (or another NATS than the relay's).
    try:
        rows = await store.fetch_rows(
            "select coalesce(sum(published), 0) from relay_checkpoints", ())
    except UndefinedTableError:
        return []
    published = int(rows[0][0]) if rows else 0
    if not published:
        return []
    return [Finding("REBALANCER_EVENTS", None, None, "jetstream_copy",
                    f"the copy is empty, but the relay recorded {published} published events"
                    " (the stream deleted, or this is not the relay's NATS)")]


# -- one stream ---------------------------------------------------------------------------------


async def _audit_stream(
    store: EventStore, stream_id: str, read_model_version: int | None, outside: OutsideRecord
) -> tuple[int, list[Finding]]:
    findings = [_from_problem(problem) for problem in await store.verify_stream(stream_id)]
    events = await store.read_stream(stream_id)
    if not STREAM_ID_PATTERN.match(stream_id):
        findings.append(
            Finding(stream_id, None, None, "schema", "stream id is not workflow-<uuid>")
        )
    findings.extend(check_events(stream_id, events, store.catalogue))
    last = events[-1].version if events else 0
    if read_model_version is not None and read_model_version > last:
        findings.append(_missing_tail(stream_id, read_model_version, last))
    findings.extend(outside.check(stream_id, events))
    findings.sort(key=_order)
    return len(events), findings


def _from_problem(problem: StreamProblem) -> Finding:
    # verify_stream reports two kinds of problem and tells them apart only by wording.
    check = "versions" if problem.message.startswith("version ") else "hash_chain"
    return Finding(problem.stream_id, problem.version, problem.position, check, problem.message)


def _missing_tail(stream_id: str, seen: int, last: int) -> Finding:
    # Deleting a stream's last event leaves a chain that still verifies: only a reader that
    # saw the event can tell. The finding is placed on the first missing version.
    ends = f"the stream ends at {last}" if last else "the stream has no events"
    return Finding(
        stream_id, last + 1, None, "missing_tail", f"read model saw version {seen}, {ends}"
    )


def _order(finding: Finding) -> tuple[bool, int, int]:
    return (finding.version is None, finding.version or 0, CHECKS.index(finding.check))


class _Replay:
    """Feeds one stream's events through the catalogue and the aggregate's fold in collect mode.

    The legality of every move is the fold's (`StreamFold`, the same code the worker folds
    with); what only an audit asks (does the stream begin right, does the spec read, does each
    event decode) is checked here.
    """

    def __init__(self, stream_id: str, catalogue: Catalogue) -> None:
        self.stream_id = stream_id
        self.catalogue = catalogue
        self.findings: list[Finding] = []
        self.created_version: int | None = None
        self.event: RecordedEvent | None = None  # the event being fed, for the findings
        self.started = False
        self.fold = self._new_fold([], None)

    def feed(self, event: RecordedEvent) -> None:
        self.event = event
        self._check_creation(event)
        try:
            decoded = event.decode(self.catalogue)
        except Exception as e:  # an upcaster may fail in any way on bad stored data
            self._add(event, "schema", f"{event.type} does not decode: {e}")
            self.fold.follow_raw(event.type, event.data if isinstance(event.data, dict) else {})
        else:
            if isinstance(decoded, WorkflowCreated):
                if event.version == self.created_version:
                    self._read_spec(event, decoded.spec)
            elif isinstance(decoded, WorkflowStateChanged):
                self.fold.move_workflow(decoded)
            elif isinstance(decoded, TaskStateChanged):
                self.fold.move_task(decoded, event.recorded_at)
        self.fold.version = event.version

    def _new_fold(self, tasks: list[TaskRecord], spec_tasks: int | None) -> StreamFold:
        return StreamFold(stream_id=self.stream_id, tasks=tasks, spec_tasks=spec_tasks,
                          report=self._legality)

    def _legality(self, message: str) -> None:
        assert self.event is not None
        self._add(self.event, "legality", message)

    def _check_creation(self, event: RecordedEvent) -> None:
        is_created = event.type == WorkflowCreated.type_name
        if not self.started:
            self.started = True
            if is_created:
                self.created_version = event.version
            else:
                self._add(event, "legality", f"the stream begins with {event.type}, not "
                          f"{WorkflowCreated.type_name}")
        elif is_created:
            first = f" (the first is v{self.created_version})" if self.created_version else ""
            self._add(event, "legality", f"a second {WorkflowCreated.type_name}{first}")

    def _read_spec(self, event: RecordedEvent, spec: dict[str, Any]) -> None:
        tasks = spec.get("tasks")
        if tasks is None:
            return
        if not isinstance(tasks, list):
            self._add(event, "schema", "spec.tasks is not a list")
            return
        records: list[TaskRecord] = []
        for index, task in enumerate(tasks):
            kind = task.get("kind") if isinstance(task, dict) else None
            name = task.get("name") if isinstance(task, dict) else None
            name = name.lower() if isinstance(name, str) else ""
            if kind in _KINDS:
                records.append(TaskRecord(index, name, TaskKind(kind)))
            else:
                self._add(event, "schema", f"spec task {index} has no known kind ({kind!r})")
                # Its first event names its kind, as for a spec without a task list.
                records.append(TaskRecord(index, "", TaskKind.TRADE, listed=False))
        self.fold = self._new_fold(records, len(records))

    def _add(self, event: RecordedEvent, check: str, message: str) -> None:
        self.findings.append(Finding(self.stream_id, event.version, event.position, check, message))


# -- reading the database -----------------------------------------------------------------------


async def _stream_pages(store: EventStore) -> AsyncIterator[list[str]]:
    """Every stream id in the store, in order, a page at a time (keyset paging)."""
    after = ""
    while True:
        rows = await store.fetch_rows(
            "select distinct stream_id from events where stream_id > %s"
            " order by stream_id limit %s",
            (after, STREAM_PAGE),
        )
        page = [str(row[0]) for row in rows]
        if page:
            yield page
        if len(page) < STREAM_PAGE:
            return
        after = page[-1]


class _ReadModel:
    """The `workflows` read model's last applied version per stream, if the table exists."""

    def __init__(self, store: EventStore, schema: str) -> None:
        self._store = store
        self._table = sql.Identifier(schema, "workflows")
        self._missing = False

    async def versions(self, stream_ids: list[str]) -> dict[str, int]:
        rows = await self._query(
            sql.SQL("select stream_id, version from {} where stream_id = any(%s)").format(
                self._table
            ),
            (stream_ids,),
        )
        return {str(stream_id): int(version) for stream_id, version in rows}

    async def orphans(self) -> list[tuple[str, int]]:
        """Rows whose stream has no events left at all."""
        rows = await self._query(
            sql.SQL(
                "select w.stream_id, w.version from {} w where not exists"
                " (select 1 from events e where e.stream_id = w.stream_id) order by w.stream_id"
            ).format(self._table),
            (),
        )
        return [(str(stream_id), int(version)) for stream_id, version in rows]

    async def _query(self, query: sql.Composed, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self._missing:
            return []
        try:
            return await self._store.fetch_rows(query, params)
        except UndefinedTableError:
            # No read model (projections never set up here): nothing to cross-check against.
            self._missing = True
            return []


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


__all__ = [
    "CHECKS",
    "AuditInputError",
    "AuditReport",
    "Finding",
    "audit",
    "audit_database",
    "check_events",
    "format_report",
    "record_forced_replay",
    "run_audit",
    "stream_id_of",
]
