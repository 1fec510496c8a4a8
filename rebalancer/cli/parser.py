"""The argument parser: every command, its flags and the handler that runs it."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import NoReturn

from events.vocabulary import RESOLUTIONS
from rebalancer.cli.control import (
    events_watch,
    task_resolve,
    workflow_control,
    workflow_start,
)
from rebalancer.cli.exchanges import account_balances, spec_preview
from rebalancer.cli.infra import db_migrate, infra_down, infra_env, infra_status, infra_up
from rebalancer.cli.money import exposure_report
from rebalancer.cli.reports import (
    read_models_replay,
    streams_audit,
    workflow_history,
    workflow_status,
)
from rebalancer.cli.serve import run_demo_command, worker_serve
from rebalancer.cli.sim import sim_check, sim_ledger, sim_seed
from rebalancer.cli.specs import specs_list, specs_show, specs_validate
from rebalancer.logs import LOG_FORMATS

JSON_HELP = "print JSON instead of text"
ID_HELP = "a workflow id, or a unique prefix of one (as `status` prints it)"
PARAM_HELP = "a spec parameter; repeat for each (see `specs show SPEC`)"
COMMAND_ID_HELP = "idempotency key: a repeat with it does nothing more"
# Bounds of the numeric options: beyond them a value is a typo, not a wish.
MAX_TICK = 60.0  # seconds: the worker also looks for expired claims this often
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_LIMIT = 1_000_000


class OneLineParser(argparse.ArgumentParser):
    """Bad usage is one line on stderr, exit 2: the usage text is for `--help`, not an error."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(2, f"rebalancer: error: {' '.join(message.split())}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    # Subparsers are made of the same class, so every command's errors are one line too.
    parser = OneLineParser(
        prog="rebalancer",
        description="Moves crypto assets between exchange accounts along event-sourced workflows.",
    )
    parser.add_argument("--version", action="version", version=f"rebalancer {_version()}")
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
    state.add_argument("--json", action="store_true", help=JSON_HELP)
    state.set_defaults(handler=infra_status)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("migrate", help="apply pending migrations").set_defaults(
        handler=db_migrate
    )

    status = commands.add_parser(
        "status", help="workflows from the read model, or one workflow's state"
    )
    status.add_argument("workflow_id", nargs="?", metavar="WORKFLOW_ID",
                        help=f"{ID_HELP}; without it, the list of workflows")
    status.add_argument("--at", type=_version_number, metavar="VERSION",
                        help="the state as of this stream version, folded from the events")
    status.add_argument("--state", help="list only workflows in this state")
    status.add_argument("--limit", type=_limit, default=20,
                        help="list at most this many, newest first (default 20)")
    status.add_argument("--alerts", action="store_true",
                        help="the alerts raised (newest first) and whether each was sent")
    status.add_argument("--json", action="store_true", help=JSON_HELP)
    status.set_defaults(handler=workflow_status)

    exposure = commands.add_parser(
        "exposure", help="money in transit per account and currency, by workflow, with totals;"
        " and what workflows left behind (remainders) per account")
    exposure.add_argument("--json", action="store_true",
                          help="in_transit, totals, remainders and remainder_totals as JSON")
    exposure.set_defaults(handler=exposure_report)

    history = commands.add_parser("history", help="every event of one workflow, readable")
    history.add_argument("workflow_id", metavar="WORKFLOW_ID", help=ID_HELP)
    history.add_argument("--json", action="store_true", help="the stored events as JSON")
    history.set_defaults(handler=workflow_history)

    replay = commands.add_parser("replay", help="rebuild the read models from the events")
    replay.add_argument(
        "--verify", action="store_true",
        help="rebuild into a shadow schema and diff against the live read models instead"
        " (exit 1 on any difference)",
    )
    replay.add_argument(
        "--force", action="store_true",
        help="rebuild even when the audit that runs first finds problems (recorded in"
        " replay_log)",
    )
    replay.add_argument("--no-nats", action="store_true",
                        help="audit first without the JetStream copy")
    replay.add_argument("--json", action="store_true", help=JSON_HELP)
    replay.set_defaults(handler=read_models_replay)

    audit = commands.add_parser(
        "audit", help="re-check hash chains, versions and machine legality of every stream,"
        " and the table against the JetStream copy and the chain anchors"
    )
    audit.add_argument("workflow_id", nargs="?", metavar="WORKFLOW_ID",
                       help=f"{ID_HELP}; without it, every stream")
    audit.add_argument("--no-nats", action="store_true",
                       help="skip the JetStream copy and the anchors (said in the output)")
    audit.add_argument("--json", action="store_true", help=JSON_HELP)
    audit.set_defaults(handler=streams_audit)

    serve = commands.add_parser("serve", help="run the worker and the projections")
    serve.add_argument("--tick", type=_seconds(MAX_TICK), default=0.5,
                       help=f"seconds between idle passes (above 0, at most {MAX_TICK:g})")
    serve.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                       help="text (default) or json: one JSON object a line, for log shippers"
                       " (also REBALANCER_LOG_FORMAT)")
    serve.add_argument("--http", metavar="[HOST:]PORT", default=None,
                       help="serve the dashboard, /healthz and /readyz there (a bare port is"
                       " on 127.0.0.1); read-only unless REBALANCER_OPERATOR_TOKEN(_FILE) is"
                       " set")
    serve.add_argument("--http-allow-remote", action="store_true",
                       help="allow --http on an address other than loopback (put a TLS proxy"
                       " in front: the dashboard speaks plain HTTP)")
    serve.set_defaults(handler=worker_serve)

    start = commands.add_parser("start", help="start a workflow from a spec")
    start.add_argument("spec", metavar="SPEC",
                       help="a spec name (see `specs list`), or the path of a .yaml/.yml spec"
                       " file: checked here, started only if configured with that content")
    start.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help=PARAM_HELP)
    start.add_argument("--command-id", help="idempotency key: a repeat starts nothing new")
    start.add_argument("--wait", action="store_true",
                       help="follow it to the end; exit 1 unless it ends done")
    start.add_argument("--timeout", type=_seconds(MAX_TIMEOUT), metavar="SECONDS",
                       help="with --wait: stop following after this long (exit 1; the"
                       f" workflow goes on; at most {MAX_TIMEOUT:g})")
    start.add_argument("--confirm-preview", action="store_true",
                       help="print the preview first and ask before starting (live: the"
                       " preview is always printed, and a preview that fails stops the start)")
    start.add_argument("--yes", action="store_true",
                       help="with --confirm-preview: do not ask (the preview must end done)")
    start.add_argument("--no-preview", action="store_true",
                       help="live: start without the preview (when it cannot model the path)")
    start.add_argument("--json", action="store_true", help=JSON_HELP)
    start.set_defaults(handler=workflow_start)

    preview = commands.add_parser(
        "preview", help="the spec on a throwaway simulated world seeded from the exchanges now")
    preview.add_argument("spec", metavar="SPEC", help="a spec name (see `specs list`)")
    preview.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help=PARAM_HELP)
    preview.add_argument("--json", action="store_true", help=JSON_HELP)
    preview.set_defaults(handler=spec_preview)

    for name, text in (("cancel", "cancel a workflow: a trade's resting order is canceled on the"
                                  " exchange first (refused while a withdrawal or transfer is in"
                                  " flight)"),
                       ("pause", "pause a running workflow: what was sent settles, nothing new"
                                 " starts"),
                       ("resume", "resume a paused workflow"),
                       ("retry", "put a workflow that needed attention back to running")):
        control = commands.add_parser(name, help=text)
        control.add_argument("workflow_id", metavar="WORKFLOW_ID", help=ID_HELP)
        control.add_argument("--reason", help="why, for the record (in the event)")
        if name == "retry":
            control.add_argument("--from", dest="from_task", metavar="TASK",
                                 help="re-open a failed workflow at TASK (money in transit):"
                                      " a failed TASK is sent again, a done one goes back to"
                                      " needs_attention to be resolved with --result")
        control.add_argument("--command-id", help=COMMAND_ID_HELP)
        control.add_argument("--json", action="store_true", help=JSON_HELP)
        control.set_defaults(handler=workflow_control)

    resolve = commands.add_parser("resolve", help="an operator's decision on a task that "
                                  "needs attention")
    resolve.add_argument("workflow_id", metavar="WORKFLOW_ID", help=ID_HELP)
    resolve.add_argument("task", metavar="TASK", help="the task's name, as `status` shows it")
    resolve.add_argument("--outcome", required=True, choices=list(RESOLUTIONS),
                         help="what happened on the exchange, as checked there")
    resolve.add_argument("--note", required=True, help="what was checked, for the record")
    resolve.add_argument("--result", action="append", default=[], metavar="KEY=VALUE",
                         help="with --outcome done: a fact later tasks reference, e.g. id=...,"
                              " txid=..., amount=...; checked against the exchange (repeatable)")
    resolve.add_argument("--command-id", help=COMMAND_ID_HELP)
    resolve.add_argument("--json", action="store_true", help=JSON_HELP)
    resolve.set_defaults(handler=task_resolve)

    watch = commands.add_parser("watch", help="live events from NATS, from now on")
    watch.add_argument("workflow_id", nargs="?", metavar="WORKFLOW_ID",
                       help=f"only this workflow ({ID_HELP}), until it ends (at once if it"
                       " has ended); without it, every workflow's events")
    watch.add_argument("--from-start", action="store_true",
                       help="replay the events relayed so far first")
    watch.add_argument("--json", action="store_true", help="one JSON object per event")
    watch.set_defaults(handler=events_watch)

    demo = commands.add_parser("demo", help="the built-in path end to end on the simulated world")
    demo.add_argument("--amount", type=_amount, default=Decimal(1_000_000),
                      help="KRW to move (default 1,000,000)")
    demo.add_argument("--json", action="store_true", help=JSON_HELP)
    demo.add_argument("--http", metavar="[HOST:]PORT", nargs="?", const="127.0.0.1:8080",
                      default=None, help="run the dashboard beside it (default 127.0.0.1:8080)"
                      " and keep it up after the workflow ends, until Ctrl-C")
    demo.set_defaults(handler=run_demo_command)

    balances = commands.add_parser(
        "balances", help="what each account holds now, per wallet (read-only calls)")
    balances.add_argument("account", nargs="?", metavar="ACCOUNT", help="only this account")
    balances.add_argument("--json", action="store_true", help=JSON_HELP)
    balances.set_defaults(handler=account_balances)

    sim = commands.add_parser("sim", help="the simulated exchange world")
    sim_commands = sim.add_subparsers(dest="sim_command", required=True, metavar="ACTION")
    seed = sim_commands.add_parser("seed", help="create the demo world's accounts and balances")
    seed.add_argument("--world", type=Path, help="a world file (default: REBALANCER_SIM_WORLD,"
                      " as `serve` uses, else the demo world)")
    seed.add_argument("--reset", action="store_true", help="wipe the world and seed it again"
                      " (refused while workflows are active)")
    seed.add_argument("--force", action="store_true", help="with --reset: reset even under"
                      " active workflows (their money on the simulated exchanges vanishes)")
    seed.add_argument("--json", action="store_true", help=JSON_HELP)
    seed.set_defaults(handler=sim_seed)
    check = sim_commands.add_parser("check", help="per-currency totals; exit 1 if any changed")
    check.add_argument("--json", action="store_true", help=JSON_HELP)
    check.set_defaults(handler=sim_check)
    ledger = sim_commands.add_parser("ledger", help="executed operations")
    ledger.add_argument("--limit", type=_limit, help="only the latest this many")
    ledger.add_argument("--json", action="store_true", help=JSON_HELP)
    ledger.set_defaults(handler=sim_ledger)

    specs = commands.add_parser("specs", help="workflow specs")
    specs_commands = specs.add_subparsers(dest="specs_command", required=True, metavar="ACTION")
    listing = specs_commands.add_parser("list", help="the specs available to `start`")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.set_defaults(handler=specs_list)
    show = specs_commands.add_parser("show", help="one spec: its params with types, its tasks"
                                     " with kinds, and the spec as loaded")
    show.add_argument("name", metavar="NAME", help="a spec name (see `specs list`)")
    show.add_argument("--json", action="store_true", help=JSON_HELP)
    show.set_defaults(handler=specs_show)
    validate = specs_commands.add_parser("validate", help="check a spec file before using it")
    validate.add_argument("file", metavar="FILE", help="a .yaml/.yml spec file")
    validate.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                          help="also check these params and walk the pre-flight that `start`"
                          " runs against the configured exchanges (read-only)")
    validate.add_argument("--json", action="store_true", help=JSON_HELP)
    validate.set_defaults(handler=specs_validate)
    return parser


_GROUPED = re.compile(r"[0-9]{1,3}(,[0-9]{3})+(\.[0-9]+)?")


def _amount(text: str) -> Decimal:
    """A positive amount, grouped as the help shows it (`1,000,000`) or plain."""
    plain = text.replace(",", "") if _GROUPED.fullmatch(text) else text
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", plain) or Decimal(plain) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive amount such as 1,000,000")
    return Decimal(plain)


def _seconds(maximum: float) -> Callable[[str], float]:
    """A number of seconds above 0 and at most `maximum`: 0 or less would spin the CPU (or
    never wait), a huge one is a typo; inf and nan are neither."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 < value <= maximum:  # nan fails every comparison
            raise argparse.ArgumentTypeError(
                f"{text} is not a positive number of seconds (at most {maximum:g})")
        return value

    return seconds


def _whole(text: str, maximum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= maximum:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number ({what} from 1 to"
                                         f" {maximum})")
    return value


def _limit(text: str) -> int:
    return _whole(text, MAX_LIMIT, "a count")


def _version_number(text: str) -> int:
    # Stream versions start at 1 and are a PostgreSQL int.
    return _whole(text, 2**31 - 1, "a stream version")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rebalancer")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"
