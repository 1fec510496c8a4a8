"""The `rebalancer` command line: one handler per sub-command, errors turned into one line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable

from events.errors import EventStoreError
from rebalancer import embedded
from rebalancer.errors import RebalancerError
from rebalancer.settings import Settings

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


class UsageError(RebalancerError):
    """The command cannot run as asked (nothing set up yet, missing input): exit status 2."""


# --------------------------------------------------------------------------- infra


def infra_up(args: argparse.Namespace) -> int:
    home = Settings().home
    was = embedded.status(home)
    info = embedded.up(home)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
        return EXIT_OK
    pg = "already running" if was["postgresql"] else "started"
    nats = "already running" if was["nats"] else "started"
    print(f"PostgreSQL {pg}: {info.database_url}")
    print(f"  data {info.pg_data_dir}, binaries {info.pg_bin_dir}")
    print(f"NATS {nats}: {info.nats_url}")
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
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Conditions the user can fix (a server down, bad input): one line, not a traceback."""
    expected: list[type[BaseException]] = [RebalancerError, EventStoreError, OSError]
    # Looked up rather than imported: only modules that talk to them import psycopg, nats and
    # pydantic, and an error of a library nobody loaded cannot have been raised.
    for module, name in (
        ("psycopg", "OperationalError"),
        ("nats.errors", "Error"),
        ("pydantic", "ValidationError"),
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
