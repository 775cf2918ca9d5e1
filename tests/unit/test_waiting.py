"""The shared wait helper: returns the first truthy value, fails naming what it waited for."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.waiting import wait_until, wait_until_async


def test_wait_until_returns_the_first_truthy_value() -> None:
    values = iter([None, False, 0, {"ready": True}])
    assert wait_until(lambda: next(values), 1, "ready", interval=0) == {"ready": True}


def test_wait_until_names_what_it_waited_for_and_the_last_value() -> None:
    calls = itertools.count()
    with pytest.raises(AssertionError, match=r"timed out after 0.05 s waiting for the thing \(last: None\)"):
        wait_until(lambda: None if next(calls) >= 0 else True, 0.05, "the thing")


def test_wait_until_async_lets_the_loop_run() -> None:
    async def body() -> int:
        box: list[int] = []
        asyncio.get_running_loop().call_later(0.01, box.append, 7)
        return await wait_until_async(lambda: box and box[0], 1, "the callback")

    assert asyncio.run(body()) == 7
