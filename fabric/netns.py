"""Network namespaces, entered by one thread at a time and never by forking.

``setns(fd, CLONE_NEWNET)`` moves only the calling *thread*; every socket the thread opens
afterwards belongs to the target namespace for its whole life, whichever namespace the thread
is in later. That is all this fabric needs to drive a namespace from a process living in
another one (tests, the lab, benchmarks, the reflector reaching an API server in a lab
namespace), so this module is the one place that does it:

* :func:`enter` switches the calling thread for good (thread-pool initialisers);
* :func:`run_in` runs a function in a short-lived thread that entered the namespace, so the
  caller's thread never changes;
* :func:`netlink_socket` and :func:`iproute` open netlink sockets inside a namespace.

Why not fork: a process that may have used gRPC must never fork and go on running code
before ``exec`` (a ``preexec_fn``, ``os.fork``, ``multiprocessing``). gRPC installs fork
handlers that can deadlock there, inside ``fork()``, where no Python timeout reaches.
pyroute2's own ``IPRoute(netns=...)`` forks a Python child to create its socket, so it is not
used anywhere: :func:`iproute` hands pyroute2 a socket opened by a thread instead. Programs
are started inside a namespace by exec (``nsenter``, see :mod:`tools.nsutil`), which lets
``subprocess`` use ``vfork`` and run no fork handler at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0

T = TypeVar("T")

_libc: Any = None


def _setns(fd: int, what: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


def path(name: str) -> Path:
    """The file that pins namespace ``name`` (what ``ip netns add NAME`` creates)."""
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


def list_all() -> list[str]:
    """Names of the namespaces pinned under /run/netns (what ``ip netns list`` shows)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def inode(name: str) -> int | None:
    """Inode of a named namespace (its nsfs inode, the same one /proc/PID/ns/net shows)."""
    try:
        return os.stat(path(name)).st_ino
    except OSError:
        return None


def _open(name: str) -> int:
    try:
        return os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(2, f"network namespace {name!r} does not exist", str(path(name))) from None


def enter(target: str | int) -> None:
    """Move the calling thread into a namespace for good: a name under /run/netns, or an fd
    of a namespace file (``/proc/PID/ns/net``) opened earlier."""
    if isinstance(target, int):
        _setns(target, f"the network namespace of fd {target}")
        return
    fd = _open(target)
    try:
        _setns(fd, f"network namespace {target!r}")
    finally:
        os.close(fd)


def run_in(name: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a fresh thread that first entered namespace ``name``; return its result.

    The thread is discarded afterwards, so no thread of the caller ever changes namespace.
    Exceptions raised by ``fn`` or by entering the namespace are re-raised here.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            enter(name)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)

    t = threading.Thread(target=run, name=f"netns-{name}")
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]


def netlink_socket(name: str | None, proto: int = NETLINK_ROUTE, kind: int = socket.SOCK_RAW) -> socket.socket:
    """A netlink socket (close-on-exec, not yet bound) that lives in namespace ``name`` (None:
    the current one). Netlink treats SOCK_RAW and SOCK_DGRAM alike; pyroute2 wants the latter."""

    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, kind | socket.SOCK_CLOEXEC, proto)

    return make() if name is None else run_in(name, make)


def iproute(name: str | None) -> Any:
    """A pyroute2 ``IPRoute`` talking to namespace ``name`` (None: the current one), over a
    socket opened by a thread instead of pyroute2's forked helper (see the module docstring)."""
    from pyroute2 import IPRoute

    if name is None:
        return IPRoute()
    fd = netlink_socket(name, kind=socket.SOCK_DGRAM).detach()
    try:
        return IPRoute(fileno=fd)
    except BaseException:
        with contextlib.suppress(OSError):  # pyroute2 may have closed it already
            os.close(fd)
        raise
