"""The audit against what lies outside the table: the JetStream copy and the keyed anchors.

The relay keeps a copy of every stored event in REBALANCER_EVENTS and, with the chain key, one
HMAC anchor per stream head per batch in REBALANCER_CHAIN; neither stream lets a message be
deleted through the API. An edit, a re-dating, a deletion or a recomputed chain in the table
leaves the table disagreeing with them. What this cannot see: README.md, "What audit proves".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from events.store import RecordedEvent
from rebalancer.audit_findings import Finding

COPY_CHECK = "jetstream_copy"
ANCHOR_CHECK = "anchor"


@dataclass(frozen=True, slots=True)
class _Copied:
    """What the copy says about one event, kept small: digests instead of the payloads."""

    position: int
    type: str
    data: bytes
    metadata: bytes
    recorded_at: datetime
    hash: str | None  # None in copies made before the relay published it


@dataclass
class _Anchored:
    version: int
    position: int
    hash: str
    verified: bool | None  # None: no key to verify with


@dataclass
class OutsideRecord:
    """The JetStream copy and the anchors, by stream id; `note` says what was checked."""

    checked: bool
    note: str
    events: dict[str, dict[int, _Copied]] = field(default_factory=dict)
    anchors: dict[str, list[_Anchored]] = field(default_factory=dict)
    unreadable: list[Finding] = field(default_factory=list)
    event_count: int = 0
    anchor_count: int = 0

    @classmethod
    def unchecked(cls, why: str) -> OutsideRecord:
        return cls(False, f"not checked against the JetStream copy ({why})")

    def has(self, stream_id: str) -> bool:
        return stream_id in self.events or stream_id in self.anchors

    def check(self, stream_id: str, stored: list[RecordedEvent]) -> list[Finding]:
        """The table's events of one stream against the copy and the anchors; the stream is
        then done (see `leftovers`)."""
        copied = self.events.pop(stream_id, {})
        anchors = self.anchors.pop(stream_id, [])
        by_version = {event.version: event for event in stored}
        findings = _missing(stream_id, copied, by_version)
        for version, copy in sorted(copied.items()):
            event = by_version.get(version)
            if event is not None:
                findings.extend(_differences(event, copy))
        for anchor in anchors:
            findings.extend(_anchor_findings(stream_id, anchor, by_version.get(anchor.version)))
        findings.extend(_unanchored(stream_id, copied, anchors))
        return findings

    def leftovers(self) -> list[tuple[str, list[Finding]]]:
        """Streams the copy or the anchors know and the table does not have at all."""
        names = sorted(set(self.events) | set(self.anchors))
        return [(name, self.check(name, [])) for name in names]


async def read_outside(
    nats_url: str, workflow_id: str | None, key_file: Path | None, *,
    connect_timeout: float = 5.0,
) -> OutsideRecord:
    """Read the copy and the anchors (of one workflow, or all); unreachable NATS or a missing
    key is said in the note, never raised."""
    import nats
    import nats.errors

    from events.relay.anchors import CHAIN_PREFIX, CHAIN_STREAM, ChainKeyError, load_key
    from events.relay.copy import read_stream_messages
    from events.relay.servers import connect_options as server_options
    from events.relay.wire import STREAM, SUBJECT_PREFIX

    key: bytes | None = None
    key_note = ""
    if key_file is not None:
        try:
            key = load_key(key_file)
        except ChainKeyError as e:
            key_note = f"; anchor MACs not verified: {e}"
    else:
        key_note = "; anchor MACs not verified: no chain key"
    token = "" if workflow_id is None else workflow_id.removeprefix("workflow-")
    events_subject = f"{SUBJECT_PREFIX}.{token}.>" if token else f"{SUBJECT_PREFIX}.>"
    chain_subject = f"{CHAIN_PREFIX}.{token}" if token else f"{CHAIN_PREFIX}.>"
    failures = (nats.errors.Error, asyncio.TimeoutError, OSError)
    try:
        nc = await asyncio.wait_for(
            nats.connect(**server_options(nats_url), max_reconnect_attempts=0,
                         allow_reconnect=False, connect_timeout=max(1, int(connect_timeout))),
            connect_timeout + 1,
        )
    except (*failures, ValueError) as e:
        return OutsideRecord.unchecked(f"NATS unreachable: {type(e).__name__}")
    record = OutsideRecord(True, "")
    try:
        js = nc.jetstream(timeout=connect_timeout)
        async for msg in read_stream_messages(js, STREAM, events_subject):
            record.event_count += 1
            _take_event(record, msg.data)
        async for msg in read_stream_messages(js, CHAIN_STREAM, chain_subject):
            record.anchor_count += 1
            _take_anchor(record, msg.subject, msg.data, key)
    except failures as e:
        return OutsideRecord.unchecked(f"JetStream did not answer: {type(e).__name__}")
    finally:
        await nc.close()
    record.note = (f"checked against the JetStream copy ({record.event_count} events,"
                   f" {record.anchor_count} anchors{key_note})")
    return record


def _digest(value: Any) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _take_event(record: OutsideRecord, data: bytes) -> None:
    try:
        body = json.loads(data)
        stream_id, version = str(body["stream_id"]), int(body["version"])
        copy = _Copied(int(body["position"]), str(body["type"]), _digest(body["data"]),
                       _digest(body["metadata"]), datetime.fromisoformat(body["recorded_at"]),
                       str(body["hash"]) if "hash" in body else None)
    except (ValueError, KeyError, TypeError):
        record.unreadable.append(Finding("REBALANCER_EVENTS", None, None, COPY_CHECK,
                                         "a message of the copy is not a stored event"))
        return
    # The dedupe id keeps one message per event; a second one (dedupe window passed) is
    # the same event again, and the first stays the one compared.
    record.events.setdefault(stream_id, {}).setdefault(version, copy)


def _take_anchor(record: OutsideRecord, subject: str, data: bytes, key: bytes | None) -> None:
    from events.relay.anchors import Anchor

    try:
        anchor = Anchor.from_body(data)
    except (ValueError, KeyError, TypeError):
        record.unreadable.append(Finding(subject, None, None, ANCHOR_CHECK,
                                         "an anchor message is unreadable"))
        return
    verified = None if key is None else anchor.verifies(key)
    record.anchors.setdefault(anchor.stream_id, []).append(
        _Anchored(anchor.version, anchor.position, anchor.hash, verified))


def _missing(
    stream_id: str, copied: dict[int, _Copied], stored: dict[int, RecordedEvent]
) -> list[Finding]:
    gone = sorted(version for version in copied if version not in stored)
    if not gone:
        return []
    ranges = ", ".join(f"v{a}" if a == b else f"v{a}-v{b}" for a, b in _runs(gone))
    what = "has no events" if not stored else f"lacks {ranges}"
    return [Finding(stream_id, gone[0], copied[gone[0]].position, COPY_CHECK,
                    f"the JetStream copy has {len(gone)} event(s) ({ranges}); the table {what}")]


def _runs(versions: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for version in versions:
        if runs and runs[-1][1] == version - 1:
            runs[-1] = (runs[-1][0], version)
        else:
            runs.append((version, version))
    return runs


def _differences(event: RecordedEvent, copy: _Copied) -> list[Finding]:
    differ = [
        name for name, same in (
            ("type", event.type == copy.type),
            ("data", _digest(event.data) == copy.data),
            ("metadata", _digest(event.metadata) == copy.metadata),
            ("recorded_at", event.recorded_at == copy.recorded_at),
            ("position", event.position == copy.position),
            ("hash", copy.hash is None or event.hash.hex() == copy.hash),
        ) if not same
    ]
    if not differ:
        return []
    detail = ""
    if "recorded_at" in differ:
        detail = (f" (recorded_at {event.recorded_at.isoformat()} in the table,"
                  f" {copy.recorded_at.isoformat()} in the copy)")
    return [Finding(event.stream_id, event.version, event.position, COPY_CHECK,
                    f"differs from the JetStream copy in {', '.join(differ)}{detail}")]


def _unanchored(
    stream_id: str, copied: dict[int, _Copied], anchors: list[_Anchored]
) -> list[Finding]:
    # The relay anchors each stream's last event of every batch, so the last copied event is
    # anchored - if a relay that publishes `hash` (and anchors) copied it. A copy without its
    # anchor is one re-filled by someone without the key, or anchors removed with their stream.
    hashed = [version for version, copy in copied.items() if copy.hash is not None]
    if not hashed:
        return []
    last = max(hashed)
    if any(anchor.version == last for anchor in anchors):
        return []
    return [Finding(stream_id, last, copied[last].position, ANCHOR_CHECK,
                    f"no anchor for v{last}, the last event in the JetStream copy (anchors"
                    " removed, a copy re-filled without the key, or relayed without a key)")]


def _anchor_findings(
    stream_id: str, anchor: _Anchored, event: RecordedEvent | None
) -> list[Finding]:
    findings: list[Finding] = []
    where = f"the anchor of v{anchor.version}"
    if anchor.verified is False:
        findings.append(Finding(stream_id, anchor.version, anchor.position, ANCHOR_CHECK,
                                f"{where} does not verify with the chain key"))
    if event is None:
        findings.append(Finding(stream_id, anchor.version, anchor.position, ANCHOR_CHECK,
                                f"{where} names an event the table lacks"))
    elif event.hash.hex() != anchor.hash or event.position != anchor.position:
        findings.append(Finding(
            stream_id, anchor.version, event.position, ANCHOR_CHECK,
            f"{where} has hash {anchor.hash[:16]}…, the table {event.hash.hex()[:16]}…"
            " (the chain was recomputed)" if event.hash.hex() != anchor.hash else
            f"{where} has position {anchor.position}, the table {event.position}"))
    return findings
