"""Where the dashboard listens: `--http [HOST:]PORT`, loopback unless told otherwise."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from rebalancer.errors import SpecError

DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Bind:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def parse_bind(text: str, *, allow_remote: bool = False) -> Bind:
    """`8080`, `127.0.0.1:8080`, `[::1]:8080` or `0.0.0.0:8080` (the last only with
    `allow_remote`); raises SpecError saying why a value is refused."""
    text = text.strip()
    host, port_text = DEFAULT_HOST, text
    if text.startswith("["):
        inside, _, rest = text[1:].partition("]")
        host, port_text = inside, rest.removeprefix(":")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise SpecError(f"--http {text}: expected [HOST:]PORT, e.g. 127.0.0.1:8080") from None
    if not 0 <= port <= 65535:
        raise SpecError(f"--http {text}: port {port} is out of range")
    bind = Bind(host or DEFAULT_HOST, port)
    if not bind.loopback and not allow_remote:
        raise SpecError(
            f"--http {text}: {bind.host} is not a loopback address. The dashboard shows"
            " where the money is, and with an operator token it pauses, cancels and resolves"
            " workflows, over plain HTTP: put it behind a TLS proxy and pass"
            " --http-allow-remote to bind beyond this machine")
    return bind


def listen(bind: Bind) -> socket.socket:
    """A socket listening on `bind`, made before anything else starts: an address in use is
    one line naming it (SpecError, exit 2), not a traceback after the worker has started."""
    try:
        # SO_REUSEADDR (as aiohttp's own sites): a port in TIME_WAIT is free, one in use is not.
        return socket.create_server((bind.host, bind.port), backlog=128)
    except OSError as e:
        # From the errno: create_server's own strerror repeats the address as a tuple.
        reason = os.strerror(e.errno) if e.errno else e.strerror or type(e).__name__
        raise SpecError(f"cannot listen on {bind.host}:{bind.port}:"
                        f" {reason[:1].lower()}{reason[1:]}") from None
