"""A NATS address as the settings spell it: one URL, or a cluster's several, comma-separated.

`nats://operator:pw@n1:4222,nats://n2:4222,nats://n3:4222` (the seed list a NATS client takes)
names a cluster; the user and password of the first URL that has them are the connection's.
They go to nats-py as options rather than inside each URL because the servers a cluster
announces to the client (INFO connect_urls) carry none: after a failover to an announced node,
credentials taken from the URL alone would be missing and the server would refuse the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

DEFAULT_PORT = 4222


def server_urls(url: str | Sequence[str]) -> list[str]:
    """Each URL of `url` (a comma-separated string or a list), blanks dropped, as given."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    found = [part.strip() for part in parts if part.strip()]
    if not found:
        raise ValueError("no NATS server URL given")
    return found


def _split(url: str) -> tuple[str, str | None, str | None, str]:
    """(scheme, user, password, host:port) of one URL, percent-decoded."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    return parts.scheme or "nats", user, password, f"{host}:{parts.port or DEFAULT_PORT}"


def connect_options(url: str | Sequence[str]) -> dict[str, Any]:
    """Keyword arguments for nats.connect: `servers` without credentials, and `user` and
    `password` (or `token`, a user part without a password) from the first URL holding them."""
    servers: list[str] = []
    credentials: dict[str, str] = {}
    for one in server_urls(url):
        scheme, user, password, address = _split(one)
        servers.append(f"{scheme}://{address}")
        if credentials or user is None:
            continue
        credentials = ({"token": user} if password is None
                       else {"user": user, "password": password})
    return {"servers": servers, **credentials}


def user_of(url: str | Sequence[str]) -> str:
    """The user the connection logs in as ("" when none)."""
    options = connect_options(url)
    return str(options.get("user", ""))


def where(url: str | Sequence[str]) -> str:
    """host:port of each server, comma-separated, never a credential."""
    return ",".join(_split(one)[3] for one in server_urls(url))
