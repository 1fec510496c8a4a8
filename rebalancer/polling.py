"""When a waiting workflow is looked at again: per-kind poll intervals, backoff and jitter."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from events.vocabulary import TaskKind
from rebalancer.workflow import TaskRecord


@dataclass(frozen=True, slots=True)
class Poll:
    """Look again after `base` seconds, then after `growth` of the time the task has waited
    so far, never later than `cap`: a withdrawal that has taken ten minutes is not going to
    land in the next second, and asking every second only spends the exchange's budget."""

    base: float
    cap: float
    growth: float = 0.1


# Live exchanges: orders fill in seconds, transfers inside one exchange in seconds, withdrawals
# and deposits in minutes (block confirmations).
DEFAULT_POLLS: Mapping[TaskKind, Poll] = MappingProxyType({
    TaskKind.TRADE: Poll(1.0, 10.0),
    TaskKind.WITHDRAW: Poll(5.0, 60.0),
    TaskKind.DEPOSIT: Poll(5.0, 60.0),
    TaskKind.TRANSFER: Poll(1.0, 10.0),
    TaskKind.MASTER_TRANSFER: Poll(1.0, 10.0),
})
JITTER = 0.2  # +-20%: workflows started together do not poll together for ever
SHORTEST = 0.002  # seconds; a scaled-down simulated world still gets a real pause
RETRY_BASE, RETRY_CAP = 0.5, 30.0  # a retryable exchange error (rate limit, timeout)
FAILURE_BASE, FAILURE_CAP = 1.0, 60.0  # an unexpected error (the bulkhead)


def poll_delay(
    task: TaskRecord | None, now: datetime, polls: Mapping[TaskKind, Poll], scale: float,
    rng: random.Random,
) -> float:
    """Seconds until a task that is waiting on the exchange is stepped again. `scale` shrinks
    every interval for a simulated world whose clock runs faster (1 / its time scale)."""
    if task is None:
        return SHORTEST
    poll = polls.get(task.kind) or DEFAULT_POLLS[task.kind]
    waited = (now - task.entered_at).total_seconds() if task.entered_at else 0.0
    interval = min(poll.cap, max(poll.base, waited * poll.growth))
    return max(SHORTEST, interval * scale * rng.uniform(1 - JITTER, 1 + JITTER))


def backoff(attempt: int, base: float, cap: float, scale: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter for the `attempt`-th failure in a row (from 1)."""
    return max(SHORTEST, rng.uniform(0, min(cap, base * 2 ** (attempt - 1))) * scale)
