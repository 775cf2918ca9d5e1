"""Process identity and signals for the runtime: a PID counts only with its recorded start time.

PIDs are reused, so every process the runtime records (shims, container processes) is stored as
``(pid, start time)`` (field 22 of ``/proc/PID/stat``), and a signal goes through a pidfd opened
*before* the start time is checked, so the check and the signal refer to one process. The same
rule lets a restarted kubelet adopt shims and ``lab down`` find them (never by name).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time

from kubeemu.runtime.shim import start_time


def same(pid: int, start: int | None) -> bool:
    """Whether ``pid`` is alive (not a zombie) and is the process that started at ``start``."""
    if pid <= 0 or start is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return False
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0] != "Z" and int(fields[19]) == start


def signal_process(pid: int, start: int | None, sig: int) -> bool:
    """Send ``sig`` to ``pid`` if it is still the recorded process; True if it was sent."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not same(pid, start):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def wait_gone(pid: int, start: int | None, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the recorded process to exit; True if it is gone."""
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return True
    try:
        while same(pid, start):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(InterruptedError):
                select.select([fd], [], [], min(left, 0.2))
        return True
    finally:
        os.close(fd)


__all__ = ["same", "signal_process", "start_time", "wait_gone"]
