"""The wire format: how a stored event becomes a JetStream message (subject, body, dedupe id)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, RawStreamMsg, RetentionPolicy, StorageType, StreamConfig

from events.catalogue import TaskStateChanged, WorkflowCreated, WorkflowStateChanged
from events.store import RecordedEvent
from events.vocabulary import WorkflowState

STREAM = "REBALANCER_EVENTS"  # contract (docs/contracts.md §3)
SUBJECT_PREFIX = "rebalancer.events"
SUBJECTS = f"{SUBJECT_PREFIX}.>"
MSG_ID = "Nats-Msg-Id"
DUPLICATE_WINDOW = 120.0  # seconds; a re-publish after a crash normally lands well within it
MAX_AGE = 365 * 24 * 3600.0  # seconds; JetStream is a copy, the store keeps everything anyway
_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def subject_for(event: RecordedEvent) -> str:
    """`rebalancer.events.<workflow_id>.<task_name|_workflow>.<dest_state>` (docs/contracts.md §3).

    Characters that are not valid in a subject token (`.`, `*`, `>`, white space) become `_`:
    the subject only routes, the body carries the facts, and a relay that refused an event
    would hold every later one back. A type outside the catalogue's three lands on
    `_workflow.<type in lower case>`.
    """
    workflow_id = event.stream_id.removeprefix("workflow-")
    data = event.data
    if event.type == TaskStateChanged.type_name:
        what, state = str(data.get("task_name")), str(data.get("dest"))
    elif event.type == WorkflowStateChanged.type_name:
        what, state = "_workflow", str(data.get("dest"))
    elif event.type == WorkflowCreated.type_name:
        what, state = "_workflow", WorkflowState.CREATED.value
    else:
        what, state = "_workflow", event.type.lower()
    return ".".join((SUBJECT_PREFIX, _token(workflow_id), _token(what), _token(state)))


def _token(text: str) -> str:
    return _TOKEN.sub("_", text) or "_"


def body_of(event: RecordedEvent) -> bytes:
    """The stored event as JSON (docs/contracts.md §3); amounts are strings already."""
    body = {
        "position": event.position,
        "stream_id": event.stream_id,
        "version": event.version,
        "type": event.type,
        "schema_version": event.schema_version,
        "data": event.data,
        "metadata": event.metadata,
        "recorded_at": event.recorded_at.isoformat(),
        # The stored chain hash (hex): `rebalancer audit` compares the table with this copy.
        "hash": event.hash.hex(),
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def msg_id(event: RecordedEvent) -> str:
    """The JetStream dedupe id: `<stream_id>:<version>`, unique per stored event."""
    return f"{event.stream_id}:{event.version}"


def stream_config(replicas: int = 1) -> StreamConfig:
    """The REBALANCER_EVENTS stream: file storage, a dedupe window, long retention, and no
    message deletable or purgeable through the API: it is the audit's outside copy. `replicas`
    copies of it on a cluster (3 survives the loss of any one node)."""
    return StreamConfig(
        name=STREAM,
        description="Every stored rebalancer event, in global order (published by the relay)",
        subjects=[SUBJECTS],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=MAX_AGE,
        duplicate_window=DUPLICATE_WINDOW,
        deny_delete=True,
        deny_purge=True,
        num_replicas=replicas,
    )


@dataclass(frozen=True, slots=True)
class PublishedEvent:
    """One relayed event as a subscriber sees it (docs/contracts.md §3: the body, its subject)."""

    position: int
    stream_id: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime
    subject: str
    hash: str | None = None  # hex; None in copies relayed before the field existed

    @classmethod
    def from_message(cls, msg: Msg | RawStreamMsg) -> PublishedEvent:
        """From a delivered message or one read from the stream by sequence."""
        assert msg.data is not None and msg.subject is not None
        body = json.loads(msg.data)
        return cls(
            position=int(body["position"]),
            stream_id=str(body["stream_id"]),
            version=int(body["version"]),
            type=str(body["type"]),
            schema_version=int(body["schema_version"]),
            data=dict(body["data"]),
            metadata=dict(body["metadata"]),
            recorded_at=datetime.fromisoformat(body["recorded_at"]),
            subject=msg.subject,
            hash=str(body["hash"]) if "hash" in body else None,
        )

