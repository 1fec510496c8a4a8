"""The dashboard's HTTP server (aiohttp), run by `serve --http` inside its event loop.

aiohttp because the dashboard is one more component of `serve`: it runs in the loop beside the
worker and shares its store pool, streams server-sent events with no extra machinery, is one
dependency with no build step, and its test client needs no second server process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Set
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web

from events.errors import EventStoreError, StoreUnavailableError
from events.relay import Relay
from events.store import EventStore
from events.vocabulary import WorkflowState
from projections.exposure import read_exposure
from projections.workflows import list_workflow_rows, read_workflow, spec_names
from rebalancer.accounts import Accounts
from rebalancer.api import CANONICAL_UUID, Api
from rebalancer.balances import Holding, Unreadable, read_balances
from rebalancer.cli.common import UsageError
from rebalancer.cli.format import json_default, jsonable
from rebalancer.cli.reports import load_view
from rebalancer.exchanges.base import Exchanges
from rebalancer.web import pages
from rebalancer.web.binding import Bind, listen
from rebalancer.web.health import Readiness
from rebalancer.web.operator import token_matches
from rebalancer.web.render import layout

log = logging.getLogger(__name__)

# `/metrics`: a callable giving the body and its content type (rebalancer/metrics.py).
Exposition = Callable[[], tuple[bytes, str]]
POLL = 0.5  # seconds between looks at the projections' checkpoints (what feeds the live view)
HEARTBEAT = 15.0  # seconds between SSE comments, so proxies keep an idle stream open
BALANCES_FOR = 5.0  # seconds a balances read is reused: each one calls every exchange
ACTIONS = ("pause", "resume", "cancel", "resolve")
STATUS = {"invalid_request": 400, "not_found": 404, "conflict": 409, "illegal_transition": 409,
          "unknown_spec": 404, "internal": 503}
# A pasted token or note is small; anything larger is not a form this page sent.
MAX_FORM = 16 * 1024
LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "localhost", "::1"})


class Changes:
    """Tells the live views that the read models moved: watches the projections' checkpoints
    and wakes every waiting stream, with a sequence number each can compare."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.seen: tuple[Any, ...] | None = None
        self.sequence = 0
        self.listeners = 0  # open event streams: with none, nothing is polled
        self._moved = asyncio.Condition()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self.listeners:
                self.seen = None  # the first stream to come sees the next move
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL)
                continue
            try:
                rows = await self.store.fetch_rows(
                    "select name, position, events_applied from projection_checkpoints"
                    " order by name", ())
            except EventStoreError as e:
                log.debug("dashboard: checkpoints not read: %s", e)
                rows = None
            if rows is not None and tuple(rows) != self.seen:
                self.seen = tuple(rows)
                await self.moved()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)
        await self.moved()  # the streams see `stop` and end

    async def moved(self) -> None:
        async with self._moved:
            self.sequence += 1
            self._moved.notify_all()

    async def wait(self, after: int, timeout: float) -> int:
        async with self._moved:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._moved.wait_for(lambda: self.sequence > after), timeout)
            return self.sequence


class Dashboard:
    """The pages, the live stream, the health checks and the operator's actions."""

    def __init__(
        self,
        store: EventStore,
        accounts: Accounts,
        specs: Callable[[], Any],
        exchanges: Exchanges,
        bind: Bind,
        *,
        token: str | None = None,
        relay: Relay | None = None,
        nats_connected: Callable[[], bool | None] = lambda: None,
        projection_lag_seconds: float = 30.0,
        relay_lag_seconds: float = 30.0,
        metrics: Exposition | None = None,
        hosts: frozenset[str] = frozenset(),
        listener: socket.socket | None = None,
    ) -> None:
        self.store = store
        self.accounts = accounts
        self.exchanges = exchanges
        # Bound by the caller before anything started (serve), else by `run`.
        self._listener = listener
        if listener is not None and bind.port == 0:  # an ephemeral port: say which
            bind = Bind(bind.host, int(listener.getsockname()[1]))
        self.bind = bind
        # The names a request may say it is for: this machine, the bind address when it is
        # one, and those configured (a proxy's public name).
        self.hosts = LOOPBACK_NAMES | hosts | (
            {bind.host.lower()} if bind.host not in ("0.0.0.0", "::") else set())
        self._token = token
        self.metrics = metrics
        self.changes = Changes(store)
        self.readiness = Readiness(store, relay, projection_lag_seconds, relay_lag_seconds,
                                   nats_connected)
        # The NATS API's own parsing, validation, handlers and idempotency, as actor "web".
        self.api = Api(store, accounts, specs, exchanges=exchanges, actor="web")
        self._balances: tuple[float, list[Holding], list[Unreadable], datetime] | None = None
        self._balances_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.started = asyncio.Event()  # set once listening (self.url has the real port)
        self.url = bind.url()

    @property
    def operator(self) -> bool:
        return self._token is not None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_FORM, middlewares=[self._guard])
        app.router.add_get("/", self.workflows)
        app.router.add_get("/workflows/{workflow_id}", self.workflow)
        app.router.add_get("/attention", self.attention)
        app.router.add_get("/exposure", self.exposure)
        app.router.add_get("/exposure.json", self.exposure_json)
        app.router.add_get("/events", self.events)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_post("/actions/{kind}", self.action)
        return app

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` on the listener given, else on one bound now (SpecError when
        the address cannot be bound)."""
        sock = self._listener or listen(self.bind)
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                               shutdown_timeout=2.0)
        try:
            await runner.setup()
            site = web.SockSite(runner, sock)
            await site.start()
            if self.bind.port == 0:  # an ephemeral port: say which
                self.bind = Bind(self.bind.host, int(sock.getsockname()[1]))
                self.url = self.bind.url()
            log.info("dashboard at %s (%s)", self.url,
                     "operator actions on" if self.operator else "read-only")
            self.started.set()
            await self.changes.run(stop)
        finally:
            self._stopping.set()
            await self.changes.moved()
            await runner.cleanup()
            sock.close()  # the server closed it once started; not when it failed before

    # -- guard -----------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        # A Host that is not one of ours is a DNS-rebinding page reading the dashboard through
        # the browser (reading needs no token): refused, on every bind. A bind on every
        # interface (a container's) is reached by the names it is published at.
        if _host_name(request.host) not in self.hosts:
            return web.Response(status=421, text="misdirected request: unknown Host (add it"
                                " to REBALANCER_HTTP_HOSTS if this dashboard is served there)\n")
        response = await handler(request)
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self';"
            " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def _page(self, title: str, body: str, path: str, *, status: int = 200,
              attention: int | None = None) -> web.Response:
        return web.Response(status=status, content_type="text/html", charset="utf-8",
                            text=layout(title, body, path=path, operator=self.operator,
                                        attention=attention))

    async def _attention_count(self) -> int:
        rows = await self.store.fetch_rows(
            "select count(*) from workflows where state = %s",
            (WorkflowState.NEEDS_ATTENTION.value,))
        return int(rows[0][0])

    def _unavailable(self, path: str, error: Exception) -> web.Response:
        return self._page("unavailable", pages.message_page(
            "The database is unavailable", f"{str(error).splitlines()[0]}; this page shows"
            " it again once PostgreSQL is back."), path, status=503)

    # -- pages -----------------------------------------------------------------------------

    async def workflows(self, request: web.Request) -> web.Response:
        state = request.query.get("state") or None
        spec = request.query.get("spec") or None
        if state is not None and state not in set(WorkflowState):
            state = None
        try:
            rows = await list_workflow_rows(self.store, state=state, spec=spec)
            # Those the read model has workflows of, and those this process could start.
            specs = sorted(set(await spec_names(self.store)) | set(self.api.specs()))
            waiting = await self._attention_count()
        except StoreUnavailableError as e:
            return self._unavailable("/", e)
        return self._page("workflows", pages.workflows_page(rows, state=state, spec=spec,
                                                            specs=specs), "/",
                          attention=waiting)

    async def workflow(self, request: web.Request) -> web.Response:
        workflow_id = request.match_info["workflow_id"]
        path = f"/workflows/{workflow_id}"
        if not CANONICAL_UUID.fullmatch(workflow_id):
            return self._page("not found", pages.message_page(
                "Not found", "a workflow id is a UUID (8-4-4-4-12 lower-case hex digits)"),
                path, status=404)
        try:
            view, note = await load_view(self.store, workflow_id, None)
            events = await self.store.read_stream(f"workflow-{workflow_id}")
            waiting = await self._attention_count()
        except UsageError as e:
            return self._page("not found", pages.message_page("Not found", str(e)), path,
                              status=404)
        except StoreUnavailableError as e:
            return self._unavailable(path, e)
        return self._page(f"workflow {workflow_id[:8]}", pages.workflow_page(
            view, events, note, operator=self.operator), path, attention=waiting)

    async def attention(self, request: web.Request) -> web.Response:
        try:
            rows = await list_workflow_rows(self.store, state=WorkflowState.NEEDS_ATTENTION,
                                            limit=200)
            views = [v for r in rows if (v := await read_workflow(self.store, r.workflow_id))]
        except StoreUnavailableError as e:
            return self._unavailable("/attention", e)
        return self._page("needs attention", pages.attention_page(views, operator=self.operator),
                          "/attention", attention=len(views))

    async def _exposure(self) -> dict[str, Any]:
        found: dict[str, Any] = jsonable(await read_exposure(self.store))
        return found

    async def exposure(self, request: web.Request) -> web.Response:
        try:
            found = await self._exposure()
            waiting = await self._attention_count()
        except StoreUnavailableError as e:
            return self._unavailable("/exposure", e)
        # Only the page itself reads balances: a live refresh leaves that section alone.
        live = request.headers.get("X-Live") == "1"
        holdings, unreadable, read_at = ([], [], None) if live else await self._read_balances()
        return self._page("money", pages.exposure_page(found, holdings, unreadable, read_at),
                          "/exposure", attention=waiting)

    async def exposure_json(self, request: web.Request) -> web.Response:
        try:
            found = await self._exposure()
        except StoreUnavailableError as e:
            return web.json_response({"ok": False, "error": str(e).splitlines()[0]}, status=503)
        return web.json_response(found, dumps=lambda v: json.dumps(v, default=json_default))

    async def _read_balances(self) -> tuple[list[Holding], list[Unreadable], datetime | None]:
        # One read in flight: page loads arriving together share it rather than each calling
        # every exchange out of the worker's own request budgets.
        async with self._balances_lock:
            cached = self._balances
            if cached is None or time.monotonic() - cached[0] > BALANCES_FOR:
                holdings, unreadable = await read_balances(self.exchanges, self.accounts)
                cached = self._balances = (time.monotonic(), holdings, unreadable,
                                           datetime.now(UTC))
        return cached[1], cached[2], cached[3]

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        types = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
        if name not in types:
            raise web.HTTPNotFound()
        text = resources.files("rebalancer.web").joinpath("static", name).read_text("utf-8")
        return web.Response(text=text, content_type=types[name], charset="utf-8")

    # -- live ------------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `change` whenever the read models moved (the page then fetches
        itself again and swaps its live parts); a comment now and then to keep it open."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        sequence = self.changes.sequence
        await response.write(b"retry: 2000\n\n")
        self.changes.listeners += 1
        try:
            while not self._stopping.is_set():
                now = await self.changes.wait(sequence, HEARTBEAT)
                if self._stopping.is_set():
                    break
                if now == sequence:
                    await response.write(b": idle\n\n")
                    continue
                sequence = now
                await response.write(f"event: change\ndata: {sequence}\n\n".encode())
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self.changes.listeners -= 1
        return response

    # -- health ----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, body = await self.readiness.check()
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise web.HTTPNotFound(text="no metrics in this process\n")
        body, content_type = self.metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    # -- the operator's actions ------------------------------------------------------------

    async def action(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if kind not in ACTIONS:
            raise web.HTTPNotFound()
        if self._token is None:
            return self._reply(request, 403, _refusal(
                "read_only", "this dashboard is read-only: no operator token is configured"))
        if not _same_origin(request, self.hosts):
            log.warning("dashboard: refused a %s posted from another site", kind)
            return self._reply(request, 403, _refusal(
                "cross_site", "refused: the request did not come from this dashboard"))
        form = await request.post()
        given = request.headers.get("X-Operator-Token") or _text(form.get("token"))
        if not token_matches(self._token, given):
            # Neither the given value nor the expected one is logged: only that it failed.
            log.warning("dashboard: refused a %s: %s operator token", kind,
                        "wrong" if given else "no")
            return self._reply(request, 401, _refusal(
                "unauthorized", "refused: the operator token is missing or wrong"))
        body = _command_body(kind, form)
        reply = await self.api.handle(f"rebalancer.cmd.{kind}", json.dumps(body).encode())
        status = 200 if reply.get("ok") else STATUS.get(reply["error"]["code"], 400)
        return self._reply(request, status, reply)

    def _reply(self, request: web.Request, status: int, reply: dict[str, Any]) -> web.Response:
        if "application/json" in request.headers.get("Accept", ""):
            return web.json_response(reply, status=status)
        text = ("done: " + ", ".join(f"{k} {v}" for k, v in reply.items() if k != "ok")
                if reply.get("ok") else f"refused ({reply['error']['code']}):"
                f" {reply['error']['message']}")
        return self._page("action", pages.message_page("Operator action", text), "/action",
                          status=status)


def _refusal(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message, "details": {}}}


def _same_origin(request: web.Request, hosts: Set[str]) -> bool:
    """A browser says where a POST comes from; one from another site is refused even before
    the token is looked at (the token alone already stops it: see operator.py). The Origin's
    name, not its scheme, is compared: behind a TLS proxy the page is https, the request http."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return _host_name(urlsplit(origin).netloc) in hosts


def _host_name(host: str) -> str:
    """`name:port`, `[v6]:port` or `name` -> the name, lower case."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0].lower()
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).lower()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _command_body(kind: str, form: Any) -> dict[str, Any]:
    """The NATS command body for a form: the API validates it as it would one from NATS."""
    def field(name: str) -> str | None:
        value = _text(form.get(name))
        return value if value else None

    body: dict[str, Any] = {"command_id": field("command_id") or "",
                            "workflow_id": field("workflow_id") or ""}
    if kind == "resolve":
        body.update(task=field("task") or "", outcome=field("outcome") or "",
                    note=field("note") or "")
        result = {k: v for k in ("id", "txid", "amount") if (v := field(f"result_{k}"))}
        if result:
            body["result"] = result
    elif field("reason"):
        body["reason"] = field("reason")
    return body
