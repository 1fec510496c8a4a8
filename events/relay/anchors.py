"""Chain-head anchors: keyed MACs over each stream's last relayed event, kept in JetStream.

An intruder who rewrites the events table can recompute every later hash, but not a MAC without
the key (a file, never in the database), and cannot remove what JetStream already holds (the
streams deny delete and purge through the API). docs/contracts.md §3.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from events.store import RecordedEvent

CHAIN_STREAM = "REBALANCER_CHAIN"  # contract (docs/contracts.md §3)
CHAIN_PREFIX = "rebalancer.chain"
KEY_BYTES = 32
MAX_AGE = 365 * 24 * 3600.0  # as REBALANCER_EVENTS: an anchor is needed as long as the copy


class ChainKeyError(OSError):
    """The chain key file cannot be read or is not KEY_BYTES long."""


def load_key(path: Path, *, create: bool = False) -> bytes:
    """The chain key in `path`; with `create`, a new random one written mode 600 if absent.

    Raises ChainKeyError when it is missing (without `create`), unreadable or the wrong size.
    The key is never logged: messages name the file only.
    """
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: two processes starting at once agree on the first one's key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(KEY_BYTES))
    try:
        key = path.read_bytes()
    except OSError as e:
        raise ChainKeyError(f"cannot read the chain key {path}: {e.strerror}") from e
    if len(key) != KEY_BYTES:
        raise ChainKeyError(f"the chain key {path} is not {KEY_BYTES} bytes")
    return key


@dataclass(frozen=True, slots=True)
class Anchor:
    """A stream's head as the relay published it, and the MAC over it."""

    stream_id: str
    version: int
    position: int
    hash: str  # hex
    recorded_at: str  # ISO 8601, as in the event's JetStream copy
    mac: str  # hex HMAC-SHA256

    @classmethod
    def of(cls, event: RecordedEvent, key: bytes) -> Anchor:
        fields = (event.stream_id, event.version, event.position, event.hash.hex(),
                  event.recorded_at.isoformat())
        return cls(*fields, mac=_mac(key, *fields))

    def verifies(self, key: bytes) -> bool:
        expected = _mac(key, self.stream_id, self.version, self.position, self.hash,
                        self.recorded_at)
        return hmac.compare_digest(expected, self.mac)

    def body(self) -> bytes:
        return json.dumps({
            "stream_id": self.stream_id, "version": self.version, "position": self.position,
            "hash": self.hash, "recorded_at": self.recorded_at, "mac": self.mac,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_body(cls, data: bytes) -> Anchor:
        """Raises ValueError (KeyError, TypeError included) for a body that is not an anchor."""
        body: dict[str, Any] = json.loads(data)
        return cls(str(body["stream_id"]), int(body["version"]), int(body["position"]),
                   str(body["hash"]), str(body["recorded_at"]), str(body["mac"]))

    @property
    def subject(self) -> str:
        return chain_subject(self.stream_id)

    @property
    def msg_id(self) -> str:
        return f"{self.stream_id}:{self.version}"


def chain_subject(stream_id: str) -> str:
    """`rebalancer.chain.<workflow_id>` (any other stream id: its characters outside a token
    become `_`, as on the events' subjects)."""
    token = "".join(c if c.isalnum() or c in "-_" else "_" for c in
                    stream_id.removeprefix("workflow-")) or "_"
    return f"{CHAIN_PREFIX}.{token}"


def heads(events: list[RecordedEvent]) -> list[RecordedEvent]:
    """The last event of each stream in `events`, in order of first appearance."""
    last: dict[str, RecordedEvent] = {}
    for event in events:
        last[event.stream_id] = event
    return list(last.values())


def chain_stream_config(replicas: int = 1) -> StreamConfig:
    """REBALANCER_CHAIN: file storage, nothing deletable or purgeable through the API;
    `replicas` copies on a cluster, as the events' stream."""
    return StreamConfig(
        name=CHAIN_STREAM,
        description="Keyed chain-head anchors of the rebalancer event streams (the relay's)",
        subjects=[f"{CHAIN_PREFIX}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=MAX_AGE,
        duplicate_window=120.0,
        deny_delete=True,
        deny_purge=True,
        num_replicas=replicas,
    )


def _mac(key: bytes, stream_id: str, version: int, position: int, digest: str,
         recorded_at: str) -> str:
    message = f"{stream_id}|{version}|{position}|{digest}|{recorded_at}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()
