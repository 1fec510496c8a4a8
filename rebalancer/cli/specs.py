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
