"""The NATS request/reply API: strict command bodies in, docs/contracts.md §3 replies out."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from events.errors import StoreUnavailableError
from events.store import EventStore
from events.vocabulary import Outcome
from projections.workflows import list_workflows, read_workflow
from rebalancer.accounts import Accounts
from rebalancer.commands import (
    CommandError,
    control_workflow,
    reopen_workflow,
    resolve_task,
    start_workflow,
    workflow_id_for,
)
from rebalancer.errors import RebalancerError, SpecError
from rebalancer.exchanges.base import Exchanges, RetryableError
from rebalancer.preflight import preflight_problems
from rebalancer.specs.loading import SpecCatalogue
from rebalancer.specs.models import WorkflowSpec
from rebalancer.specs.resolution import resolve_params

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes; a spec name and a few params need far less
# Arrays/objects inside one another; a start's `params` needs 2. Checked before parsing, since
# Python's json recurses and a few thousand brackets end it with a RecursionError.
MAX_DEPTH = 8
# Seconds a request may wait on PostgreSQL before it is answered as unavailable: under the
# command line's 10 s request timeout, so that an outage gets a reply rather than silence.
REPLY_WITHIN = 5.0
COMMANDS = "rebalancer.cmd"
QUERIES = "rebalancer.query"
QUEUE = "rebalancer-api"  # several `serve` processes share the requests

# C0 and C1 control characters and DEL: a NUL cannot be stored in PostgreSQL text, and the
# others would reach logs and terminals. Surrogates cannot be encoded as UTF-8 (nor stored).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Only free prose (`reason`, `note`) may break lines or tab.
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# The one spelling of a workflow id: the stream id and every table key are this text, so
# `urn:uuid:`, braces, upper case or no hyphens would name another (absent) workflow.
CANONICAL_UUID = re.compile("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _refusing(pattern: re.Pattern[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        found = pattern.search(text)
        if found:
            raise ValueError(f"control character U+{ord(found.group()):04X} at position"
                             f" {found.start()} is not allowed")
        return text

    return check


def _canonical_uuid(text: str) -> str:
    if not CANONICAL_UUID.fullmatch(text):
        raise ValueError("not a workflow id: it is a UUID in its canonical lower-case"
                         " hyphenated form (8-4-4-4-12 hex digits)")
    return text


# Never trimmed: `"spec  "` is another (unknown) name, not the spec it looks like.
Text = Annotated[str, StringConstraints(min_length=1, max_length=200),
                 AfterValidator(_refusing(_CONTROL))]
Note = Annotated[str, StringConstraints(max_length=2000),
                 AfterValidator(_refusing(_CONTROL_BUT_LINES))]


def _said(text: str) -> str:
    if not text.strip():
        raise ValueError("say what you checked: a resolve's note is its record of why")
    return text


# A resolve's note is the one record of why money was declared moved or not: never blank.
ResolveNote = Annotated[Note, AfterValidator(_said)]
ParamValue = Annotated[str, StringConstraints(max_length=200),
                       AfterValidator(_refusing(_CONTROL))]
WorkflowId = Annotated[str, AfterValidator(_canonical_uuid)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Start(_Body):
    command_id: Text
    spec: Text
    # Strings only: amounts travel as exact decimal text, never as JSON (binary) floats.
    params: dict[Text, ParamValue]


class Control(_Body):
    command_id: Text
    workflow_id: WorkflowId
    reason: Note | None = None
    # retry only: re-open a failed workflow at this task (`retry --from`).
    from_task: Text | None = None


class Resolve(_Body):
    command_id: Text
    workflow_id: WorkflowId
    task: Text
    outcome: Outcome
    note: ResolveNote
    # Facts of an outcome `done`: {"id": ..., "txid": ..., "amount": ...}, strings only.
    result: dict[Text, ParamValue] | None = None


class QueryWorkflow(_Body):
    workflow_id: WorkflowId


class QueryWorkflows(_Body):
    state: Text | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 50


Reply = dict[str, Any]


def error(code: str, message: str, **details: Any) -> Reply:
    return {"ok": False, "error": {"code": code, "message": message, "details": details}}


def unavailable(why: str) -> Reply:
    """The reply while PostgreSQL is away. The contract's codes (docs/contracts.md §3) have no
    "unavailable", so it is `internal`, told apart by `details.retryable`: the command may or
    may not have been applied, and a repeat of its command_id says which (or applies it)."""
    return error("internal", f"the database is unavailable ({why}); repeat the request with"
                 " the same command_id once it is back", retryable=True,
                 cause="database_unavailable")


def _retrieve(work: asyncio.Future[Any]) -> None:
    # A request answered as unavailable that finished later: its outcome stays for a repeat.
    if not work.cancelled() and work.exception() is not None:
        log.warning("a request answered as unavailable ended later: %s", work.exception())


class Api:
    """Answers one request at a time; `handle` knows nothing of NATS so it is tested directly."""

    def __init__(
        self,
        store: EventStore,
        accounts: Accounts,
        specs: Callable[[], Mapping[str, WorkflowSpec]],
        *,
        reply_within: float = REPLY_WITHIN,
        exchanges: Exchanges | None = None,
        actor: str = "nats",
    ) -> None:
        self.store = store
        # Who the events' metadata names: "nats", or "web" for the dashboard's operator.
        self.actor = actor
        # With exchanges, every start is walked by the pre-flight first (rebalancer/preflight.py).
        self.exchanges = exchanges
        self.accounts = accounts
        self.specs = specs
        self.reply_within = reply_within

    async def handle(self, subject: str, data: bytes) -> Reply:
        """The reply to one request; never raises for bad input. Each operator command is
        one INFO line: its kind, the workflow (and task), and how it came out."""
        parsed = self._parse(subject, data)
        request: _Body | None = None
        if isinstance(parsed, _Body):
            request, reply = parsed, await self._run(subject, parsed)
        else:
            reply = parsed
        if subject in ROUTES and subject.startswith(f"{COMMANDS}."):
            # The ids of a well-formed body; a refused body's text is never logged.
            workflow_id = reply.get("workflow_id") or getattr(request, "workflow_id", None)
            task = reply.get("task") or getattr(request, "task", None)
            if not reply.get("ok"):
                outcome = f"refused: {reply['error']['code']}"
            elif reply.get("state"):
                outcome = f"ok, {reply['state']}"
                if reply.get("task_state"):  # a cancel the worker carries out: `canceling`
                    outcome += f", task {reply['task_state']}"
            else:
                outcome = "ok, started" if reply.get("created") else "ok, already started"
            log.info("command %s %s%s: %s", subject.removeprefix(f"{COMMANDS}."),
                     workflow_id[:8] if workflow_id else "-", f" {task}" if task else "",
                     outcome, extra={"workflow_id": workflow_id, "task": task})
        return reply

    def _parse(self, subject: str, data: bytes) -> _Body | Reply:
        """The validated request, or the refusal of a body that does not fit its subject."""
        if len(data) > MAX_BODY:
            return error("invalid_request", f"body of {len(data)} bytes exceeds {MAX_BODY}")
        if _deeper_than(data, MAX_DEPTH):
            return error("invalid_request",
                         f"body nests arrays/objects deeper than {MAX_DEPTH} levels")
        try:
            # UTF-8 only: json.loads would also take UTF-16/32 bytes that the model then reads
            # differently.
            body = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            # ValueError covers bad JSON, bad UTF-8 and an integer of too many digits.
            return error("invalid_request", f"body is not JSON: {e}")
        if not isinstance(body, dict):
            return error("invalid_request", "body must be a JSON object")
        route = ROUTES.get(subject)
        if route is None:
            return error("invalid_request", f"no such subject {subject!r}",
                         subjects=sorted(ROUTES))
        try:
            return route[0].model_validate_json(data)
        except ValidationError as e:
            problems = [{"field": ".".join(_shown(p) for p in item["loc"]) or "(body)",
                         "problem": item["msg"]} for item in e.errors()]
            return error("invalid_request", "the body does not fit the command", problems=problems)

    async def _run(self, subject: str, request: _Body) -> Reply:
        action = ROUTES[subject][1]
        # Not cancelled when it takes too long: a cancel could land between an append and its
        # reply; left to finish, its outcome is what a repeat of the command_id returns.
        work = asyncio.ensure_future(action(self, request))
        done, _ = await asyncio.wait({work}, timeout=self.reply_within)
        if not done:
            work.add_done_callback(_retrieve)
            return unavailable(f"no answer from PostgreSQL within {self.reply_within:g} s")
        try:
            reply: Reply = work.result()
        except CommandError as e:
            return e.reply()
        except SpecError as e:
            return error("invalid_request", str(e))
        except StoreUnavailableError as e:
            log.warning("request on %s: %s", subject, e)
            return unavailable(str(e))
        except Exception:
            log.exception("request on %s failed", subject)
            return error("internal", "the request failed inside the service; see its log")
        return reply

    async def start(self, request: Start) -> Reply:
        specs = self.specs()
        spec = specs.get(request.spec)
        if spec is None:
            broken = specs.broken_named(request.spec) if isinstance(specs, SpecCatalogue) else None
            if broken is not None:
                return error("invalid_request", f"spec {request.spec!r} is broken"
                             f" ({broken.file}): {broken.error}")
            return error("unknown_spec", f"no spec named {request.spec!r}", known=sorted(specs))
        # A repeat of a start that went through is answered from the store, not walked again:
        # the money it moved since would make the walk refuse its own workflow.
        if self.exchanges is not None and not await self.store.stream_version(
                f"workflow-{workflow_id_for(request.command_id)}"):
            resolved = resolve_params(spec, dict(request.params), self.accounts)
            try:
                problems = await preflight_problems(spec, resolved, self.accounts,
                                                    self.exchanges)
            except RetryableError as e:
                return error("internal", f"the pre-flight could not ask the exchange ({e});"
                             " repeat the request", retryable=True, cause="exchange_unavailable")
            if problems:
                return error("invalid_request", "the pre-flight refuses it:\n"
                             + "\n".join(problems), problems=problems)
        workflow_id, created = await start_workflow(
            self.store, spec, dict(request.params), self.accounts,
            command_id=request.command_id, actor=self.actor)
        return {"ok": True, "workflow_id": workflow_id, "created": created}

    async def control(self, kind: str, request: Control) -> Reply:
        if request.from_task is not None:
            if kind != "retry":
                return error("invalid_request", f"from_task is for retry, not {kind}",
                             problems=[{"field": "from_task", "problem": "retry only"}])
            return await reopen_workflow(self.store, request.command_id, request.workflow_id,
                                         request.from_task, request.reason, actor=self.actor)
        return await control_workflow(self.store, kind, request.command_id,
                                      request.workflow_id, request.reason, actor=self.actor)

    async def resolve(self, request: Resolve) -> Reply:
        return await resolve_task(self.store, request.command_id, request.workflow_id,
                                  request.task, request.outcome, request.note, actor=self.actor,
                                  result=request.result, exchanges=self.exchanges)

    async def query_workflow(self, request: QueryWorkflow) -> Reply:
        view = await read_workflow(self.store, request.workflow_id)
        if view is None:
            return error("not_found", f"no workflow {request.workflow_id} in the read model")
        return {"ok": True, "workflow": _plain(asdict(view))}

    async def query_workflows(self, request: QueryWorkflows) -> Reply:
        found = await list_workflows(self.store, state=request.state, limit=request.limit)
        return {"ok": True, "workflows": [_plain(asdict(w)) for w in found]}


def _control(kind: str) -> Callable[[Api, Any], Any]:
    return lambda api, request: api.control(kind, request)


ROUTES: dict[str, tuple[type[_Body], Callable[[Api, Any], Any]]] = {
    f"{COMMANDS}.start": (Start, lambda api, r: api.start(r)),
    f"{COMMANDS}.cancel": (Control, _control("cancel")),
    f"{COMMANDS}.pause": (Control, _control("pause")),
    f"{COMMANDS}.resume": (Control, _control("resume")),
    f"{COMMANDS}.retry": (Control, _control("retry")),
    f"{COMMANDS}.resolve": (Resolve, lambda api, r: api.resolve(r)),
    f"{QUERIES}.workflow": (QueryWorkflow, lambda api, r: api.query_workflow(r)),
    f"{QUERIES}.workflows": (QueryWorkflows, lambda api, r: api.query_workflows(r)),
}


def _deeper_than(data: bytes, limit: int) -> bool:
    """Whether JSON arrays/objects nest deeper than `limit`, counting brackets outside strings.

    A byte scan with no recursion: in UTF-8 the bytes `"`, `\\`, `[` and `{` never occur inside
    a multi-byte character, so invalid text cannot hide a bracket. Malformed JSON (a stray
    closer included) is left to the parser, which stops at its first error: over any prefix it
    accepts, this count is its nesting."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def _shown(part: int | str) -> str:
    """A field path part as printable text: a refused key may itself hold control characters."""
    text = str(part)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


async def serve_api(api: Api, nc: Any) -> list[Any]:
    """Subscribe the API on a connected NATS client; returns the subscriptions (drain them)."""

    async def on_request(msg: Any) -> None:
        if not msg.reply:
            # Published, not requested: nobody would learn the outcome, so nothing is run.
            log.debug("ignored a message on %s without a reply subject", msg.subject)
            return
        if msg.reply.startswith("$JS.ACK."):
            # A JetStream push consumer delivering stored messages onto a command subject (any
            # user allowed to create consumers could aim one here: docs/contracts.md §3).
            log.warning("ignored a JetStream delivery on %s: commands are requests", msg.subject)
            return
        try:
            reply = await api.handle(msg.subject, msg.data)
        except Exception:
            # handle answers every bad input itself; this is a bug, and it still gets a reply.
            log.exception("request on %s failed", msg.subject)
            reply = error("internal", "the request failed inside the service; see its log")
        await msg.respond(json.dumps(reply).encode())

    return [
        await nc.subscribe(f"{COMMANDS}.>", queue=QUEUE, cb=on_request),
        await nc.subscribe(f"{QUERIES}.>", queue=QUEUE, cb=on_request),
    ]


# -- the NATS side of a process: connecting, and the command line's client calls ------------------


class NatsUnavailableError(RebalancerError):
    """NATS cannot be reached (or refused us); the command did not go out."""


class OutageLog:
    """One WARNING when a connection to NATS is lost and one when it is back, with how long it
    was away: nats-py's default error callback logs a traceback per reconnect attempt."""

    def __init__(self, url: str) -> None:
        self.where = where(url)
        self.client: Any = None  # set once connected: its own close is no outage
        self.down_since: float | None = None

    async def on_error(self, error: Exception) -> None:
        log.debug("NATS at %s: %s", self.where, error or type(error).__name__)

    async def on_disconnected(self) -> None:
        client = self.client
        if client is None or client.is_closed or client.is_draining or self.down_since is not None:
            return
        self.down_since = time.monotonic()
        log.warning("NATS at %s unreachable; reconnecting", self.where)

    async def on_reconnected(self) -> None:
        if self.down_since is None:
            return
        away, self.down_since = time.monotonic() - self.down_since, None
        log.warning("NATS at %s back after %.1f s", self.where, away)


async def connect(url: str, *, name: str, timeout: float = 5.0) -> Any:
    """A NATS connection that reconnects forever once it has connected the first time; an
    outage is two log lines (OutageLog), not one per attempt."""
    import nats

    from events.relay.servers import connect_options as server_options

    outage = OutageLog(url)
    try:
        client = await nats.connect(**server_options(url), name=name, connect_timeout=timeout,
                                    inbox_prefix=inbox_prefix_for(url),
                                    max_reconnect_attempts=-1, reconnect_time_wait=1.0,
                                    allow_reconnect=True, error_cb=outage.on_error,
                                    disconnected_cb=outage.on_disconnected,
                                    reconnected_cb=outage.on_reconnected)
    except Exception as e:  # nats-py raises several unrelated types for "not there"
        raise NatsUnavailableError(f"cannot reach NATS at {where(url)}: {e or type(e).__name__}"
                                   ) from e
    outage.client = client
    return client


async def request(url: str, subject: str, payload: Mapping[str, Any],
                  timeout: float = 10.0, connect_timeout: float = 5.0) -> Reply:
    """One request to a running `rebalancer serve`; raises NatsUnavailableError."""
    import nats.errors

    nc = await _connect_once(url, connect_timeout)
    try:
        msg = await nc.request(subject, json.dumps(payload).encode(), timeout=timeout)
    except nats.errors.NoRespondersError as e:
        raise NatsUnavailableError(
            f"nothing answers {subject} at {where(url)}: is `rebalancer serve` running?") from e
    except nats.errors.TimeoutError as e:
        raise NatsUnavailableError(f"no reply to {subject} within {timeout:g} s") from e
    finally:
        await nc.close()
    reply: Reply = json.loads(msg.data)
    return reply


async def follow(url: str, workflow_id: str, on_event: Callable[[Any], bool],
                 timeout: float | None = None, *, from_start: bool = True,
                 ready: Callable[[], Awaitable[bool]] | None = None) -> None:
    """Feed a workflow's relayed events to `on_event` until it returns True: from its first,
    or (`from_start=False`) those relayed from now on. `ready`, when given, is awaited once
    the place to read from is fixed (and once while there is no stream yet); True ends it."""
    import nats.js.errors

    from events.relay import Subscriber
    from events.relay.subscriber import FAILOVER_ERRORS

    nc = await _connect_once(url, 5.0)
    asked = False
    # Where an earlier entry stopped: a failover that ends one (a cluster electing a stream
    # leader while it enters) resumes at the same sequence, nothing shown twice or skipped.
    resume: int | None = None
    seen: dict[str, int] = {}
    try:
        subject = f"rebalancer.events.{workflow_id}.>" if workflow_id else "rebalancer.events.>"
        while True:
            reading = False
            try:
                async with Subscriber(nc, subject, from_now=not from_start, seen=seen,
                                      from_sequence=resume) as events:
                    resume = events.next_sequence
                    if ready is not None and await ready():
                        return
                    while True:
                        reading = True
                        event = await events.next(timeout=timeout)
                        reading = False
                        resume, seen = events.next_sequence, events.last_versions
                        if on_event(event):
                            return
            except FAILOVER_ERRORS:
                if reading and timeout is not None:
                    raise  # `timeout` passed with no event (next() rides out failovers)
                await asyncio.sleep(0.5)
            except nats.js.errors.NotFoundError:
                # No stream yet: a `serve` that has never relayed creates it on its first pass.
                if ready is not None and not asked:
                    asked = True
                    if await ready():
                        return
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def _connect_once(url: str, timeout: float) -> Any:
    import nats

    from events.relay.servers import connect_options as server_options

    seen: list[Exception] = []

    async def quiet(error: Exception) -> None:
        """nats-py's default logs a traceback per attempt; the failure below says it once."""
        seen.append(error)

    try:
        # With no retries allowed nats-py still loops over a refused first connect for ever;
        # one quick retry makes it give up (NoServersError), and wait_for bounds a silent host.
        return await asyncio.wait_for(
            nats.connect(**server_options(url), name="rebalancer-cli", connect_timeout=timeout,
                         inbox_prefix=inbox_prefix_for(url), max_reconnect_attempts=1,
                         reconnect_time_wait=0.1, allow_reconnect=False, error_cb=quiet),
            timeout)
    except Exception as e:
        why = seen[-1] if seen else e
        text = str(why) or (f"no answer within {timeout:g} s" if isinstance(
            why, TimeoutError) else type(why).__name__)
        raise NatsUnavailableError(f"cannot reach NATS at {where(url)}: {text}") from e


def inbox_prefix_for(url: str) -> str:
    """The URL user's own inbox prefix (docs/contracts.md §3): no user reads another's replies."""
    from events.relay.servers import user_of
    from rebalancer.embedded.permissions import inbox_prefix

    user = user_of(url)
    # A name that is not one subject token (or none: no users) keeps nats-py's default.
    return inbox_prefix(user) if re.fullmatch(r"[A-Za-z0-9_-]+", user) else "_INBOX"


def where(url: str) -> str:
    """host:port of a NATS URL (of each, for a cluster's list), never its credentials."""
    from events.relay.servers import where as servers_where

    return servers_where(url)
