"""The NATS users and their permissions, for the embedded server and the reference config."""

from __future__ import annotations

import json
from typing import Final

# docs/contracts.md §3: the operator (the user `rebalancer serve` runs as) may do everything; the
# subscriber may read events and alerts and nothing else. These lists are the one source of both
# the embedded server's users and the `authorization` block of infra/nats/rebalancer.conf
# (tests/integration/test_nats_access.py checks that the file still says the same).

NATS_OPERATOR = "operator"
NATS_SUBSCRIBER = "subscriber"
# The reference config reads the passwords from these environment variables.
NATS_PASSWORD_VARIABLES: Final = {
    NATS_OPERATOR: "REBALANCER_NATS_OPERATOR_PASSWORD",
    NATS_SUBSCRIBER: "REBALANCER_NATS_SUBSCRIBER_PASSWORD",
}
# events.relay.STREAM and rebalancer.alerts.STREAM, spelled out so that this module (imported by
# every command) does not import nats.
READABLE_STREAMS: Final = ("REBALANCER_EVENTS", "REBALANCER_ALERTS")
# What a JetStream consumer of one stream publishes, as nats-py 2.16 and nats-server 2.10 spell it.
_STREAM_READER: Final = (
    "$JS.API.STREAM.INFO.{stream}",
    "$JS.API.CONSUMER.CREATE.{stream}",  # ephemeral, old form: nats-py's ordered consumer
    "$JS.API.CONSUMER.CREATE.{stream}.>",  # named, <name>[.<filter>] (server 2.9+): pull_subscribe
    "$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",  # durable, old form: nats-py's durable push
    "$JS.API.CONSUMER.INFO.{stream}.>",  # a durable is looked up before it is created
    "$JS.API.CONSUMER.MSG.NEXT.{stream}.>",  # pull consumers fetch
    "$JS.API.CONSUMER.DELETE.{stream}.>",  # a reader removes its own durable
    "$JS.ACK.{stream}.>",  # $JS.ACK.<stream>.<consumer>...: acks of a durable consumer
    "$JS.FC.{stream}.>",  # $JS.FC.<stream>.<consumer>.<id>: flow control, ordered consumers
)
NATS_PERMISSIONS: Final[dict[str, dict[str, list[str]]]] = {
    NATS_OPERATOR: {"publish": [">"], "subscribe": [">"]},
    NATS_SUBSCRIBER: {
        "publish": [
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",  # finding the stream of a subject
            *(row.format(stream=name) for name in READABLE_STREAMS for row in _STREAM_READER),
        ],
        # _INBOX.>: JetStream API replies and push consumers' deliver subjects.
        "subscribe": ["rebalancer.events.>", "rebalancer.alerts.>", "_INBOX.>"],
    },
}


def nats_authorization(passwords: dict[str, str]) -> str:
    """The `authorization` block with the users of NATS_PERMISSIONS.

    `passwords` maps each user to its password as the config spells it: a quoted string, or a
    `$VARIABLE` that nats-server resolves from the environment (and refuses to start without).
    """
    lines = ["authorization {", "  users = ["]
    for user, permissions in NATS_PERMISSIONS.items():
        lines += [
            "    {",
            f"      user: {json.dumps(user)}",
            f"      password: {passwords[user]}",
            "      permissions {",
        ]
        for direction, subjects in permissions.items():
            lines.append(f"        {direction}: [")
            lines += [f"          {json.dumps(subject)}" for subject in subjects]
            lines.append("        ]")
        lines += ["      }", "    }"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def reference_nats_authorization() -> str:
    """The `authorization` block of infra/nats/rebalancer.conf: passwords from the environment."""
    return nats_authorization({user: f"${name}" for user, name in NATS_PASSWORD_VARIABLES.items()})

