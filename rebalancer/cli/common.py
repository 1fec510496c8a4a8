"""What every command shares: exit statuses, the usage error, the servers and the store to use."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from rebalancer import embedded
from rebalancer.errors import RebalancerError
from rebalancer.settings import Settings

if TYPE_CHECKING:
    from events.store import EventStore

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3  # the service refused: conflict or illegal_transition
EXIT_UNREACHABLE = 4  # NATS, PostgreSQL or `serve` cannot be reached

T = TypeVar("T")


class UsageError(RebalancerError):
    """The command cannot run as asked (nothing set up yet, missing input): exit status 2.
    `lines` are printed one per line under the message (the pre-flight's problems)."""

    exit_status = EXIT_USAGE

    def __init__(self, message: str, lines: Sequence[str] = (), *, listing: bool = False
                 ) -> None:
        super().__init__(message)
        self.lines = list(lines)
        # The lines are a list the message introduces (candidates), not problems to count.
        self.listing = listing


class ConflictError(UsageError):
    """The service refused the command as it stands now (conflict, illegal_transition)."""

    exit_status = EXIT_CONFLICT


# Commands that never read the configuration: they work while it is being fixed.
NO_CONFIG_COMMANDS = frozenset({"infra", "db"})


def check_configuration(settings: Settings) -> None:
    """Read the whole configuration file once, before the command: a typo anywhere in it is
    one line naming the file, the key and the problem (SpecError, exit 2), whichever section
    the command would have read first."""
    from rebalancer.accounts import load_accounts, spec_dirs
    from rebalancer.exchanges.live import exchange_options
    from rebalancer.sinks import load_webhooks

    load_accounts(settings.config)
    spec_dirs(settings.config)
    exchange_options(settings.config)
    # Their shape only: the URLs are read by `serve`, the one command that sends to them.
    load_webhooks(settings.config)


def database_url(settings: Settings) -> str:
    # Only the database is needed: an explicit URL must not start the embedded servers.
    return settings.database_url or embedded.ensure_urls(settings)[0]


def nats_url(settings: Settings) -> str:
    return settings.nats_url or embedded.ensure_urls(settings)[1]


def reader_url(settings: Settings) -> str:
    """NATS for reading only: as the subscriber user where one is configured (or embedded)."""
    if settings.nats_subscriber_url:
        return settings.nats_subscriber_url
    if settings.nats_url:
        return settings.nats_url
    embedded.ensure_urls(settings)
    info = embedded.load_info(settings.home)
    if info is None:
        raise UsageError(f"no embedded servers under {settings.home}")
    return info.nats_subscriber_url


def with_store(settings: Settings, work: Callable[[EventStore], Awaitable[T]]) -> T:
    """Run `work` on an event store opened for this command, closing it whatever happens."""
    from events.store import EventStore

    url = database_url(settings)

    async def run() -> T:
        store = await EventStore.open(url, max_size=4, connect_timeout=settings.connect_timeout)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def request(settings: Settings, command: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send one command to `rebalancer serve` over NATS; a refusal is a UsageError."""
    from rebalancer.api import request as nats_request

    reply = asyncio.run(nats_request(nats_url(settings), f"rebalancer.cmd.{command}", body,
                                     connect_timeout=settings.connect_timeout))
    if not reply.get("ok"):
        problem = reply.get("error") or {}
        if problem.get("code") in ("conflict", "illegal_transition"):
            raise ConflictError(f"{problem['code']}: {problem.get('message', reply)}")
        message = str(problem.get("message", reply))
        lines = (problem.get("details") or {}).get("problems")
        if isinstance(lines, list) and lines and all(
                isinstance(line, dict) and {"field", "problem"} <= set(line) for line in lines):
            # A body the API refused field by field (`--note ''`): say which and why.
            lines = [f"{line['field']}: {str(line['problem']).removeprefix('Value error, ')}"
                     for line in lines]
        if isinstance(lines, list) and all(isinstance(line, str) for line in lines):
            message = message.split("\n", 1)[0]  # the problems follow, one per line
        else:
            lines = []
        raise UsageError(f"{problem.get('code', 'error')}: {message}", lines)
    return reply


def stream_id_of(workflow_id: str) -> str:
    return f"workflow-{workflow_id}"


def _one_line(text: object) -> str:
    return " ".join(str(text).split()) or type(text).__name__


def problem_lines(error: BaseException) -> list[str]:
    """What the command line prints for `error`: one line per problem, a single one on the
    line that names what it concerns, several (a spec's, the pre-flight's) each on its own line
    under that heading."""
    problems = [str(p) for p in getattr(error, "lines", None) or getattr(error, "problems", None)
                or ()]
    if not problems:
        return [f"rebalancer: {_one_line(error)}"]
    subject = getattr(error, "subject", None) or str(error).split("\n", 1)[0].rstrip(":")
    if getattr(error, "listing", False):
        return [f"rebalancer: {_one_line(error)}", *(f"  {_one_line(p)}" for p in problems)]
    if len(problems) == 1:
        return [f"rebalancer: {_one_line(subject)}: {_one_line(problems[0])}"]
    return [f"rebalancer: {_one_line(subject)}: {len(problems)} problems",
            *(f"  {_one_line(p)}" for p in problems)]
