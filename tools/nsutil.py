"""Network-namespace and process plumbing shared by the lab and the connectivity check.

Three things live here, each small but easy to get subtly wrong:

* **Running a program inside a named namespace.** ``ip netns exec`` also unshares the mount
  namespace and remounts ``/sys`` so that ``/sys/class/net`` shows the namespace's devices. That
  hides ``/sys/fs/bpf`` from the child, which would break pinned BPF maps (they must outlive an
  agent restart). So long-running lab processes are started with :func:`spawn_in_netns`, which
  only ``setns(2)``\\ s the *network* namespace in the child between ``fork`` and ``exec``: the
  PID we get back is the final program's PID, and ``/proc/sys/net`` as well as every netlink
  socket the program opens belong to the target namespace.
* **Knowing a PID is still the process we started.** PIDs are reused. We record the process start
  time (field 22 of ``/proc/PID/stat``, in clock ticks since boot) next to the PID and only signal
  a PID whose start time still matches (:func:`same_process`). Signals go through a pidfd, opened
  *before* the check, so the check and the kill refer to one process.
* **Finding processes by namespace.** After a crash the state file may be gone. A process belongs
  to the lab if its ``/proc/PID/ns/net`` has the inode of one of the lab's namespace files under
  ``/run/netns`` (:func:`pids_in_netns`): precise, and it never matches anything in the root
  namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

_log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000

_libc: ctypes.CDLL | None = None


def _setns_fn() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc.setns


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    """Names of the namespaces pinned under /run/netns (what ``ip netns list`` shows)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_inode(name: str) -> int | None:
    """Inode of a named namespace (its nsfs inode, the same one /proc/PID/ns/net shows)."""
    try:
        return os.stat(netns_path(name)).st_ino
    except OSError:
        return None


def _enter_netns_preexec(name: str) -> Any:
    """Return a preexec_fn that moves the forked child into namespace ``name`` before exec."""
    path = str(netns_path(name))
    setns = _setns_fn()

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({path}): {os.strerror(err)}")
        finally:
            os.close(fd)

    return enter


def spawn_in_netns(
    netns: str,
    argv: Sequence[str],
    *,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    new_session: bool = True,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside network namespace ``netns`` (see the module docstring for why not
    ``ip netns exec``). ``new_session`` puts it in its own session and process group so a Ctrl-C
    on the terminal that ran ``lab up`` does not take the lab down with it."""
    if not netns_exists(netns):
        raise FileNotFoundError(errno.ENOENT, f"network namespace {netns!r} does not exist", str(netns_path(netns)))
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=_enter_netns_preexec(netns),  # only a setns between fork and exec
        start_new_session=new_session,
        close_fds=True,
        env=env,
        cwd=cwd,
    )


# -- processes -------------------------------------------------------------------------------


def read_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of a process from /proc/PID/stat, or None if it is gone.

    The command name (field 2) may contain spaces and parentheses, so fields are counted from
    the *last* ``)``.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    # rest[0] is field 3 (state); field 22 (starttime) is rest[19].
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    st = read_stat(pid)
    return st[1] if st else None


def alive(pid: int) -> bool:
    """True if ``pid`` exists and has not exited. A zombie counts as exited; it is never reaped
    here, since it may be a child whose parent (subprocess.Popen) still wants its exit status."""
    st = read_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def same_process(pid: int, started: int | None) -> bool:
    """True if ``pid`` is alive and is the process that had start time ``started``."""
    if pid <= 0 or not alive(pid):
        return False
    return started is None or start_time(pid) == started


def pid_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def pids_in_netns(inodes: Iterable[int]) -> list[int]:
    """Every live process whose network namespace is one of ``inodes``."""
    wanted = set(inodes)
    if not wanted:
        return []
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me:
            continue
        if pid_netns_inode(pid) in wanted and alive(pid):
            out.append(pid)
    return sorted(out)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def terminate(targets: Sequence[tuple[int, int | None]], grace_s: float = 5.0) -> list[int]:
    """SIGTERM each ``(pid, start time)`` still matching, wait up to ``grace_s``, SIGKILL the rest.

    Returns the PIDs that were signalled. ``start time`` None means "any process with this PID"
    and is only used for PIDs just found by namespace inode (already precise).
    """
    fds: dict[int, int] = {}
    for pid, started in targets:
        fd = _pidfd(pid)
        if fd is None:
            continue
        # Open the pidfd first, then check: the check now refers to the same process we signal.
        if not same_process(pid, started):
            os.close(fd)
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
            fds[pid] = fd
        except ProcessLookupError:
            os.close(fd)
    try:
        _wait_fds(fds, grace_s)
        for pid, fd in fds.items():
            if alive(pid):
                _log.warning("process %d did not exit %.0f s after SIGTERM; sending SIGKILL", pid, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        _wait_fds(fds, 2.0)
    finally:
        for fd in fds.values():
            os.close(fd)
    return sorted(fds)


def _wait_fds(fds: dict[int, int], timeout_s: float) -> None:
    """Wait until every process behind ``fds`` has exited (a pidfd polls readable on exit)."""
    deadline = time.monotonic() + timeout_s
    pending = dict(fds)
    while pending:
        for pid in list(pending):
            if not alive(pid):
                del pending[pid]
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            return
        poller = select.poll()
        for fd in pending.values():
            poller.register(fd, select.POLLIN)
        poller.poll(min(left, 0.1) * 1000)


def run_in_netns_thread(netns: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` in a fresh thread that first entered namespace ``netns``.

    ``setns(CLONE_NEWNET)`` changes only the calling thread, and the thread is discarded
    afterwards, so the rest of the process never leaves its own namespace. Exceptions raised by
    ``fn`` or by entering the namespace are re-raised here.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _enter_netns_preexec(netns)()
            fn()
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)

    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if failure:
        raise failure[0]
