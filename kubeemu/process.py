"""What every lab Kubernetes process does around its main coroutine (controller-manager,
kube-proxy, kubelet): run it until SIGTERM or SIGINT, then let it unwind through cancellation so
its ``finally`` blocks run (informers stopped, sessions closed) before the process exits."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

_log = logging.getLogger(__name__)


async def run_until_signalled(main: Coroutine[Any, Any, Any], stopping: str) -> None:
    """Await ``main``; SIGTERM/SIGINT cancel it and log ``stopping``. Other exceptions (bugs)
    propagate, so the process exits non-zero and its supervisor restarts it."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        _log.info("%s", stopping)
