"""Poll intervals: base, growth with the time waited, cap, jitter, scale; failure backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from events.vocabulary import TaskKind, TaskState
from rebalancer.polling import DEFAULT_POLLS, JITTER, SHORTEST, Poll, backoff, poll_delay
from rebalancer.workflow import TaskRecord

NOW = datetime(2026, 12, 4, tzinfo=UTC)


def waiting(kind: TaskKind, seconds: float) -> TaskRecord:
    record = TaskRecord(index=0, name="t", kind=kind, state=TaskState.REQUESTED)
    record.entered_at = NOW - timedelta(seconds=seconds)
    return record


def delays(record: TaskRecord, *, scale: float = 1.0, n: int = 500) -> list[float]:
    rng = random.Random(3)
    return [poll_delay(record, NOW, DEFAULT_POLLS, scale, rng) for _ in range(n)]


def test_a_fresh_wait_polls_at_the_kinds_base_within_the_jitter() -> None:
    for kind, poll in DEFAULT_POLLS.items():
        found = delays(waiting(kind, 0))
        assert min(found) >= poll.base * (1 - JITTER)
        assert max(found) <= poll.base * (1 + JITTER)
        assert max(found) - min(found) > poll.base * JITTER  # really spread, not one value


def test_a_long_wait_polls_less_often_up_to_the_cap() -> None:
    poll = DEFAULT_POLLS[TaskKind.WITHDRAW]
    ten_minutes = delays(waiting(TaskKind.WITHDRAW, 600))
    assert min(ten_minutes) >= poll.cap * (1 - JITTER)  # 10% of 600 s is past the 60 s cap
    two_minutes = delays(waiting(TaskKind.WITHDRAW, 120))  # 12 s: between base and cap
    assert 12 * (1 - JITTER) <= min(two_minutes) <= max(two_minutes) <= 12 * (1 + JITTER)


def test_a_scaled_world_polls_sooner_but_never_below_the_floor() -> None:
    fast = delays(waiting(TaskKind.DEPOSIT, 0), scale=1 / 1000)
    assert max(fast) <= 5 * (1 + JITTER) / 1000 + SHORTEST
    assert min(delays(waiting(TaskKind.TRADE, 0), scale=1e-9)) == SHORTEST


def test_custom_polls_replace_the_defaults_for_their_kind() -> None:
    polls = {**DEFAULT_POLLS, TaskKind.DEPOSIT: Poll(base=30, cap=30)}
    rng = random.Random(1)
    found = [poll_delay(waiting(TaskKind.DEPOSIT, 0), NOW, polls, 1.0, rng) for _ in range(50)]
    assert min(found) >= 24 and max(found) <= 36


def test_backoff_grows_exponentially_under_its_cap_with_full_jitter() -> None:
    rng = random.Random(5)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0)):
        found = [backoff(attempt, 1.0, 60.0, 1.0, rng) for _ in range(300)]
        assert min(found) >= SHORTEST
        assert max(found) <= ceiling
        assert max(found) > ceiling * 0.8  # it does reach near the ceiling
