"""The `rebalancer` command line: one handler per sub-command, errors turned into one line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from events.errors import EventStoreError
from rebalancer import embedded
from rebalancer.errors import RebalancerError
from rebalancer.settings import Settings

if TYPE_CHECKING:
    from events.store import EventStore, RecordedEvent
    from projections.replay import Difference
    from projections.workflows import TaskView, WorkflowView

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]
T = TypeVar("T")


class UsageError(RebalancerError):
    """The command cannot run as asked (nothing set up yet, missing input): exit status 2."""


# --------------------------------------------------------------------------- infra


def infra_up(args: argparse.Namespace) -> int:
    settings = Settings()
    home = settings.home
    was = embedded.status(home)
    info = embedded.up(home, pg_bin=settings.pg_bin)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
        return EXIT_OK
    pg = "already running" if was["postgresql"] else "started"
    nats = "already running" if was["nats"] else "started"
    print(f"PostgreSQL {pg}: {info.database_url}")
    print(f"  data {info.pg_data_dir}, binaries {info.pg_bin_dir}")
    print(f"NATS {nats}: {info.nats_address} (users operator and subscriber; `infra env`)")
    print(f"  store {info.home / 'nats' / 'store'}")
    print(f"state in {info.home}; `rebalancer infra env` prints the export lines")
    return EXIT_OK


def infra_down(args: argparse.Namespace) -> int:
    stopped = embedded.down(Settings().home)
    print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
    return EXIT_OK


def infra_env(args: argparse.Namespace) -> int:
    home = Settings().home
    info = embedded.load_info(home)
    if info is None:
        raise UsageError(f"no embedded servers under {home.resolve()}; run `rebalancer infra up`")
    running = embedded.status(home)
    if not all(running.values()):
        stopped = " and ".join(name for name, up in running.items() if not up)
        raise UsageError(f"{stopped} not running under {info.home}; run `rebalancer infra up`")
    print(info.exports())
    return EXIT_OK


def infra_status(args: argparse.Namespace) -> int:
    running = embedded.status(Settings().home)
    if args.json:
        print(json.dumps(running))
    else:
        for name, up in running.items():
            print(f"{name}: {'running' if up else 'stopped'}")
    return EXIT_OK


# --------------------------------------------------------------------------- db


def db_migrate(args: argparse.Namespace) -> int:
    # Imported here so the rest of the command line works without the migrations module.
    from events.migrations import migrate

    settings = Settings()
    # Only the database is needed: an explicit URL must not start the embedded servers.
    database_url = settings.database_url or embedded.ensure_urls(settings)[0]
    applied = asyncio.run(migrate(database_url))
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("up to date")
    return EXIT_OK


# --------------------------------------------------------------------------- audit and specs


def streams_audit(args: argparse.Namespace) -> int:
    from rebalancer.audit import run_audit

    status, text = asyncio.run(run_audit(_database_url(), args.workflow_id, args.json))
    print(text)
    return status


def specs_list(args: argparse.Namespace) -> int:
    from rebalancer.accounts import spec_dirs
    from rebalancer.specs.loading import list_specs

    found = list_specs(spec_dirs(Settings().config))
    if args.json:
        print(json.dumps([{"name": n, "description": d, "tasks": t} for n, d, t in found]))
    else:
        width = max((len(n) for n, _, _ in found), default=4)
        for name, description, tasks in found:
            print(f"{name:<{width}}  {tasks} tasks  {description}")
    return EXIT_OK


def specs_validate(args: argparse.Namespace) -> int:
    from rebalancer.accounts import load_accounts
    from rebalancer.specs.loading import validate_file

    try:
        spec = validate_file(Path(args.file), load_accounts(Settings().config))
    except RebalancerError as e:
        # Every problem on its own line: a spec author fixes them all in one go.
        print(f"rebalancer: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: spec {spec.name} is valid ({len(spec.tasks)} tasks)")
    return EXIT_OK


# --------------------------------------------------------------------------- the worker


def worker_serve(args: argparse.Namespace) -> int:
    import logging

    from events.migrations import migrate
    from rebalancer.service import serve

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    if settings.database_url and not settings.nats_url:
        # A worker-only deployment: money moves, nothing is relayed or served over NATS.
        logging.getLogger("rebalancer").warning(
            "REBALANCER_NATS_URL is not set: running without relay, command API and alerts")
        database_url, nats_url = settings.database_url, None
    else:
        database_url, nats_url = embedded.ensure_urls(settings)
    asyncio.run(migrate(database_url))
    asyncio.run(serve(settings, database_url, nats_url, tick=args.tick))
    return EXIT_OK


def workflow_start(args: argparse.Namespace) -> int:
    from rebalancer.accounts import load_accounts
    from rebalancer.service import configured_specs
    from rebalancer.specs.resolution import resolve_params
    from rebalancer.specs.validation import validate_spec

    settings = Settings()
    accounts = load_accounts(settings.config)
    specs = configured_specs(settings, accounts)
    if args.spec not in specs:
        raise UsageError(f"unknown spec {args.spec!r} (known: {', '.join(sorted(specs))})")
    params = _parse_params(args.param)
    # Checked here first, so a typo is named at once even when no `serve` is running.
    validate_spec(specs[args.spec], accounts)
    resolve_params(specs[args.spec], params, accounts)
    command_id = args.command_id or f"cli-{uuid.uuid4()}"
    reply = _request("start", {"command_id": command_id, "spec": args.spec, "params": params})
    workflow_id = reply["workflow_id"]
    final = _follow(workflow_id, quiet=args.json) if args.wait else None
    if args.json:
        print(json.dumps({"workflow_id": workflow_id, "created": reply.get("created"),
                          "state": final}))
    elif not args.wait:
        print(workflow_id if reply.get("created")
              else f"{workflow_id} (already started by that command id)")
    if final is not None and final != "done":
        return EXIT_CHECK_FAILED
    return EXIT_OK


def workflow_control(args: argparse.Namespace) -> int:
    body = {"command_id": args.command_id or f"cli-{uuid.uuid4()}",
            "workflow_id": args.workflow_id, "reason": args.reason}
    reply = _request(args.command, body)
    print(json.dumps(reply) if args.json else f"{reply['workflow_id']}: {reply['state']}")
    return EXIT_OK


def task_resolve(args: argparse.Namespace) -> int:
    body = {"command_id": args.command_id or f"cli-{uuid.uuid4()}",
            "workflow_id": args.workflow_id, "task": args.task, "outcome": args.outcome,
            "note": args.note}
    reply = _request("resolve", body)
    print(json.dumps(reply) if args.json
          else f"{reply['workflow_id']} {reply['task']}: {reply['state']}")
    return EXIT_OK


def events_watch(args: argparse.Namespace) -> int:
    from rebalancer.api import follow

    def show(event: Any) -> bool:
        if args.json:
            print(json.dumps({"subject": event.subject, "stream_id": event.stream_id,
                              "version": event.version, "type": event.type, "data": event.data,
                              "recorded_at": event.recorded_at.isoformat()}), flush=True)
        else:
            print(_progress_line(event), flush=True)
        return False

    asyncio.run(follow(_reader_url(), args.workflow_id or "", show))
    return EXIT_OK


def _reader_url() -> str:
    """NATS for reading only: as the subscriber user where one is configured (or embedded)."""
    settings = Settings()
    if settings.nats_subscriber_url:
        return settings.nats_subscriber_url
    if settings.nats_url:
        return settings.nats_url
    embedded.ensure_urls(settings)
    info = embedded.load_info(settings.home)
    if info is None:
        raise UsageError(f"no embedded servers under {settings.home}")
    return info.nats_subscriber_url


def _request(command: str, body: dict[str, Any]) -> dict[str, Any]:
    from rebalancer.api import request

    reply = asyncio.run(request(_nats_url(), f"rebalancer.cmd.{command}", body))
    if not reply.get("ok"):
        problem = reply.get("error") or {}
        raise UsageError(f"{problem.get('code', 'error')}: {problem.get('message', reply)}")
    return reply


def _follow(workflow_id: str, quiet: bool) -> str:
    """Print the workflow's progress from NATS until it ends; returns its final state."""
    from rebalancer.api import follow

    final: list[str] = []

    def show(event: Any) -> bool:
        if not quiet:
            print(_progress_line(event), flush=True)
        data = event.data
        if event.type == "WorkflowStateChanged" and data["dest"] in (
            "done", "failed", "canceled", "needs_attention"
        ):
            final.append(data["dest"])
            return True
        return False

    asyncio.run(follow(_nats_url(), workflow_id, show))
    return final[0]


def _progress_line(event: Any) -> str:
    data = event.data
    what = data.get("task_name") or "workflow"
    move = f"{data['source']} -> {data['dest']}" if "dest" in data else "created"
    return (f"{event.recorded_at:%H:%M:%S} {event.stream_id.removeprefix('workflow-')[:8]}"
            f" v{event.version:<3} {what:<24} {data.get('trigger', ''):<11} {move}")


def _nats_url() -> str:
    settings = Settings()
    return settings.nats_url or embedded.ensure_urls(settings)[1]


def _list_alerts(args: argparse.Namespace) -> int:
    from projections.alerts import list_alerts

    found = _with_store(lambda store: list_alerts(store, limit=args.limit))
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


def _parse_params(pairs: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {pair!r}: expected NAME=VALUE")
        if key in params:
            raise UsageError(f"--param {key} given twice")
        params[key] = value
    return params


def run_demo_command(args: argparse.Namespace) -> int:
    from rebalancer.demo import run_demo

    settings = Settings()
    database_url, nats_url = (
        (settings.database_url, settings.nats_url)
        if settings.database_url and settings.nats_url
        else embedded.ensure_urls(settings)
    )
    return asyncio.run(run_demo(settings, database_url, nats_url, amount=args.amount,
                                as_json=args.json))


# --------------------------------------------------------------------------- simulated world


def sim_seed(args: argparse.Namespace) -> int:
    from events.migrations import migrate
    from rebalancer import simctl
    from rebalancer.accounts import load_accounts

    url = _database_url()
    asyncio.run(migrate(url))
    accounts = load_accounts(Settings().config)
    result = asyncio.run(simctl.seed(url, args.world, reset=args.reset, accounts=accounts))
    print(simctl.to_json(result) if args.json else simctl.format_seed(result))
    return EXIT_OK


def sim_check(args: argparse.Namespace) -> int:
    from rebalancer import simctl

    ok, rows = asyncio.run(simctl.check(_database_url()))
    print(simctl.to_json({"ok": ok, "currencies": rows}) if args.json
          else simctl.format_check(ok, rows))
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def sim_ledger(args: argparse.Namespace) -> int:
    from rebalancer import simctl

    rows = asyncio.run(simctl.ledger(_database_url(), args.limit))
    print(simctl.to_json(rows) if args.json else simctl.format_ledger(rows))
    return EXIT_OK


# --------------------------------------------------------------------------- store access


def _database_url() -> str:
    settings = Settings()
    # Only the database is needed: an explicit URL must not start the embedded servers.
    return settings.database_url or embedded.ensure_urls(settings)[0]


def _with_store(work: Callable[[EventStore], Awaitable[T]]) -> T:
    """Run `work` on an event store opened for this command, closing it whatever happens."""
    from events.store import EventStore

    url = _database_url()

    async def run() -> T:
        store = await EventStore.open(url, max_size=4)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def json_default(value: Any) -> Any:
    """JSON for what events and read models hold: datetimes as ISO 8601, Decimals as strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=json_default))


def _workflow_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise UsageError(f"{text!r} is not a workflow id (a UUID)") from None


def _stream_id(workflow_id: str) -> str:
    return f"workflow-{workflow_id}"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Plain aligned columns; the last one is left ragged."""
    lines = [[str(cell) for cell in header], *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]])
        .rstrip()
        for line in lines
    )


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.isoformat(sep=" ", timespec="milliseconds")


KEY_FIELDS = (
    "amount", "currency", "from_account", "to_account", "account", "network", "txid",
    "client_id", "id", "status",
)


def _key_fields(payload: dict[str, Any] | None) -> str:
    """`amount=... currency=... txid=...`: the first (shallowest) value of each key field."""
    if not payload:
        return ""
    found: dict[str, Any] = {}
    level: list[dict[str, Any]] = [payload]
    while level:
        deeper: list[dict[str, Any]] = []
        for item in level:
            for key, value in item.items():
                if isinstance(value, dict):
                    deeper.append(value)
                elif key in KEY_FIELDS and key not in found and value is not None:
                    found[key] = value
        level = deeper
    return " ".join(f"{key}={found[key]}" for key in KEY_FIELDS if key in found)


def _error_text(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    message = str(error.get("message") or error)
    return f"{message} ({error['code']})" if error.get("code") else message


# --------------------------------------------------------------------------- history


def workflow_history(args: argparse.Namespace) -> int:
    workflow_id = _workflow_id(args.workflow_id)
    events = _with_store(lambda store: store.read_stream(_stream_id(workflow_id)))
    if not events:
        raise UsageError(f"no workflow {workflow_id}")
    if args.json:
        _print_json([_event_json(event) for event in events])
        return EXIT_OK
    print(f"workflow {workflow_id}: {len(events)} events")
    print(
        _table(
            ("recorded_at", "v", "task", "trigger", "move", "details"),
            (_event_row(event) for event in events),
        )
    )
    return EXIT_OK


def _event_json(event: RecordedEvent) -> dict[str, Any]:
    return {
        "position": event.position, "stream_id": event.stream_id, "version": event.version,
        "type": event.type, "schema_version": event.schema_version, "data": event.data,
        "metadata": event.metadata, "recorded_at": event.recorded_at.isoformat(),
    }


def _event_row(event: RecordedEvent) -> tuple[object, ...]:
    data = event.data
    task = data.get("task_name") or "_workflow"
    if event.type == "WorkflowCreated":
        params = " ".join(f"{k}={v}" for k, v in (data.get("params") or {}).items())
        return (_when(event.recorded_at), event.version, task, "-", "-> created",
                f"spec {data.get('spec_name')}; {params}")
    details = []
    if data.get("reason"):
        details.append(f"reason: {data['reason']}")
    for label, key in (("request", "request_params"), ("result", "request_result"),
                       ("refresh", "refresh_result")):
        fields = _key_fields(data.get(key))
        if fields:
            details.append(f"{label}: {fields}")
    if data.get("error"):
        details.append(f"error: {_error_text(data['error'])}")
    if event.type not in ("WorkflowStateChanged", "TaskStateChanged"):
        details.insert(0, event.type)
    move = f"{data.get('source', '')} -> {data.get('dest', '')}" if "dest" in data else "-"
    return (_when(event.recorded_at), event.version, task, data.get("trigger") or "-", move,
            "; ".join(details))


# --------------------------------------------------------------------------- status


def workflow_status(args: argparse.Namespace) -> int:
    if args.alerts:
        return _list_alerts(args)
    if args.workflow_id is None:
        if args.at is not None:
            raise UsageError("--at needs a WORKFLOW_ID")
        return _list_workflows(args)
    if args.state is not None:
        raise UsageError("--state filters the list; leave it out with a WORKFLOW_ID")
    workflow_id = _workflow_id(args.workflow_id)
    if args.at is not None and args.at < 1:
        raise UsageError(f"--at {args.at}: versions start at 1")
    view, note = _with_store(lambda store: _load_view(store, workflow_id, args.at))
    if args.json:
        if note:
            print(f"rebalancer: {note}", file=sys.stderr)
        _print_json(asdict(view))
    else:
        _print_view(view, note)
    return EXIT_OK


async def _load_view(
    store: EventStore, workflow_id: str, at: int | None
) -> tuple[WorkflowView, str | None]:
    """The view to show and a note saying where it came from when not the read model."""
    from projections.workflows import fold, read_workflow

    stream_id = _stream_id(workflow_id)
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
        return view, f"as of version {at}, recorded at {_when(view.updated_at)}"
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
    print(f"version   {view.version}, created {_when(view.created_at)},"
          f" updated {_when(view.updated_at)}")
    if view.error:
        print(f"error     {view.error.get('task', '?')}: {_error_text(view.error)}")
    print(
        _table(
            ("#", "task", "kind", "state", "updated_at", "result"),
            (_task_row(task) for task in view.tasks),
        )
    )


def _task_row(task: TaskView) -> tuple[object, ...]:
    result = (
        _key_fields(task.refresh_result) or _key_fields(task.request_result)
        or _key_fields(task.request_params)
    )
    if task.error:
        result = "; ".join(filter(None, [result, f"error: {_error_text(task.error)}"]))
    return (task.index, task.name, task.kind, task.state, _when(task.updated_at), result)


def _list_workflows(args: argparse.Namespace) -> int:
    from projections.workflows import list_workflows
    from rebalancer.machines import WorkflowState

    if args.state is not None and args.state not in set(WorkflowState):
        raise UsageError(
            f"--state {args.state}: not a workflow state ({', '.join(WorkflowState)})"
        )
    found = _with_store(lambda store: list_workflows(store, state=args.state, limit=args.limit))
    if args.json:
        _print_json([asdict(summary) for summary in found])
        return EXIT_OK
    if not found:
        print("no workflows" + (f" in state {args.state}" if args.state else ""))
        return EXIT_OK
    print(
        _table(
            ("workflow_id", "spec", "state", "task", "updated_at"),
            (
                (w.workflow_id, w.spec_name, w.state,
                 "-" if w.current_task is None else f"{w.current_task} {w.current_task_name}",
                 _when(w.updated_at))
                for w in found
            ),
        )
    )
    return EXIT_OK


# --------------------------------------------------------------------------- replay


def read_models_replay(args: argparse.Namespace) -> int:
    if args.verify:
        return _verify_read_models(args)
    from projections.replay import rebuild
    from projections.runner import ProjectionRunner, default_projections

    async def run(store: EventStore) -> list[dict[str, Any]]:
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
    done = _with_store(run)
    seconds = round(time.perf_counter() - started, 3)
    failed = [entry for entry in done if entry["error"]]
    if args.json:
        _print_json({"projections": done, "seconds": seconds, "ok": not failed})
    else:
        for entry in done:
            print(f"{entry['name']:<12} {entry['events_applied']:>9} events"
                  f"  {entry['seconds']:.2f} s")
            if entry["error"]:
                print(f"  stopped: {entry['error']}")
        outcome = "stopped early" if failed else "rebuilt"
        print(f"{outcome}: {len(done)} read models in {seconds:.2f} s")
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def _verify_read_models(args: argparse.Namespace) -> int:
    from projections.replay import compare

    found = _with_store(compare)
    if args.json:
        _print_json({
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
    return f"{where}, {d.column}: {_short(d.live)} -> {_short(d.rebuilt)}"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=json_default)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _row_summary(row: dict[str, Any]) -> str:
    scalars = [
        f"{k}={_short(v, 40)}" for k, v in row.items()
        if not isinstance(v, dict | list) and k not in ("workflow_id", "task_index")
    ]
    text = " ".join(scalars)
    return text if len(text) <= 160 else text[:159] + "…"


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rebalancer",
        description="Moves crypto assets between exchange accounts along event-sourced workflows.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    infra = commands.add_parser("infra", help="embedded PostgreSQL + NATS on loopback")
    infra_commands = infra.add_subparsers(dest="infra_command", required=True, metavar="ACTION")
    up = infra_commands.add_parser("up", help="start both servers (or find them running)")
    up.add_argument("--json", action="store_true", help="print the addresses as JSON")
    up.set_defaults(handler=infra_up)
    infra_commands.add_parser("down", help="stop both servers").set_defaults(handler=infra_down)
    infra_commands.add_parser("env", help="print `export REBALANCER_*_URL=...` lines").set_defaults(
        handler=infra_env
    )
    state = infra_commands.add_parser("status", help="which servers are running")
    state.add_argument("--json", action="store_true")
    state.set_defaults(handler=infra_status)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("migrate", help="apply pending migrations").set_defaults(
        handler=db_migrate
    )

    status = commands.add_parser(
        "status", help="workflows from the read model, or one workflow's state"
    )
    status.add_argument("workflow_id", nargs="?", metavar="WORKFLOW_ID")
    status.add_argument("--at", type=int, metavar="VERSION",
                        help="the state as of this stream version, folded from the events")
    status.add_argument("--state", help="list only workflows in this state")
    status.add_argument("--limit", type=_positive_int, default=20,
                        help="list at most this many, newest first (default 20)")
    status.add_argument("--alerts", action="store_true",
                        help="the alerts raised (newest first) and whether each was sent")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=workflow_status)

    history = commands.add_parser("history", help="every event of one workflow, readable")
    history.add_argument("workflow_id", metavar="WORKFLOW_ID")
    history.add_argument("--json", action="store_true", help="the stored events as JSON")
    history.set_defaults(handler=workflow_history)

    replay = commands.add_parser("replay", help="rebuild the read models from the events")
    replay.add_argument(
        "--verify", action="store_true",
        help="rebuild into a shadow schema and diff against the live read models instead"
        " (exit 1 on any difference)",
    )
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(handler=read_models_replay)

    audit = commands.add_parser(
        "audit", help="re-check hash chains, versions and machine legality of every stream"
    )
    audit.add_argument("workflow_id", nargs="?", metavar="WORKFLOW_ID")
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(handler=streams_audit)

    serve = commands.add_parser("serve", help="run the worker and the projections")
    serve.add_argument("--tick", type=float, default=0.5, help="seconds between idle passes")
    serve.set_defaults(handler=worker_serve)

    start = commands.add_parser("start", help="start a workflow from a spec")
    start.add_argument("spec", metavar="SPEC", help="a spec name (see `specs list`)")
    start.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    start.add_argument("--command-id", help="idempotency key: a repeat starts nothing new")
    start.add_argument("--wait", action="store_true",
                       help="follow it to the end; exit 1 unless it ends done")
    start.add_argument("--json", action="store_true")
    start.set_defaults(handler=workflow_start)

    for name, text in (("cancel", "cancel a workflow (refused while money is in flight)"),
                       ("pause", "pause a running workflow"),
                       ("resume", "resume a paused workflow"),
                       ("retry", "put a workflow that needed attention back to running")):
        control = commands.add_parser(name, help=text)
        control.add_argument("workflow_id", metavar="WORKFLOW_ID")
        control.add_argument("--reason")
        control.add_argument("--command-id")
        control.add_argument("--json", action="store_true")
        control.set_defaults(handler=workflow_control)

    resolve = commands.add_parser("resolve", help="an operator's decision on a task that "
                                  "needs attention")
    resolve.add_argument("workflow_id", metavar="WORKFLOW_ID")
    resolve.add_argument("task", metavar="TASK")
    resolve.add_argument("--outcome", required=True, choices=["resend", "done", "failed"])
    resolve.add_argument("--note", required=True, help="what was checked, for the record")
    resolve.add_argument("--command-id")
    resolve.add_argument("--json", action="store_true")
    resolve.set_defaults(handler=task_resolve)

    watch = commands.add_parser("watch", help="live events from NATS")
    watch.add_argument("workflow_id", nargs="?", metavar="WORKFLOW_ID")
    watch.add_argument("--json", action="store_true")
    watch.set_defaults(handler=events_watch)

    demo = commands.add_parser("demo", help="the seed path end to end on the simulated world")
    demo.add_argument("--amount", type=Decimal, default=Decimal(1_000_000),
                      help="KRW to move (default 1,000,000)")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(handler=run_demo_command)

    sim = commands.add_parser("sim", help="the simulated exchange world")
    sim_commands = sim.add_subparsers(dest="sim_command", required=True, metavar="ACTION")
    seed = sim_commands.add_parser("seed", help="create the demo world's accounts and balances")
    seed.add_argument("--world", type=Path, help="a world file (default: the demo world)")
    seed.add_argument("--reset", action="store_true", help="wipe the world and seed it again")
    seed.add_argument("--json", action="store_true")
    seed.set_defaults(handler=sim_seed)
    check = sim_commands.add_parser("check", help="per-currency totals; exit 1 if any changed")
    check.add_argument("--json", action="store_true")
    check.set_defaults(handler=sim_check)
    ledger = sim_commands.add_parser("ledger", help="executed operations")
    ledger.add_argument("--limit", type=_positive_int)
    ledger.add_argument("--json", action="store_true")
    ledger.set_defaults(handler=sim_ledger)

    specs = commands.add_parser("specs", help="workflow specs")
    specs_commands = specs.add_subparsers(dest="specs_command", required=True, metavar="ACTION")
    listing = specs_commands.add_parser("list", help="the specs available to `start`")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=specs_list)
    validate = specs_commands.add_parser("validate", help="check a spec file before using it")
    validate.add_argument("file", metavar="FILE")
    validate.set_defaults(handler=specs_validate)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Conditions the user can fix (a server down, bad input): one line, not a traceback."""
    expected: list[type[BaseException]] = [RebalancerError, EventStoreError, OSError]
    # Looked up rather than imported: only modules that talk to them import psycopg, nats and
    # pydantic, and an error of a library nobody loaded cannot have been raised.
    for module, name in (
        ("psycopg", "OperationalError"),
        ("nats.errors", "Error"),
        ("pydantic", "ValidationError"),
        # A stream the fold refuses (`status --at`): `rebalancer audit` says more.
        ("projections.workflows", "ProjectionError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            expected.append(cls)
    return tuple(expected)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 check failed, 2 usage or input)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on bad usage
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not isinstance(e, _expected_errors()):
            raise
        print(f"rebalancer: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
