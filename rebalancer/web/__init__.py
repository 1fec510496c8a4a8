"""The dashboard `serve --http` runs: server-rendered pages on the read models, live over
server-sent events, `/healthz` and `/readyz`, and (with an operator token) the operator's
commands through the same handlers as the NATS API."""

from rebalancer.web.app import Dashboard
from rebalancer.web.binding import Bind, listen, parse_bind

__all__ = ["Bind", "Dashboard", "listen", "parse_bind"]
