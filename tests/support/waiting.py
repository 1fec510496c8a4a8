"""Waiting for a condition: poll until it holds or fail saying what was last seen."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _holds(value: Any, until: Callable[[Any], object] | None) -> bool:
    return bool(until(value) if until is not None else value)


def _failure(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"{what} did not hold within {timeout:g} s; last seen: {last!r}")


def _name(probe: Callable[..., Any], what: str | None) -> str:
    return what or getattr(probe, "__qualname__", repr(probe))


async def eventually(
    probe: Callable[[], T | Awaitable[T]],
    until: Callable[[T], object] | None = None,
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    ignoring: tuple[type[BaseException], ...] = (),
    what: str | None = None,
    describe: Callable[[T], object] | None = None,
) -> T:
    """Call `probe` (plain or async) until `until(result)` holds (by default: the result is
    truthy), and return that result. An exception in `ignoring` counts as "not yet". After
    `timeout` seconds it fails with an AssertionError naming `what` and the last result seen
    (through `describe`, when the whole result would be too much to read).
    """
    deadline = time.monotonic() + timeout
    last: object = "nothing (not probed yet)"
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except ignoring as e:
            last = e
        else:
            if _holds(value, until):
                return value  # type: ignore[return-value]
            last = describe(value) if describe is not None else value  # type: ignore[arg-type]
        if time.monotonic() >= deadline:
            raise _failure(_name(probe, what), timeout, last)
        await asyncio.sleep(interval)


def eventually_blocking(
    probe: Callable[[], T],
    until: Callable[[T], object] | None = None,
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    ignoring: tuple[type[BaseException], ...] = (),
    what: str | None = None,
    describe: Callable[[T], object] | None = None,
) -> T:
    """`eventually` for code that cannot await: synchronous tests, and the server launcher,
    which is called from inside running event loops (where `asyncio.run` is refused)."""
    deadline = time.monotonic() + timeout
    last: object = "nothing (not probed yet)"
    while True:
        try:
            value = probe()
        except ignoring as e:
            last = e
        else:
            if _holds(value, until):
                return value
            last = describe(value) if describe is not None else value
        if time.monotonic() >= deadline:
            raise _failure(_name(probe, what), timeout, last)
        time.sleep(interval)
