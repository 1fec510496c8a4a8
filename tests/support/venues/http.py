"""ccxt's HTTP layer replaced by a stateful fake venue: signing, error mapping and parsing stay
ccxt's own; only the bytes on the wire come from the fake."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import ccxt


@dataclass(frozen=True)
class Request:
    """One HTTP request as ccxt signed it: method, path, the parameters of its query and body
    merged (a JSON body's keys included), and its headers."""

    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]
    body: str | None
    url: str


@dataclass
class Response:
    status: int
    payload: Any  # dumped to JSON
    reason: str = "OK"


class Venue(Protocol):
    """A fake exchange: answers one request (its state changes as the real one's would)."""

    def handle(self, request: Request) -> Response: ...

    def too_many_requests(self) -> Response:
        """The exchange's own answer to a rate-limited request."""
        ...


class LostAnswer(Exception):
    """The venue executed the request and the answer never came back."""


@dataclass
class Fault:
    """What goes wrong with requests matching `method` and `path` (None: any), `times` times
    (None: always): "rate_limit" (refused unexecuted), "timeout" (never reached the venue),
    "lost_response" (executed, the answer lost), "server_error" (executed, HTTP 502) or "pass"
    (answered as usual: lets the first matches through before a later fault applies)."""

    kind: str
    method: str | None = None
    path: str | None = None
    times: int | None = None

    def matches(self, request: Request) -> bool:
        return (self.times is None or self.times > 0) and (
            self.method in (None, request.method)) and self.path in (None, request.path)


@dataclass
class Wire:
    """The requests one client sent, for assertions on method, path and parameters, and the
    faults arranged for the next ones."""

    sent: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def fault_for(self, request: Request) -> str | None:
        for fault in self.faults:
            if fault.matches(request):
                if fault.times is not None:
                    fault.times -= 1
                return fault.kind
        return None

    def paths(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.sent]

    def last(self, method: str, path: str) -> Request:
        for request in reversed(self.sent):
            if (request.method, request.path) == (method, path):
                return request
        raise AssertionError(f"no {method} {path} was sent; sent: {self.paths()}")

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.sent if (r.method, r.path) == (method, path))


def parse_request(url: str, method: str, headers: dict[str, str] | None,
                  body: str | None) -> Request:
    parts = urlsplit(url)
    params: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
    if body:
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = dict(parse_qsl(body, keep_blank_values=True))
        if isinstance(decoded, dict):
            params.update(decoded)
    return Request(method.upper(), parts.path, params, dict(headers or {}), body, url)


def install(client: ccxt.async_support.Exchange, venue: Venue,
            faults: list[Fault] | None = None) -> Wire:
    """Route every request of `client` to `venue`; returns the log of what was sent."""
    wire = Wire(faults=list(faults or []))

    async def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None,
                    body: str | None = None) -> Any:
        request_headers = client.prepare_request_headers(headers)
        request = parse_request(url, method, request_headers, body)
        wire.sent.append(request)
        fault = wire.fault_for(request)
        if fault == "timeout":
            raise ccxt.RequestTimeout(f"{client.id} {method} {url}")
        try:
            response = venue.too_many_requests() if fault == "rate_limit" else venue.handle(request)
        except LostAnswer:
            fault = "lost_response"
        if fault == "lost_response":
            raise ccxt.RequestTimeout(f"{client.id} {method} {url}")
        if fault == "server_error":
            response = Response(502, {"error": "Bad Gateway"}, "Bad Gateway")
        text = json.dumps(response.payload)
        parsed = client.parse_json(text)
        # The tail of ccxt's own fetch: the exchange's error codes, then the HTTP status.
        client.handle_errors(response.status, response.reason, url, method, {}, text, parsed,
                             request_headers, body)
        client.handle_http_status_code(response.status, response.reason, url, method, text)
        return parsed

    client.fetch = fetch
    return wire
