"""The relay to NATS JetStream: wire format, publisher and subscriber helper."""

from events.relay.publisher import Relay, RelayLag, RelayUnavailableError
from events.relay.subscriber import Gap, Subscriber
from events.relay.wire import (
    MSG_ID,
    STREAM,
    SUBJECTS,
    PublishedEvent,
    body_of,
    msg_id,
    stream_config,
    subject_for,
)

__all__ = [
    "MSG_ID",
    "STREAM",
    "SUBJECTS",
    "Gap",
    "PublishedEvent",
    "Relay",
    "RelayLag",
    "RelayUnavailableError",
    "Subscriber",
    "body_of",
    "msg_id",
    "stream_config",
    "subject_for",
]
