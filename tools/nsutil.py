"""Process plumbing shared by the lab, the connectivity check and the benchmarks.

Three things live here, each small but easy to get subtly wrong:

* **Starting a program inside a named namespace, fork-safely.** The program is exec'd through
  ``nsenter --net=/run/netns/NAME -- argv``: nsenter enters only the *network* namespace and
  then execs the program in the same process, so the PID we get back is the final program's
  PID. Nothing runs between ``fork`` and ``exec`` in our process (no ``preexec_fn``), which lets
  ``subprocess`` use ``vfork`` and run no fork handler: a process that has used gRPC deadlocks
  in gRPC's fork handlers otherwise (see :mod:`fabric.netns`). Not ``ip netns exec``: it also
  unshares the mount namespace and remounts ``/sys``, which hides ``/sys/fs/bpf`` from the
  child and would break pinned BPF maps (they must outlive an agent restart).
  **The rule: no code of ours forks with a ``preexec_fn``, ``os.fork`` or ``multiprocessing``;
  every child is started by exec.** A codebase test enforces it.
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
import errno
import functools
import logging
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from fabric import netns as namespaces

_log = logging.getLogger(__name__)

#: How long :func:`spawn_in_netns` waits for the child to show up in its namespace (nsenter
#: needs a millisecond or two; a loaded machine more).
ENTER_TIMEOUT_S = 10.0


@functools.cache
def _nsenter() -> str:
    found = shutil.which("nsenter")
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "nsenter (Debian package util-linux) is not on PATH", "nsenter")
    return found


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
    """Start ``argv`` inside network namespace ``netns`` (see the module docstring for how).

    Returns once the process is inside the namespace (or has already exited), so callers may
    look it up there at once. ``new_session`` puts it in its own session and process group so a
    Ctrl-C on the terminal that ran ``lab up`` does not take the lab down with it.
    """
    target = namespaces.inode(netns)
    if target is None:
        where = str(namespaces.path(netns))
        raise FileNotFoundError(errno.ENOENT, f"network namespace {netns!r} does not exist", where)
    proc = subprocess.Popen(
        [_nsenter(), f"--net={namespaces.path(netns)}", "--", *argv],
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=new_session,
        close_fds=True,
        env=env,
        cwd=cwd,
    )
    deadline = time.monotonic() + ENTER_TIMEOUT_S
    pause = 0.0005
    while pid_netns_inode(proc.pid) != target and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"{argv[0]} (pid {proc.pid}) did not enter network namespace {netns!r} "
                               f"within {ENTER_TIMEOUT_S:.0f} s")  # fmt: skip
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return proc


# -- processes -------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat from field 3 (state) on, or None if it is gone.

    The command name (field 2) may contain spaces and parentheses, so fields are counted from
    the *last* ``)``.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def read_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of a process, or None if it is gone."""
    rest = _stat_fields(pid)
    # rest[0] is field 3 (state); field 22 (starttime) is rest[19].
    try:
        return (rest[0], int(rest[19])) if rest else None
    except (IndexError, ValueError):
        return None


def ancestors(pid: int) -> list[int]:
    """``pid`` and its ancestors up to (not including) init."""
    out: list[int] = []
    while pid > 1 and pid not in out:
        out.append(pid)
        rest = _stat_fields(pid)
        try:
            pid = int(rest[1]) if rest else 0  # field 4: the parent's PID
        except (IndexError, ValueError):
            break
    return out


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


def cmdline(pid: int) -> str | None:
    """The command line of ``pid``, its arguments joined by spaces (None: gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").rstrip()
    except OSError:
        return None


def pids_naming(text: str) -> list[int]:
    """Every live process (this one aside) whose command line contains ``text``: how the
    processes of a lab are found whatever started them, since each names the lab's state
    directory on its command line (a container shim carries its spawner's)."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        cmd = cmdline(int(entry))
        if cmd is not None and text in cmd and alive(int(entry)):
            out.append(int(entry))
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


def listening_ports(netns: str) -> set[int]:
    """TCP ports something listens on inside ``netns`` (IPv4 and IPv6), from the kernel's socket
    tables as a thread inside the namespace sees them (``/proc/thread-self/net``)."""

    def read() -> set[int]:
        ports: set[int] = set()
        for table in ("tcp", "tcp6"):
            try:
                rows = Path(f"/proc/thread-self/net/{table}").read_text().splitlines()[1:]
            except FileNotFoundError:  # no IPv6 in this kernel
                continue
            for row in rows:
                fields = row.split()
                if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports

    return namespaces.run_in(netns, read)


def wait_listening(netns: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Return once ``proc`` (a server started in ``netns``) listens on TCP ``port``; raise if it
    exits first or does not listen within ``timeout_s``. A client started before that gets
    'connection refused' from a server that is only slow to start."""
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while port not in listening_ports(netns):
        if proc.poll() is not None:
            raise RuntimeError(f"server {proc.args!r} in {netns} exited ({proc.returncode}) before listening on {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"server {proc.args!r} in {netns} did not listen on port {port} within {timeout_s:g} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
