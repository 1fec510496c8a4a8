"""Embedded PostgreSQL + NATS (JetStream) servers for a checkout with no system services."""

from rebalancer.embedded.nats_server import nats_config
from rebalancer.embedded.permissions import (
    NATS_OPERATOR,
    NATS_PASSWORD_VARIABLES,
    NATS_PERMISSIONS,
    NATS_SUBSCRIBER,
    READABLE_STREAMS,
    nats_authorization,
    reference_nats_authorization,
)
from rebalancer.embedded.postgres import find_pg_bin_dir
from rebalancer.embedded.servers import down, ensure_urls, load_info, status, up
from rebalancer.embedded.state import InfraInfo, masked_url

__all__ = [
    "NATS_OPERATOR",
    "NATS_PASSWORD_VARIABLES",
    "NATS_PERMISSIONS",
    "NATS_SUBSCRIBER",
    "READABLE_STREAMS",
    "InfraInfo",
    "down",
    "ensure_urls",
    "find_pg_bin_dir",
    "load_info",
    "masked_url",
    "nats_authorization",
    "nats_config",
    "reference_nats_authorization",
    "status",
    "up",
]
