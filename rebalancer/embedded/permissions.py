"""The NATS users and their permissions, for the embedded server and the reference config."""

from __future__ import annotations

import json
from typing import Final

# docs/contracts.md §3: the operator (the user `rebalancer serve` runs as) may do everything; the
# subscriber may read events and alerts and nothing else. These lists are the one source of both
# the embedded server's users and the `authorization` block of infra/nats/rebalancer.conf
# (tests/integration/embedded/test_nats_access.py checks that the file still says the same).
#
# NATS permissions match whole subject tokens, and nats-server 2.15 lets anyone allowed to create
# a consumer (any CONSUMER.CREATE form) give it any deliver subject, which JetStream then
# publishes to with no check (nats-server issue 8274). So the subscriber creates no consumer at
# all: it reads a stream message by message ($JS.API.STREAM.MSG.GET) and uses durable pull
# consumers the operator created under the fixed names SUBSCRIBER_DURABLES, and it may not
# delete, create or pull from any other consumer.

NATS_OPERATOR = "operator"
NATS_SUBSCRIBER = "subscriber"
# The reference config reads the passwords from these environment variables.
NATS_PASSWORD_VARIABLES: Final = {
    NATS_OPERATOR: "REBALANCER_NATS_OPERATOR_PASSWORD",
    NATS_SUBSCRIBER: "REBALANCER_NATS_SUBSCRIBER_PASSWORD",
}
# events.relay.STREAM, rebalancer.alerts.STREAM and the chain-head checkpoints, spelled out so
# that this module (imported by every command) does not import nats.
READABLE_STREAMS: Final = ("REBALANCER_EVENTS", "REBALANCER_ALERTS", "REBALANCER_CHAIN")
# The durable consumers the subscriber may read from (on any readable stream), once the operator
# has created them; permissions cannot say "names starting with sub_", so these are exact names.
SUBSCRIBER_DURABLES: Final = ("sub_1", "sub_2", "sub_3", "sub_4")


def inbox_prefix(user: str) -> str:
    """Where `user`'s replies arrive: a prefix of its own, so no user reads another's replies."""
    return f"_INBOX_{user}"


# What a reader of one stream publishes, as nats-py 2.16 and nats-server 2.15 spell it.
_STREAM_READER: Final = (
    "$JS.API.STREAM.INFO.{stream}",
    "$JS.API.STREAM.MSG.GET.{stream}",  # one message by sequence/subject: relay.Subscriber
)
_DURABLE_READER: Final = (
    "$JS.API.CONSUMER.INFO.{stream}.{durable}",  # pull_subscribe looks the durable up first
    "$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",  # fetch
    "$JS.ACK.{stream}.{durable}.>",  # $JS.ACK.<stream>.<consumer>...: acks
)
NATS_PERMISSIONS: Final[dict[str, dict[str, list[str]]]] = {
    NATS_OPERATOR: {"publish": [">"], "subscribe": [">"]},
    NATS_SUBSCRIBER: {
        "publish": [
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",  # finding the stream of a subject
            *(row.format(stream=name) for name in READABLE_STREAMS for row in _STREAM_READER),
            *(row.format(stream=name, durable=durable) for name in READABLE_STREAMS
              for durable in SUBSCRIBER_DURABLES for row in _DURABLE_READER),
        ],
        # Its own inbox: JetStream API replies and pull consumers' messages come there.
        "subscribe": ["rebalancer.events.>", "rebalancer.alerts.>",
                      f"{inbox_prefix(NATS_SUBSCRIBER)}.>"],
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

