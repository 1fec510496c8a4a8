"""What the store and the read models say: status, history, replay (and --verify), audit, alerts."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from events.catalogue import TaskStateChanged, WorkflowCreated, WorkflowStateChanged
from events.vocabulary import WorkflowState
from rebalancer.cli.common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    UsageError,
    database_url,
    nats_url,
    stream_id_of,
    with_store,
)
from rebalancer.cli.format import (
    error_text,
    json_default,
    key_fields,
    print_json,
    short,
    table,
    when,
)
from rebalancer.cli.ids import resolve_workflow_id
from rebalancer.settings import Settings, chain_key_path

if TYPE_CHECKING:
    from events.store import EventStore, RecordedEvent
    from projections.replay import Difference
    from projections.workflows import TaskView, WorkflowView


def streams_audit(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.audit import run_audit

    # `workflow-<id>` (a stream id, as audit reports print it) is taken as it is.
    workflow_id = args.workflow_id
    if workflow_id is not None and not workflow_id.strip().startswith("workflow-"):
        workflow_id = resolve_workflow_id(settings, workflow_id)
    url, reason = _audit_nats_url(args, settings)
    status, text = asyncio.run(run_audit(
        database_url(settings), workflow_id, args.json,
        nats_url=url, chain_key_file=chain_key_path(settings),
        connect_timeout=settings.connect_timeout, no_nats_reason=reason,
    ))
    print(text)
    return status


def _audit_nats_url(args: argparse.Namespace, settings: Settings) -> tuple[str | None, str]:
    """The NATS whose JetStream copy the audit reads, None to skip it (--no-nats, or a
    database given without a NATS: the embedded one would hold another store's copy), and
    the reason said when it is skipped."""
    if args.no_nats:
        return None, "--no-nats"
    if settings.database_url and not settings.nats_url:
        return None, "REBALANCER_NATS_URL is not set"
    return nats_url(settings), ""


def workflow_history(args: argparse.Namespace, settings: Settings) -> int:
    workflow_id = resolve_workflow_id(settings, args.workflow_id)
    events = with_store(settings, lambda store: store.read_stream(stream_id_of(workflow_id)))
    if not events:
        raise UsageError(f"no workflow {workflow_id}")
    if args.json:
        print_json([_event_json(event) for event in events])
        return EXIT_OK
    print(f"workflow {workflow_id}: {len(events)} events")
    print(
        table(
            ("recorded_at", "v", "task", "trigger", "move", "details"),
            (event_row(event) for event in events),
        )
    )
    return EXIT_OK


def _event_json(event: RecordedEvent) -> dict[str, Any]:
    return {
        "position": event.position, "stream_id": event.stream_id, "version": event.version,
        "type": event.type, "schema_version": event.schema_version, "data": event.data,
        "metadata": event.metadata, "recorded_at": event.recorded_at.isoformat(),
    }


def event_row(event: RecordedEvent) -> tuple[object, ...]:
    data = event.data
    task = data.get("task_name") or "_workflow"
    if event.type == WorkflowCreated.type_name:
        params = " ".join(f"{k}={v}" for k, v in (data.get("params") or {}).items())
        return (when(event.recorded_at), event.version, task, "-", "-> created",
                f"spec {data.get('spec_name')}; {params}")
    details = []
    if data.get("reason"):
        details.append(f"reason: {data['reason']}")
    for label, key in (("request", "request_params"), ("result", "request_result"),
                       ("refresh", "refresh_result")):
        fields = key_fields(data.get(key))
        if fields:
            details.append(f"{label}: {fields}")
    if data.get("error"):
        details.append(f"error: {error_text(data['error'])}")
    if event.type not in (WorkflowStateChanged.type_name, TaskStateChanged.type_name):
        details.insert(0, event.type)
    move = f"{data.get('source', '')} -> {data.get('dest', '')}" if "dest" in data else "-"
    return (when(event.recorded_at), event.version, task, data.get("trigger") or "-", move,
            "; ".join(details))


def workflow_status(args: argparse.Namespace, settings: Settings) -> int:
    if args.alerts:
        return _list_alerts(args, settings)
    if args.workflow_id is None:
        if args.at is not None:
            raise UsageError("--at needs a WORKFLOW_ID")
        return _list_workflows(args, settings)
    if args.state is not None:
        raise UsageError("--state filters the list; leave it out with a WORKFLOW_ID")
    workflow_id = resolve_workflow_id(settings, args.workflow_id)
    view, note = with_store(settings, lambda store: load_view(store, workflow_id, args.at))
    if args.json:
        if note:
            print(f"rebalancer: {note}", file=sys.stderr)
        print_json(asdict(view))
    else:
        _print_view(view, note)
    return EXIT_OK


async def load_view(
    store: EventStore, workflow_id: str, at: int | None
) -> tuple[WorkflowView, str | None]:
    """The view to show and a note saying where it came from when not the read model."""
    from projections.workflows import fold, read_workflow

    stream_id = stream_id_of(workflow_id)
    version = await store.stream_version(stream_id)
    if at is not None:
        if version == 0:
            raise UsageError(f"no workflow {workflow_id}")
        if at > version:
            raise UsageError(
                f"--at {at}: workflow {workflow_id} has {version} events (versions 1 to {version})"
            )
        view = fold(await store.read_stream(stream_id, up_to_version=at))
        assert view is not None  # at >= 1 and the stream has that event
        return view, f"as of version {at}, recorded at {when(view.updated_at)}"
    live = await read_workflow(store, workflow_id)
    if live is not None:
        note = None
        if live.version < version:
            note = f"the workflows read model is behind: at version {live.version} of {version}"
        return live, note
    if version == 0:
        raise UsageError(f"no workflow {workflow_id}")
    view = fold(await store.read_stream(stream_id))
    assert view is not None
    return view, (
        f"not in the workflows read model yet (its projection is behind);"
        f" folded from the {version} events"
    )


def _print_view(view: WorkflowView, note: str | None) -> None:
    print(f"workflow {view.workflow_id}  {view.spec_name}")
    if note:
        print(note)
    state = view.state + (f" ({view.reason})" if view.reason else "")
    current = view.current_task
    print(f"state     {state}")
    if current is not None and view.tasks:
        print(f"task      {current.index} {current.name} ({current.state})")
    print("params    " + " ".join(f"{k}={v}" for k, v in view.params.items()))
    print(f"version   {view.version}, created {when(view.created_at)},"
          f" updated {when(view.updated_at)}")
    if view.error:
        print(f"error     {view.error.get('task', '?')}: {error_text(view.error)}")
    print(
        table(
            ("#", "task", "kind", "state", "updated_at", "result"),
            (_task_row(task) for task in view.tasks),
        )
    )
    from rebalancer.cli.money import view_money_lines

    for line in view_money_lines(view):
        print(line)
    for task in view.tasks:
        print(attention_text(task), end="")


def attention_text(task: TaskView) -> str:
    """Under a task that needs attention: the candidates its error lists and the commands that
    would settle it (rebalancer/tasks/base.py `attention`); empty for any other task."""
    error = task.error or {}
    if task.state != "needs_attention" or not (error.get("candidates") or error.get("commands")):
        return ""
    # A partial fill (rebalancer/tasks/partial.py) lists commands and no candidates.
    lines = [f"attention {task.name}" + (": candidates" if error.get("candidates") else "")]
    for c in error.get("candidates") or []:
        claimed = c.get("claimed_by_workflow")
        lines.append(f"  id {c.get('id')}  txid {c.get('txid')}  amount {c.get('amount')}"
                     f"  at {c.get('at')}  "
                     + (f"claimed by workflow {claimed}" if claimed else "unclaimed"))
    lines.append("  settle with one of:")
    lines.extend(f"    {command}" for command in error.get("commands") or [])
    return "\n".join(lines) + "\n"


def _task_row(task: TaskView) -> tuple[object, ...]:
    result = (
        key_fields(task.refresh_result) or key_fields(task.request_result)
        or key_fields(task.request_params)
    )
    if task.error:
        result = "; ".join(filter(None, [result, f"error: {error_text(task.error)}"]))
    return (task.index, task.name, task.kind, task.state, when(task.updated_at), result)


def _list_workflows(args: argparse.Namespace, settings: Settings) -> int:
    from projections.workflows import list_workflows

    if args.state is not None and args.state not in set(WorkflowState):
        raise UsageError(
            f"--state {args.state}: not a workflow state ({', '.join(WorkflowState)})"
        )
    found = with_store(
        settings, lambda store: list_workflows(store, state=args.state, limit=args.limit)
    )
    if args.json:
        print_json([asdict(summary) for summary in found])
        return EXIT_OK
    if not found:
        print("no workflows" + (f" in state {args.state}" if args.state else ""))
        return EXIT_OK
    print(
        table(
            ("workflow_id", "spec", "state", "task", "updated_at"),
            (
                (w.workflow_id, w.spec_name, w.state,
                 "-" if w.current_task is None else f"{w.current_task} {w.current_task_name}",
                 when(w.updated_at))
                for w in found
            ),
        )
    )
    return EXIT_OK


def _list_alerts(args: argparse.Namespace, settings: Settings) -> int:
    from projections.alerts import list_alerts

    found = with_store(settings, lambda store: list_alerts(store, limit=args.limit))
    if args.json:
        print(json.dumps(found, default=json_default))
        return EXIT_OK
    if not found:
        print("no alerts")
    for alert in found:
        sent = "sent" if alert["published_at"] else "pending"
        where = " ".join(str(x) for x in (alert["workflow_id"], alert["task"]) if x)
        print(f"{alert['since']:%Y-%m-%d %H:%M:%S} {alert['kind']:<16} {sent:<7} {where}:"
              f" {alert['message']}")
    return EXIT_OK


def read_models_replay(args: argparse.Namespace, settings: Settings) -> int:
    if args.verify:
        return _verify_read_models(args, settings)
    from projections.replay import rebuild
    from projections.runner import ProjectionRunner, default_projections
    from rebalancer.audit import audit_database, format_report, record_forced_replay

    # A rebuild forgets what the read models saw (the audit's missing_tail evidence): it runs
    # only over an intact audit, or when told --force, and then leaves a record that it did.
    url, reason = _audit_nats_url(args, settings)
    report = asyncio.run(audit_database(
        database_url(settings), None, nats_url=url, chain_key_file=chain_key_path(settings),
        connect_timeout=settings.connect_timeout, no_nats_reason=reason,
    ))
    if not report.ok and not args.force:
        print(format_report(report), file=sys.stderr)
        print(f"rebalancer: replay: refused: the audit found {len(report.findings)} problem(s)"
              f" in {', '.join(report.bad_streams)}; a rebuild would erase evidence"
              " (`rebalancer audit` for details, --force to rebuild anyway, recorded)",
              file=sys.stderr)
        return EXIT_CHECK_FAILED

    async def run(store: EventStore) -> list[dict[str, Any]]:
        if not report.ok:
            await record_forced_replay(store, report)
        done = []
        for projection in default_projections():
            started = time.perf_counter()
            applied = await rebuild(store, [projection])
            done.append({"name": projection.name, "events_applied": applied,
                         "seconds": round(time.perf_counter() - started, 3), "error": None})
        for entry, status in zip(
            done, await ProjectionRunner(store, default_projections()).status(), strict=True
        ):
            entry["error"] = status.error
        return done

    started = time.perf_counter()
    done = with_store(settings, run)
    seconds = round(time.perf_counter() - started, 3)
    failed = [entry for entry in done if entry["error"]]
    if args.json:
        print_json({"projections": done, "seconds": seconds, "ok": not failed,
                    "forced_over_findings": len(report.findings)})
    else:
        for entry in done:
            print(f"{entry['name']:<12} {entry['events_applied']:>9} events"
                  f"  {entry['seconds']:.2f} s")
            if entry["error"]:
                print(f"  stopped: {entry['error']}")
        outcome = "stopped early" if failed else "rebuilt"
        print(f"{outcome}: {len(done)} read models in {seconds:.2f} s")
        if not report.ok:
            print(f"forced over a failed audit ({len(report.findings)} findings in"
                  f" {', '.join(report.bad_streams)}); recorded in replay_log")
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def _verify_read_models(args: argparse.Namespace, settings: Settings) -> int:
    from projections.replay import compare

    found = with_store(settings, compare)
    if args.json:
        print_json({
            "ok": found.ok,
            "differences": [d.to_json() for d in found.differences],
            "rows": found.rows,
            "checkpoints": {name: cp._asdict() for name, cp in found.checkpoints.items()},
            "shadow_schema": found.shadow_schema,
        })
    elif found.ok:
        print(
            f"read models match the events ({found.rows.get('workflows', 0)} workflows,"
            f" {found.rows.get('exposure_items', 0)} exposure items)"
        )
    else:
        for difference in found.differences:
            print(_difference_line(difference))
        print(
            f"{len(found.differences)} difference(s) between the live read models and a rebuild"
            f" from the events (the rebuild is kept in schema {found.shadow_schema})"
        )
    return EXIT_OK if found.ok else EXIT_CHECK_FAILED


def _difference_line(d: Difference) -> str:
    where = f"{d.table} {d.key_text}"
    if d.kind == "projection_stopped":
        name = dict(d.key).get("name", d.key_text)
        if d.live is not None:
            return f"projection {name}: the live one is stopped by a poison event: {d.live}"
        return f"projection {name}: the rebuild stopped where the live one did not: {d.rebuilt}"
    if d.kind == "only_live":
        return f"{where}: only in the live read model ({_row_summary(d.live)})"
    if d.kind == "only_rebuilt":
        return f"{where}: missing from the live read model (rebuilt: {_row_summary(d.rebuilt)})"
    return f"{where}, {d.column}: {short(d.live)} -> {short(d.rebuilt)}"


def _row_summary(row: dict[str, Any]) -> str:
    scalars = [
        f"{k}={short(v, 40)}" for k, v in row.items()
        if not isinstance(v, dict | list) and k not in ("workflow_id", "task_index")
    ]
    text = " ".join(scalars)
    return text if len(text) <= 160 else text[:159] + "…"
