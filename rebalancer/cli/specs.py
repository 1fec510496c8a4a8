"""`rebalancer specs list | validate`: the specs `start` can use, and a check of a spec file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rebalancer.cli.common import EXIT_OK, EXIT_USAGE
from rebalancer.errors import RebalancerError
from rebalancer.settings import Settings


def specs_list(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.accounts import spec_dirs
    from rebalancer.specs.loading import list_specs

    found = list_specs(spec_dirs(settings.config))
    if args.json:
        print(json.dumps([{"name": n, "description": d, "tasks": t} for n, d, t in found]))
    else:
        width = max((len(n) for n, _, _ in found), default=4)
        for name, description, tasks in found:
            print(f"{name:<{width}}  {tasks} tasks  {description}")
    return EXIT_OK


def specs_validate(args: argparse.Namespace, settings: Settings) -> int:
    from rebalancer.accounts import load_accounts
    from rebalancer.specs.loading import validate_file

    try:
        spec = validate_file(Path(args.file), load_accounts(settings.config))
    except RebalancerError as e:
        # Every problem on its own line: a spec author fixes them all in one go.
        print(f"rebalancer: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: spec {spec.name} is valid ({len(spec.tasks)} tasks)")
    return EXIT_OK
