"""The commands that go to a running `rebalancer serve` over NATS: start, cancel, pause, resume,
retry, resolve, and `watch` of the events it relays."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import TYPE_CHECKING, Any

from events.catalogue import WorkflowStateChanged
from events.vocabulary import WORKFLOW_TERMINAL, WorkflowState
from rebalancer.cli.common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    UsageError,
    nats_url,
    parse_workflow_id,
    reader_url,
    request,
)
from rebalancer.cli.format import progress_line
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
    if (broken := specs.broken_named(args.spec)) and args.spec not in specs:
        raise UsageError(f"spec {args.spec!r} is broken ({broken.file}): {broken.error}")
    if args.spec not in specs:
        raise UsageError(f"unknown spec {args.spec!r} (known: {', '.join(sorted(specs))})")
    params = parse_params(args.param)
    validate_spec(specs[args.spec], accounts)
    resolve_params(specs[args.spec], params, accounts)
    return accounts, specs[args.spec], params


def workflow_start(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.exchanges.live import exchange_mode

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
    final = _follow(settings, workflow_id, quiet=args.json) if args.wait else None
    if args.json:
        print(json.dumps({"workflow_id": workflow_id, "created": reply.get("created"),
                          "state": final}))
    elif not args.wait:
        print(workflow_id if reply.get("created")
              else f"{workflow_id} (already started by that command id)")
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
# line takes any spelling of a UUID a person may paste and sends that one.
def workflow_control(args: argparse.Namespace, settings: Settings) -> int:
    body = {"command_id": args.command_id or f"cli-{uuid.uuid4()}",
            "workflow_id": parse_workflow_id(args.workflow_id), "reason": args.reason}
    if getattr(args, "from_task", None):
        body["from_task"] = args.from_task
    reply = request(settings, args.command, body)
    print(json.dumps(reply) if args.json else f"{reply['workflow_id']}: {reply['state']}")
    return EXIT_OK


def task_resolve(args: argparse.Namespace, settings: Settings) -> int:
    body: dict[str, Any] = {"command_id": args.command_id or f"cli-{uuid.uuid4()}",
            "workflow_id": parse_workflow_id(args.workflow_id), "task": args.task,
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

    def show(event: Any) -> bool:
        if args.json:
            print(json.dumps({"subject": event.subject, "stream_id": event.stream_id,
                              "version": event.version, "type": event.type, "data": event.data,
                              "recorded_at": event.recorded_at.isoformat()}), flush=True)
        else:
            print(progress_line(event), flush=True)
        return False

    # Canonical, as in the event subjects; nor may a `.` or `*` in it widen the subscription.
    workflow_id = parse_workflow_id(args.workflow_id) if args.workflow_id else ""
    asyncio.run(follow(reader_url(settings), workflow_id, show))
    return EXIT_OK


def _follow(settings: Settings, workflow_id: str, quiet: bool) -> str:
    """Print the workflow's progress from NATS until it ends; returns its final state."""
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

    asyncio.run(follow(nats_url(settings), workflow_id, show))
    return final[0]


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
