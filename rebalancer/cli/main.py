"""`main()`: settings read once, the command run, expected errors turned into one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pydantic import ValidationError

from events.errors import EventStoreError
from rebalancer.cli.common import (
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    NO_CONFIG_COMMANDS,
    check_configuration,
)
from rebalancer.cli.parser import build_parser
from rebalancer.errors import RebalancerError
from rebalancer.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def settings_problem(error: ValidationError) -> str:
    """`REBALANCER_X=value: why` for the first bad environment value."""
    item = error.errors()[0]
    name = "REBALANCER_" + "_".join(str(part) for part in item["loc"]).upper()
    return f"{name}={item.get('input')!r}: {item['msg']}"


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
        settings = Settings()
    except ValidationError as e:
        print(f"rebalancer: {settings_problem(e)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command not in NO_CONFIG_COMMANDS:
            check_configuration(settings)
        status = handler(args, settings)
        # Flushed here, not at exit: a reader gone by then is a BrokenPipeError caught below
        # rather than the interpreter's "Exception ignored" and exit status 120.
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head -1`): it wanted no more, so this is success (exit 0,
        # not 141 as for a process killed by SIGPIPE). Point stdout at /dev/null so the
        # interpreter's last flush does not complain either.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if not isinstance(e, _expected_errors()):
            raise
        print(f"rebalancer: {_one_line(e)}", file=sys.stderr)
        for line in getattr(e, "lines", ()):
            print(f"  {_one_line(line)}", file=sys.stderr)
        return _exit_status(e)


def _exit_status(error: BaseException) -> int:
    """2 for input, 3 for a conflict the service reported, 4 for a server out of reach."""
    status = getattr(error, "exit_status", None)
    if isinstance(status, int):
        return status
    unreachable: list[type] = [ConnectionError]
    for module, name in (("rebalancer.api", "NatsUnavailableError"),
                         # An exchange that cannot answer now (the pre-flight's walk).
                         ("rebalancer.errors", "RetryableError"),
                         ("events.errors", "StoreUnavailableError"),
                         ("psycopg", "OperationalError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            unreachable.append(cls)
    return EXIT_UNREACHABLE if isinstance(error, tuple(unreachable)) else EXIT_USAGE
