"""The commands that go to a running `rebalancer serve` over NATS: start, cancel, pause, resume,
retry, resolve, and `watch` of the events it relays."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from events.catalogue import WorkflowStateChanged
from events.vocabulary import WORKFLOW_TERMINAL, WorkflowState
from rebalancer.cli.common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    UsageError,
    database_url,
    nats_url,
    reader_url,
    request,
)
from rebalancer.cli.format import progress_line
from rebalancer.cli.ids import resolve_workflow_id
from rebalancer.settings import Settings

if TYPE_CHECKING:
    from rebalancer.accounts import Accounts
    from rebalancer.specs.models import WorkflowSpec

# Where `start --wait` stops following: the workflow ended, or waits for an operator.
SETTLED = WORKFLOW_TERMINAL | {WorkflowState.NEEDS_ATTENTION}


def checked_start(args: argparse.Namespace, settings: Settings
                  ) -> tuple[Accounts, WorkflowSpec, dict[str, str]]:
    """The accounts, the spec `args.spec` names and the `--param`s, checked: a typo is named
    at once, even when no `serve` is running."""
    from rebalancer.accounts import load_accounts
    from rebalancer.service import configured_specs
    from rebalancer.specs.resolution import resolve_params
    from rebalancer.specs.validation import validate_spec

    accounts = load_accounts(settings.config)
    specs = configured_specs(settings, accounts)
    if spec_file(args.spec) is not None:
        args.spec = _configured_name(Path(args.spec), specs, accounts, settings)
    elif looks_like_path(args.spec) and args.spec not in specs:
        # A path that is not there: "unknown spec" would send one looking among the names.
        if not Path(args.spec).exists():
            raise UsageError(f"no such spec file: {args.spec}")
        raise UsageError(f"{args.spec}: not a spec file (a .yaml or .yml file)")
    if (broken := specs.broken_named(args.spec)) and args.spec not in specs:
        raise UsageError(f"spec {args.spec!r} is broken ({broken.file}): {broken.error}")
    if args.spec not in specs:
        raise UsageError(f"unknown spec {args.spec!r} (known: {', '.join(sorted(specs))})")
    params = parse_params(args.param)
    validate_spec(specs[args.spec], accounts)
    resolve_params(specs[args.spec], params, accounts)
    return accounts, specs[args.spec], params


def spec_file(text: str) -> Path | None:
    """`text` as a spec file's path: one that exists and ends .yaml/.yml (else a spec name)."""
    path = Path(text)
    return path if path.suffix in (".yaml", ".yml") and path.is_file() else None


def looks_like_path(text: str) -> bool:
    """A SPEC argument meant as a file: with a `/` or a .yaml/.yml ending (no spec name has
    either)."""
    return "/" in text or Path(text).suffix in (".yaml", ".yml")


def _configured_name(path: Path, specs: Mapping[str, WorkflowSpec], accounts: Accounts,
                     settings: Settings) -> str:
    """The configured spec a spec file is, by name and identical content; else UsageError.

    The start body (docs/contracts.md §3) names a spec the service has configured and carries
    no spec of its own: the service runs only what its configuration lists, so a file is
    checked here and then started by its name, or refused with what to do instead."""
    from rebalancer.accounts import DEFAULT_CONFIG
    from rebalancer.specs.loading import validate_file

    spec = validate_file(path, accounts)  # every problem of the file, one a line (exit 2)
    if specs.get(spec.name) == spec:
        return spec.name
    config = settings.config or DEFAULT_CONFIG
    where = f"add {path.resolve().parent} to `specs:` in {config}"
    if spec.name in specs:
        raise UsageError(f"{path}: spec {spec.name!r} is valid but differs from the configured"
                         f" spec of that name; the service starts only configured specs: rename"
                         f" it, or {where} in place of the other, then `rebalancer start"
                         f" {spec.name}`")
    raise UsageError(f"{path}: spec {spec.name!r} is valid but not configured; the service"
                     f" starts only configured specs: {where} (read again on every start, no"
                     f" restart needed), then `rebalancer start {spec.name}`")


def workflow_start(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.exchanges.live import exchange_mode

    if args.timeout is not None and not args.wait:
        raise UsageError("--timeout limits --wait; give both")
    accounts, spec, params = checked_start(args, settings)
    # On live exchanges the preview always comes first; on the simulator when asked for.
    live = exchange_mode(settings, accounts) == "live"
    wanted = args.confirm_preview or (live and not args.no_preview)
    if wanted and not _previewed(args, settings, accounts, spec, params):
        return EXIT_CHECK_FAILED
    command_id = args.command_id or f"cli-{uuid.uuid4()}"
    body = {"command_id": command_id, "spec": args.spec, "params": params}
    reply = request(settings, "start", body)
    workflow_id = reply["workflow_id"]
    final = (_follow(settings, workflow_id, quiet=args.json, timeout=args.timeout)
             if args.wait else None)
    timed_out = args.wait and final is None
    if args.json:
        shown: dict[str, Any] = {"workflow_id": workflow_id, "created": reply.get("created"),
                                 "state": final}
        if timed_out:
            shown["timed_out"] = True
        print(json.dumps(shown))
    elif not args.wait:
        print(workflow_id if reply.get("created")
              else f"{workflow_id} (already started by that command id)")
    if timed_out:
        # The workflow is not stopped: only this command stops following it.
        print(f"rebalancer: workflow {workflow_id} is still running after {args.timeout:g} s;"
              f" follow it with `rebalancer watch {workflow_id[:8]}`", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if final is not None and final != WorkflowState.DONE:
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _previewed(args: argparse.Namespace, settings: Settings, accounts: Accounts,
               spec: WorkflowSpec, params: dict[str, str]) -> bool:
    """Print the preview; True when the start may go ahead: the preview ends done and, with
    --confirm-preview, the operator said yes (or gave --yes)."""
    from rebalancer.cli.exchanges import format_preview, preview_report

    report = asyncio.run(preview_report(settings, accounts, spec, params))
    print(format_preview(report), file=sys.stderr if args.json else sys.stdout)
    if report["state"] != WorkflowState.DONE:
        print("rebalancer: not started: the preview does not end done", file=sys.stderr)
        return False
    if not args.confirm_preview or args.yes:
        return True
    if not sys.stdin.isatty():
        print("rebalancer: not started: --confirm-preview needs a terminal to answer on,"
              " or --yes", file=sys.stderr)
        return False
    answer = input("start it for real? [y/N] ").strip().lower()
    return answer in ("y", "yes")


# The API takes only the canonical spelling of a workflow id (docs/contracts.md §3); the command
# line takes any spelling of a UUID a person may paste, or a unique prefix of one, and sends
# the canonical id.
def workflow_control(args: argparse.Namespace, settings: Settings) -> int:
    body = {"command_id": args.command_id or f"cli-{uuid.uuid4()}",
            "workflow_id": resolve_workflow_id(settings, args.workflow_id),
            "reason": args.reason}
    if getattr(args, "from_task", None):
        body["from_task"] = args.from_task
    reply = request(settings, args.command, body)
    # A cancel the worker still carries out (a resting order) names its task: `canceling`.
    task = f" (task {reply['task']}: {reply['task_state']})" if reply.get("task_state") else ""
    print(json.dumps(reply) if args.json else f"{reply['workflow_id']}: {reply['state']}{task}")
    return EXIT_OK


def task_resolve(args: argparse.Namespace, settings: Settings) -> int:
    body: dict[str, Any] = {
        "command_id": args.command_id or f"cli-{uuid.uuid4()}",
        "workflow_id": resolve_workflow_id(settings, args.workflow_id), "task": args.task,
            "outcome": args.outcome,
            "note": args.note}
    if args.result:
        body["result"] = parse_params(args.result, option="--result")
    reply = request(settings, "resolve", body)
    print(json.dumps(reply) if args.json
          else f"{reply['workflow_id']} {reply['task']}: {reply['state']}")
    return EXIT_OK


def events_watch(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.api import follow

    # Canonical, as in the event subjects; nor may a `.` or `*` in it widen the subscription.
    workflow_id = resolve_workflow_id(settings, args.workflow_id) if args.workflow_id else ""

    def show(event: Any) -> bool:
        if args.json:
            print(json.dumps({"subject": event.subject, "stream_id": event.stream_id,
                              "version": event.version, "type": event.type, "data": event.data,
                              "recorded_at": event.recorded_at.isoformat()}), flush=True)
        else:
            print(progress_line(event), flush=True)
        # One workflow's watch ends with it; nothing more will come for it.
        return bool(workflow_id and event.type == WorkflowStateChanged.type_name
                    and event.data["dest"] in WORKFLOW_TERMINAL)

    async def finished() -> bool:
        """Whether the watched workflow has ended already (then said so): asked once the
        subscriber holds its place, so an end recorded after this is relayed after it."""
        if not workflow_id:
            return False
        state = await _state_of(database_url(settings), workflow_id, settings.connect_timeout)
        if state not in WORKFLOW_TERMINAL or args.from_start:
            return False  # replayed, a finished one up to its last move
        print(json.dumps({"workflow_id": workflow_id, "state": state, "finished": True})
              if args.json else f"workflow {workflow_id} has already finished: {state}",
              flush=True)
        return True

    asyncio.run(follow(reader_url(settings), workflow_id, show,
                       from_start=args.from_start, ready=finished))
    return EXIT_OK


async def _state_of(url: str, workflow_id: str, connect_timeout: float) -> str:
    """The workflow's state now (the read model, or its events where the read model is
    behind); UsageError when there is no such workflow."""
    from events.store import EventStore
    from projections.workflows import fold, read_workflow

    async with await EventStore.open(url, max_size=1,
                                     connect_timeout=connect_timeout) as store:
        view = await read_workflow(store, workflow_id)
        if view is None:
            view = fold(await store.read_stream(f"workflow-{workflow_id}"))
    if view is None:
        raise UsageError(f"no workflow {workflow_id}")
    return view.state


def _follow(settings: Settings, workflow_id: str, quiet: bool,
            timeout: float | None = None) -> str | None:
    """Print the workflow's progress from NATS until it settles; its final state, or None
    when `timeout` seconds passed first (the workflow goes on)."""
    from rebalancer.api import follow

    final: list[str] = []

    def show(event: Any) -> bool:
        if not quiet:
            print(progress_line(event), flush=True)
        data = event.data
        if event.type == WorkflowStateChanged.type_name and data["dest"] in SETTLED:
            final.append(data["dest"])
            return True
        return False

    async def run() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(follow(nats_url(settings), workflow_id, show), timeout)

    asyncio.run(run())
    return final[0] if final else None


def parse_params(pairs: list[str], option: str = "--param") -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {pair!r}: expected NAME=VALUE")
        if key in params:
            raise UsageError(f"{option} {key} given twice")
        params[key] = value
    return params
