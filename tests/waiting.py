"""Waiting on a condition, the one way every tier does it.

A test never sleeps and then asserts: it polls ``predicate`` until it holds (returning what it
returned, so a test can use the value) or the timeout passes (an ``AssertionError`` naming what
was awaited and the last value seen). :func:`wait_until` blocks the calling thread;
:func:`wait_until_async` is the same loop for a condition that coroutines on the running event
loop must make true (blocking there would stop them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")
#: What a predicate returns: a value, or a falsy "not yet" (None, False). The helpers return the
#: first truthy value, so a caller gets ``T`` without the "not yet" cases.
Poll = Callable[[], T | Literal[False] | None]

#: Polling interval: short, so a test takes about as long as the condition needs.
INTERVAL_S = 0.02


def _timed_out(timeout: float, message: str, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {message} (last: {last!r})")


def _poll(predicate: Poll[T], deadline: float, timeout: float, message: str) -> T | None:
    """One poll of both loops: the truthy value, None for "not yet", or the time-out error."""
    last = predicate()
    if last:
        return last  # type: ignore[return-value]  # truthy: not None, not False
    if time.monotonic() >= deadline:
        raise _timed_out(timeout, message, last)
    return None


def wait_until(predicate: Poll[T], timeout: float, message: str, *, interval: float = INTERVAL_S) -> T:
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while (got := _poll(predicate, deadline, timeout, message)) is None:
        time.sleep(interval)
    return got


async def wait_until_async(
    predicate: Poll[T], timeout: float, message: str, *, interval: float = INTERVAL_S
) -> T:
    """:func:`wait_until` for the event loop: sleeps with ``asyncio.sleep`` between polls."""
    deadline = time.monotonic() + timeout
    while (got := _poll(predicate, deadline, timeout, message)) is None:
        await asyncio.sleep(interval)
    return got
