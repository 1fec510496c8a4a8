"""`rebalancer specs list | show | validate`: the specs `start` can use, one of them in full,
and a check of a spec file."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rebalancer.cli.common import EXIT_OK, EXIT_USAGE, UsageError, problem_lines
from rebalancer.errors import RebalancerError
from rebalancer.settings import Settings

if TYPE_CHECKING:
    from rebalancer.accounts import Accounts
    from rebalancer.specs.interpolation import ResolvedParams
    from rebalancer.specs.models import TaskSpec, WorkflowSpec


def specs_list(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.accounts import spec_dirs
    from rebalancer.specs.loading import available_specs

    specs = available_specs(spec_dirs(settings.config))
    rows: list[dict[str, object]] = [
        {"name": name, "description": specs[name].description, "tasks": len(specs[name].tasks),
         "error": None}
        for name in sorted(specs)
    ]
    # A broken file is listed with its one-line error: the others stay usable meanwhile.
    rows += [{"name": b.name, "file": str(b.file), "error": b.error} for b in specs.broken]
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    width = max((len(str(row["name"])) for row in rows), default=4)
    for row in rows:
        if row["error"] is None:
            print(f"{row['name']:<{width}}  {row['tasks']} tasks  {row['description']}")
        else:
            print(f"{row['name']:<{width}}  BROKEN  {row['file']}: {row['error']}")
    return EXIT_OK


def specs_show(args: argparse.Namespace, settings: Settings) -> int:
    import yaml

    from rebalancer.accounts import load_accounts
    from rebalancer.service import configured_specs

    specs = configured_specs(settings, load_accounts(settings.config))
    spec = specs.get(args.name)
    if spec is None:
        broken = specs.broken_named(args.name)
        if broken is not None:
            raise UsageError(f"spec {args.name!r} is broken ({broken.file}): {broken.error}")
        raise UsageError(f"unknown spec {args.name!r} (known: {', '.join(sorted(specs))})")
    loaded = spec.model_dump(mode="json", exclude_none=True)
    if args.json:
        print(json.dumps(loaded))
        return EXIT_OK
    print(f"spec {spec.name}" + (f": {spec.description}" if spec.description else ""))
    print("params" if spec.params else "params    (none)")
    rows = [(name, param.type, param.description) for name, param in spec.params.items()]
    for line in _aligned(rows):
        print(f"  {line}")
    print("tasks")
    tasks = [(str(i), task.name, task.kind.value + _trade_notes(task))
             for i, task in enumerate(spec.tasks)]
    for line in _aligned(tasks):
        print(f"  {line}")
    if spec.result:
        print("result")
        for line in _aligned([(k, v) for k, v in spec.result.items()]):
            print(f"  {line}")
    # The whole spec as Rebalancer loaded it (defaults filled in), to copy from.
    print("---")
    print(yaml.safe_dump(loaded, sort_keys=False, allow_unicode=True).rstrip())
    return EXIT_OK


def _aligned(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(len(rows[0]))
              ] if rows else []
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def specs_validate(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.accounts import load_accounts
    from rebalancer.cli.control import parse_params
    from rebalancer.specs.loading import validate_file
    from rebalancer.specs.resolution import resolve_params

    accounts = load_accounts(settings.config)
    spec: WorkflowSpec | None = None
    try:
        spec = validate_file(Path(args.file), accounts)
        params = resolve_params(spec, parse_params(args.param), accounts) if args.param else None
    except RebalancerError as e:
        if args.json:
            # The same object as for a valid file, its problems listed: a script reads one
            # shape whatever went wrong (the exit status is the same as in text).
            print(json.dumps({"file": args.file, "spec": spec and spec.name,
                              "tasks": spec and len(spec.tasks), "valid": False,
                              "problems": _problems(e), "preflight": None}))
        else:
            # Every problem on its own line: a spec author fixes them all in one go.
            print("\n".join(problem_lines(e)), file=sys.stderr)
        return EXIT_USAGE
    summary = {"file": args.file, "spec": spec.name, "tasks": len(spec.tasks), "problems": []}
    if params is None:
        print(json.dumps({**summary, "valid": True, "preflight": None}) if args.json
              else f"{args.file}: spec {spec.name} is valid ({len(spec.tasks)} tasks)")
        return EXIT_OK
    mode, problems = asyncio.run(_preflight(settings, accounts, spec, params))
    if args.json:
        print(json.dumps({**summary, "valid": not problems,
                          "preflight": {"exchanges": mode, "problems": problems}}))
    elif problems:
        print(f"rebalancer: {args.file}: the pre-flight on the {mode} exchanges refuses spec"
              f" {spec.name} with these params:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    else:
        print(f"{args.file}: spec {spec.name} is valid ({len(spec.tasks)} tasks); the"
              f" pre-flight on the {mode} exchanges finds nothing to refuse")
    return EXIT_USAGE if problems else EXIT_OK


def _problems(error: RebalancerError) -> list[str]:
    """A spec's or the params' problems, one line each (the file is said beside them)."""
    listed = getattr(error, "problems", None)
    if listed:
        return [" ".join(str(p).split()) for p in listed]
    return [" ".join(str(error).split())]


async def _preflight(settings: Settings, accounts: Accounts, spec: WorkflowSpec,
                     params: ResolvedParams) -> tuple[str, list[str]]:
    """The walk `start` makes, on the exchanges this configuration talks to (read-only)."""
    from rebalancer.cli.exchanges import opened_exchanges
    from rebalancer.exchanges.live import exchange_mode
    from rebalancer.preflight import preflight_problems

    async with opened_exchanges(settings, accounts) as exchanges:
        problems = await preflight_problems(spec, params, accounts, exchanges)
    return exchange_mode(settings, accounts), problems


def _trade_notes(task: TaskSpec) -> str:
    """A trade's slicing and its partial-fill policy (the defaults where the spec is silent)."""
    from events.vocabulary import TaskKind
    from rebalancer.specs.models import DEFAULT_MIN_FILLED_FRACTION, DEFAULT_ON_PARTIAL

    if task.kind is not TaskKind.TRADE:
        return ""
    policy = task.on_partial or DEFAULT_ON_PARTIAL
    percent = ((task.min_filled_fraction or DEFAULT_MIN_FILLED_FRACTION) * 100).normalize()
    notes = [f"twap {task.twap.slices} slices"] if task.twap else []
    notes.append(f"below {percent:f}% filled: {policy}")
    return f" ({'; '.join(notes)})"
