"""Injected faults: the fault spec, deterministic draws, and how a faulted call fails."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from rebalancer.errors import RejectedError, RetryableError, UnknownOutcomeError

T = TypeVar("T")

FAULT_KEYS = ("lost_response", "timeout", "rate_limit", "reject", "latency_ms")


@dataclass(frozen=True)
class Faults:
    """Fault probabilities per call (0..1) and a latency, e.g. `timeout=0.05,latency_ms=20`."""

    lost_response: float = 0.0
    timeout: float = 0.0
    rate_limit: float = 0.0
    reject: float = 0.0
    latency_ms: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> Faults:
        """Raises ValueError naming the offending key."""
        values: dict[str, float] = {}
        for part in (text or "").split(","):
            if not part.strip():
                continue
            key, sep, raw = part.partition("=")
            key = key.strip()
            if key not in FAULT_KEYS:
                raise ValueError(
                    f"unknown fault {key!r} in {text!r} (known: {', '.join(FAULT_KEYS)})"
                )
            if not sep:
                raise ValueError(f"fault {key!r} needs a value, e.g. {key}=0.1")
            if key in values:
                raise ValueError(f"fault {key!r} given twice")
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"fault {key!r}: {raw.strip()!r} is not a number") from None
            if key == "latency_ms":
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"fault {key!r}: must be a number of milliseconds >= 0")
            elif not 0 <= value <= 1:
                raise ValueError(f"fault {key!r}: a probability must be within 0..1")
            values[key] = value
        return cls(**values)


def draw(seed: int, counter: int, kind: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, counter, kind)."""
    digest = hashlib.sha256(f"{seed}:{counter}:{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


async def faulted(
    faults: Faults,
    seed: int,
    next_counter: Callable[[], Awaitable[int]],
    what: str,
    execute: Callable[[], Awaitable[T]],
    *,
    moves_money: bool,
) -> T:
    """Run `execute` as one exchange call would be run with `faults` injected around it.

    A rate limit or timeout executes nothing (a timed-out money move is still an unknown
    outcome to the caller); a rejection refuses a money move; a lost response executes it and
    then withholds the answer. Reads are only ever rate-limited, timed out or slowed. The draw
    counter is shared by every process on the world, so a seed replays the same faults.
    """
    if faults.latency_ms > 0:
        await asyncio.sleep(faults.latency_ms / 1000)
    lost = False
    kinds = ("rate_limit", "timeout", "reject", "lost_response") if moves_money \
        else ("rate_limit", "timeout")
    if any(getattr(faults, kind) > 0 for kind in kinds):
        counter = await next_counter()
        hit = {kind: draw(seed, counter, kind) < getattr(faults, kind) for kind in kinds}
        if hit["rate_limit"]:
            raise RetryableError(f"simulated rate limit on {what}: nothing happened")
        if hit["timeout"]:
            if moves_money:
                # Nothing was executed, but a caller that timed out cannot know that.
                raise UnknownOutcomeError(f"simulated timeout on {what}")
            raise RetryableError(f"simulated timeout on {what}")
        if moves_money and hit["reject"]:
            raise RejectedError(f"simulated rejection of {what}")
        lost = moves_money and hit["lost_response"]
    try:
        result = await execute()
    except RejectedError as e:
        if lost:  # the refusal was lost on the way back, like any other answer
            raise UnknownOutcomeError(
                f"simulated lost response: {what} was answered, no answer arrived") from e
        raise
    if lost:
        raise UnknownOutcomeError(f"simulated lost response: {what} executed, no answer")
    return result
