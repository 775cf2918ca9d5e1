"""``python -S -m kubeemu.runtime.zygote SOCKET``: the kubelet's shim spawner process (a "zygote").

Starting a shim used to cost a fresh interpreter per container (``nsenter`` and ``unshare`` exec'd,
then ``python -m kubeemu.runtime.shim`` importing the standard library: 40-90 ms of CPU each).
This process pays for that once per kubelet: it starts with :mod:`kubeemu.runtime.shim` imported
and forks a shim per request, which runs the already-loaded code. The kubelet's side (starting
it, restarting it, the requests) is :mod:`kubeemu.runtime.spawner`.

It is single-threaded and imports only the standard library and the shim (never gRPC, logging,
threading or subprocess: every module loaded here is memory each fork maps, and threading's
fork handlers would run in each child). It listens on ``SOCKET``, writes ``ready`` on stdout,
and serves connections, their middle children running side by side (:func:`serve`), until its
stdin (a pipe from the kubelet) reaches EOF: the kubelet closed it or is gone. A connection
is one JSON request line (``spec``: the attempt's ``spec.json``; ``netns``: a network
namespace path or null for the kubelet's own; ``log``: the shim's stdout/stderr file) and one
JSON reply line (``pid`` + ``start`` of the shim, or ``error``). For each request, in this
order, it forks a middle child that

a. enters the pod's network namespace (``setns``; Debian's Python 3.11 has no ``os.setns``),
   unshares a mount and a UTS namespace and makes ``/`` a recursive slave (what
   ``nsenter --net`` + ``unshare --mount --uts --propagation slave`` did);
b. forks the shim (new session, cwd ``/``, stdin ``/dev/null``, stdout/stderr the request's
   ``log``, the spawner's sockets and pipes closed), which runs :func:`kubeemu.runtime.shim.main`
   and exits with its code;
c. sends the shim's PID + start time (read while the shim is still its child, so it cannot have
   been reaped and its PID reused) and exits; the spawner reaps it and replies.

Before it listens, the spawner moves into a mount namespace of its own, a copy of the kubelet's
without the ``/run/netns`` mount and so without one entry per pod network namespace
(:func:`isolate_mounts`): each container's mount namespace is a copy of the spawner's, and
copying, walking (``rslave``), listing (the shim's top-level mounts) and dropping
(``pivot_root``) that table is work per container that grew with every pod on the machine. The
copy is made again whenever the kubelet's mount table changes other than in ``/run/netns``
(:func:`refresh_mounts`, before the next request is served and while idle): a container sees
the host's mounts as of its start, as with a copy per container, and the spawner holds no copy
of a file system the host has unmounted (with a private ``/`` nothing propagates). The pod's
namespace file is opened through a descriptor of the kubelet's root taken before the move
(``openat``: the walk stays in the kubelet's mount tree), which no shim or container holds.

The middle child exits at once, so every shim is an orphan as soon as it starts and init
(PID 1) reaps it, as ``containerd-shim`` daemonizes itself: never the kubelet's or this
process's child, it outlives both, and neither leaves a zombie behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys
from typing import Any

from kubeemu.runtime import shim

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWNET = 0x00020000, 0x04000000, 0x40000000
MS_SLAVE = 1 << 19
PR_SET_NAME = 15


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


#: The kubelet's root directory as the spawner saw it before :func:`isolate_mounts` (an ``O_PATH``
#: descriptor; None: the spawner stayed in the kubelet's mount namespace): network namespace
#: paths are opened relative to it, in the kubelet's mount tree, where ``/run/netns`` is.
_host_root: int | None = None
#: The kubelet's mount namespace (to copy it again) and its mount table, opened there: readable
#: as the exceptional condition of ``select`` when that table changed.
_host_ns: int | None = None
_host_table: int | None = None
#: The kubelet's mount points as of the spawner's copy, ``/run/netns`` entries aside.
_copied: frozenset[bytes] = frozenset()
#: Where ``ip netns`` keeps its namespace entries (one bind mount each).
NETNS_DIR = "/run/netns"


def _host_mounts() -> frozenset[bytes]:
    """The kubelet's mount points now (read from :data:`_host_table`), ``/run/netns`` aside."""
    assert _host_table is not None
    raw = b""
    offset = 0
    while chunk := os.pread(_host_table, 65536, offset):
        raw += chunk
        offset += len(chunk)
    prefix = NETNS_DIR.encode()
    return frozenset(mp for line in raw.splitlines() if len(f := line.split(b" ", 5)) > 4
                     and not (mp := f[4]).startswith(prefix))


def _copy_mounts() -> None:
    """(Again) a copy of the kubelet's mount namespace: ``/`` a recursive slave, ``/run/netns``
    lazily unmounted in it."""
    global _copied
    assert _host_ns is not None
    _check(shim._libc.setns(_host_ns, CLONE_NEWNS), "entering the kubelet's mount namespace")
    _copied = _host_mounts()
    _check(shim._libc.unshare(CLONE_NEWNS), "unsharing the spawner's mount namespace")
    shim.mount("none", "/", None, shim.MS_REC | MS_SLAVE)
    shim.detach(NETNS_DIR)  # False when it is no mount point (no pod namespace yet): nothing to drop


def isolate_mounts() -> None:
    """Move the spawner into its copy of the kubelet's mount namespace (see the module
    docstring). Best effort: where it cannot (no ``CAP_SYS_ADMIN``), the spawner stays in the
    kubelet's namespace and says so."""
    global _host_root, _host_ns, _host_table
    flags = os.O_RDONLY | os.O_CLOEXEC
    fds = [os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), os.open("/proc/self/ns/mnt", flags),
           os.open("/proc/self/mountinfo", flags)]
    _host_root, _host_ns, _host_table = fds
    try:
        _copy_mounts()
    except OSError as e:
        for fd in fds:
            os.close(fd)
        _host_root = _host_ns = _host_table = None
        print(f"kubeemu spawner: staying in the kubelet's mount namespace: {e}", file=sys.stderr, flush=True)


def refresh_mounts() -> None:
    """The kubelet's mount table changed: copy it again unless only ``/run/netns`` changed."""
    if _host_table is not None and _host_mounts() != _copied:
        _copy_mounts()


def _open_netns(netns: str) -> int:
    """The network namespace file ``netns`` (a path in the kubelet's mount namespace), opened."""
    if _host_root is not None and netns.startswith("/"):
        return os.open(netns.lstrip("/"), os.O_RDONLY | os.O_CLOEXEC, dir_fd=_host_root)
    return os.open(netns, os.O_RDONLY | os.O_CLOEXEC)


def enter_namespaces(netns: str | None) -> None:
    """Step a: the pod's network namespace (``netns``, a path), a new mount and UTS namespace,
    ``/`` a recursive slave (host mounts propagate in, the shim's never out)."""
    if netns:
        try:
            fd = _open_netns(netns)
        except OSError as e:
            raise OSError(e.errno, f"opening the pod's network namespace {netns}: {e.strerror}") from e
        try:
            _check(shim._libc.setns(fd, CLONE_NEWNET), f"entering the pod's network namespace {netns}")
        finally:
            os.close(fd)
    _check(shim._libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unsharing the mount and UTS namespaces")
    shim.mount("none", "/", None, shim.MS_REC | MS_SLAVE)


def _run_shim(req: dict[str, Any], close: list[int]) -> None:
    """Step b, in the shim process: never returns."""
    code = 1
    try:
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(devnull)
        os.close(out)
        shim._libc.prctl(PR_SET_NAME, b"kubeemu-shim", 0, 0, 0)  # in ps/top; the command line stays the spawner's
        code = shim.main([req["spec"]])
    except BaseException:  # the child must never return into the spawner's loop
        sys.excepthook(*sys.exc_info())  # into shim.log, as the interpreter prints an uncaught error
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def start(req: dict[str, Any], close: list[int]) -> tuple[int, int]:
    """Fork the middle child of one request (steps a-c); returns its PID and the read end of the
    pipe its reply comes on. ``close``: the spawner's descriptors, closed in the shim."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # the middle child: namespaces, then the shim, then gone
        reply: dict[str, Any]
        try:
            os.close(r)
            enter_namespaces(req.get("netns"))
            pid = os.fork()
            if pid == 0:
                _run_shim(req, [*close, w])
            reply = {"pid": pid, "start": shim.start_time(pid)}
        except BaseException as e:  # reported to the kubelet, never raised into the loop
            reply = {"error": f"starting the shim for {req.get('spec')}: {e}"}
        try:
            os.write(w, json.dumps(reply).encode())
        finally:
            os._exit(0)
    os.close(w)
    return child, r


def finish(child: int, r: int, spec: object) -> dict[str, Any]:
    """The reply of the middle child ``child`` (readable on ``r``: it writes once, then exits),
    which is reaped here."""
    data = b""
    try:
        while chunk := os.read(r, 4096):
            data += chunk
    finally:
        os.close(r)
        os.waitpid(child, 0)
    if not data:
        return {"error": f"starting the shim for {spec}: the spawner's child died without an answer"}
    return dict(json.loads(data))


def _read_request(conn: socket.socket) -> dict[str, Any] | None:
    """The request line of a new connection (None: the client left before sending one)."""
    conn.settimeout(10.0)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    try:
        return dict(json.loads(data))
    except (ValueError, TypeError) as e:
        return {"bad": f"bad spawn request {data[:200]!r}: {e}"}


def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError as e:  # a kubelet thread that gave up; the others are served
        print(f"kubeemu spawner: {e}", file=sys.stderr, flush=True)
    finally:
        conn.close()


def serve(sock_path: str) -> int:
    """Listen on ``sock_path``, print ``ready``, serve spawn requests until stdin reaches EOF
    (the kubelet closed it or is gone).

    Requests overlap: a request's middle child is forked as soon as the request is read, and its
    reply is sent when the child's pipe answers, so while one child enters its namespaces and
    forks its shim (the slow part: setns, unshare, a mount) the next requests are read and
    forked too, on whatever core is free, instead of queueing behind it."""
    isolate_mounts()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    os.chmod(sock_path, 0o600)
    listener.listen(1024)
    # Everything imported so far is shared with every fork; frozen, the collector of a shim never
    # walks it (a walk would write to, and so copy, every page of the spawner's heap in each shim).
    gc.freeze()
    os.write(1, b"ready\n")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the kubelet read its line; nothing else goes there
    os.close(devnull)
    #: Requests whose middle child runs: its reply pipe -> (the kubelet's connection, child, spec).
    inflight: dict[int, tuple[socket.socket, int, object]] = {}
    while True:
        ready, _, changed = select.select([listener.fileno(), 0, *inflight], [],
                                          [_host_table] if _host_table is not None else [])
        if changed:  # before a request is served: its container sees the host's mounts as of now
            refresh_mounts()
        if 0 in ready and not os.read(0, 4096):
            return 0  # the socket file stays: a new spawner may already have bound the path
        for r in [fd for fd in ready if fd in inflight]:
            conn, child, spec = inflight.pop(r)
            _reply(conn, finish(child, r, spec))
        if listener.fileno() not in ready:
            continue
        conn, _ = listener.accept()
        try:
            req = _read_request(conn)
        except OSError as e:  # a kubelet thread that gave up before sending
            print(f"kubeemu spawner: {e}", file=sys.stderr, flush=True)
            conn.close()
            continue
        if req is None:
            conn.close()
            continue
        if "bad" in req:
            _reply(conn, {"error": req["bad"]})
            continue
        # The shim must hold none of the spawner's descriptors: the listener, this connection,
        # and every other request's connection and reply pipe.
        close = [listener.fileno(), conn.fileno(), *inflight, *(c.fileno() for c, _, _ in inflight.values()),
                 *(fd for fd in (_host_root, _host_ns, _host_table) if fd is not None)]
        try:
            child, r = start(req, close)
        except OSError as e:  # no fork (EAGAIN, ENOMEM): this request fails, the spawner serves on
            _reply(conn, {"error": f"starting the shim for {req.get('spec')}: {e}"})
            continue
        inflight[r] = (conn, child, req.get("spec"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -S -m kubeemu.runtime.zygote SOCKET", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return serve(args[0])


if __name__ == "__main__":
    sys.exit(main())
