"""Run an ``EmuServer`` on a private event loop in a thread (tests, benchmarks, scripts).

The lab runs each cluster as its own process (``python -m kubeemu``); tests that want several
servers cheaply, or a server object they can poke directly, use ``ServerThread`` instead.

``stop()`` stops the server (watches dropped, controllers cancelled, aiohttp's runner cleaned
up), then the loop; before the thread ends, the tasks still on the loop are cancelled and
awaited, as ``asyncio.run`` does: aiohttp does not cancel the handler of a request whose client
went away (``handler_cancellation`` is off) and forgets its task, so the runner's cleanup cannot
cancel it either; such a handler (one held by an injected latency, say) was left pending on the
closed loop ("Task was destroyed but it is pending!" when collected).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from kubeemu.server import EmuServer

_log = logging.getLogger(__name__)
T = TypeVar("T")


class ServerThread:
    """An EmuServer listening on 127.0.0.1 (ephemeral port) from a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._host, self._port = host, port
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubeemu", daemon=True)
        self._kwargs = kwargs
        self.server: EmuServer | None = None
        self.url = ""
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = EmuServer(**self._kwargs)
            self.url = self.loop.run_until_complete(self.server.start(self._host, self._port))
        except BaseException as e:  # surfaced to start() in the caller's thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self._cancel_leftovers()

    def _cancel_leftovers(self) -> None:
        """Cancel and await the tasks the stopped server left on the loop (module docstring)."""
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (the store is not thread-safe) and return its result."""

        async def wrap() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(10)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
