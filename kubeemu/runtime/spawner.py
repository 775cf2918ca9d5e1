"""The kubelet's shim spawner (a "zygote"): one process per kubelet that forks every container's shim.

Starting a shim used to cost a fresh interpreter per container (``nsenter`` and ``unshare`` exec'd,
then ``python -m kubeemu.runtime.shim`` importing the standard library: 50-90 ms of CPU each).
The spawner pays for that once: it starts with :mod:`kubeemu.runtime.shim` (and everything the
shim uses) imported, and forks a shim per request, which runs the already-loaded code.

Two halves, in the order a shim comes to life:

1. :class:`Spawner`, in the kubelet (owned by :class:`kubeemu.runtime.pods.Runtime`): on first
   use it execs ``python -S -m kubeemu.runtime.spawner <kubelet root>/spawner.sock`` (an exec,
   no ``preexec_fn``: the kubelet may have used gRPC; see DESIGN.md, "Processes"), waits for its
   ``ready`` line, and records it in ``spawner.json`` (PID + start time, for ``lab down``). Its
   stdin is a pipe from the kubelet: the spawner exits when the kubelet is gone (EOF), and
   :meth:`Spawner.close` ends it the same way. Each :meth:`Spawner.spawn` is one connection to
   the socket: a JSON request line (spec, network namespace, shim log) and a JSON reply line
   (the shim's PID + start time, or an error). A spawner found dead is started again before the
   next request; a request it dies during fails with a message naming it (the container's
   ``CreateContainerError``; the pod worker retries on its next sync).
2. :func:`serve`, the spawner (single-threaded, standard library only, never gRPC): it accepts
   one connection at a time and forks a child that

   a. enters the pod's network namespace (``setns``; Debian's Python 3.11 has no ``os.setns``),
      unshares a mount and a UTS namespace and makes ``/`` a recursive slave (what
      ``nsenter --net`` + ``unshare --mount --uts --propagation slave`` did);
   b. forks the shim (new session, cwd ``/``, stdin ``/dev/null``, stdout/stderr the attempt's
      ``shim.log``, every descriptor of the spawner closed) which runs
      :func:`kubeemu.runtime.shim.main` and exits with its code;
   c. sends the shim's PID + start time (read while the shim is still its child, so it cannot
      have been reaped and its PID reused) and exits; the spawner reaps it and replies.

Who reaps the shims: init (PID 1), never the kubelet or the spawner. The middle child exits at
once, so every shim is an orphan from its first instant, as ``containerd-shim`` daemonizes
itself: the same for shims of this kubelet, of an earlier one, or of an earlier spawner. The
kubelet tracks them only by PID + start time (``shim.json``, ``container.json``;
:mod:`kubeemu.runtime.procs` counts a zombie as gone), so nothing depends on being their parent,
and a spawner or kubelet that dies leaves neither a zombie nor a shim tied to its life.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from kubeemu.runtime import shim

_log = logging.getLogger(__name__)

#: How long one spawn may take, queueing behind others included (the spawner serves one at a time,
#: a few milliseconds each), before the kubelet gives up on it.
SPAWN_TIMEOUT_S = 60.0
#: How long the kubelet waits for a new spawner's ``ready`` line (its imports, on a busy machine).
READY_TIMEOUT_S = 30.0
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWNET = 0x00020000, 0x04000000, 0x40000000
MS_SLAVE = 1 << 19
PR_SET_NAME = 15


# ------------------------------------------------------------------------------------ the kubelet's side


class SpawnError(OSError):
    """A shim could not be started; the message says why and names the spawner."""


class Spawner:
    """The kubelet's handle on its spawner process: started on first use, started again when found dead.

    Thread-safe: the kubelet spawns from its executor threads; requests queue on the socket."""

    def __init__(self, sock: pathlib.Path, python: str = sys.executable) -> None:
        self.sock = pathlib.Path(sock)
        self.python = python
        self.record = self.sock.with_name("spawner.json")
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        # -S: no site packages (the spawner needs only the standard library and kubeemu, on
        # PYTHONPATH). The socket path on the command line also names the kubelet's root in
        # every shim's (they are its forks): how ``lab down``'s checks find a lab's processes.
        return [self.python, "-S", "-m", "kubeemu.runtime.spawner", str(self.sock)]

    def _ensure(self) -> subprocess.Popen[bytes]:
        """The running spawner (under the lock): started when there is none or it died."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return proc
        if proc is not None:
            _log.warning("shim spawner (pid %d) exited with %s; starting a new one", proc.pid, proc.returncode)
        self.sock.parent.mkdir(parents=True, exist_ok=True)
        pkgroot = str(pathlib.Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkgroot, os.environ.get("PYTHONPATH")]))}
        errlog = self.sock.with_name("spawner.log")
        with open(errlog, "ab") as err:
            proc = subprocess.Popen(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True, env=env, cwd="/")
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if line.strip() != b"ready":
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            tail = errlog.read_bytes()[-400:].decode(errors="replace").strip() if errlog.exists() else ""
            raise SpawnError(f"the shim spawner {self.argv()} did not start (exit {proc.returncode}; "
                             f"{errlog}: {tail or 'empty'})")
        self._proc = proc
        dirfd = os.open(self.record.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            shim.write_json(dirfd, self.record.name, {"pid": proc.pid, "start": shim.start_time(proc.pid)})
        finally:
            os.close(dirfd)
        _log.info("shim spawner started (pid %d, socket %s)", proc.pid, self.sock)
        return proc

    def spawn(self, spec: pathlib.Path, netns: str | None, errlog: pathlib.Path) -> tuple[int, int | None]:
        """Start the shim of the attempt whose spec is ``spec`` in network namespace ``netns``
        (a path; None: the kubelet's own) with its stdout/stderr in ``errlog``. Returns the
        shim's PID and start time (blocking)."""
        with self._lock:
            proc = self._ensure()
        req = json.dumps({"spec": str(spec), "netns": netns, "log": str(errlog)}).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(SPAWN_TIMEOUT_S)
                s.connect(str(self.sock))
                s.sendall(req)
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        except OSError as e:
            raise SpawnError(f"shim spawner (pid {proc.pid}, {self.sock}): {e}") from e
        if not reply:
            raise SpawnError(f"the shim spawner (pid {proc.pid}) ended the request for {spec} without an answer "
                             f"(it exited: {proc.poll()})")
        ans = json.loads(reply)
        if "error" in ans:
            raise SpawnError(f"shim spawner: {ans['error']}")
        return int(ans["pid"]), ans.get("start")

    def close(self, timeout_s: float = 5.0) -> None:
        """End the spawner (its stdin closed: it exits) and reap it; the shims it started live on."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            self.record.unlink()


def recorded(root: pathlib.Path) -> tuple[int, int | None] | None:
    """The spawner recorded under a kubelet root (``spawner.json``), running or not."""
    try:
        rec = json.loads((pathlib.Path(root) / "spawner.json").read_text())
        return int(rec["pid"]), rec.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------ the spawner


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_namespaces(netns: str | None) -> None:
    """Step a: the pod's network namespace (``netns``, a path), a new mount and UTS namespace,
    ``/`` a recursive slave (host mounts propagate in, the shim's never out)."""
    if netns:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
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
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def spawn(req: dict[str, Any], close: list[int]) -> dict[str, Any]:
    """Steps a-c for one request; returns the reply (``pid`` + ``start``, or ``error``). ``close``:
    the spawner's descriptors, closed in the shim."""
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
    data = b""
    try:
        while chunk := os.read(r, 4096):
            data += chunk
    finally:
        os.close(r)
        os.waitpid(child, 0)
    if not data:
        return {"error": f"starting the shim for {req.get('spec')}: the spawner's child died without an answer"}
    return dict(json.loads(data))


def _handle(conn: socket.socket, listener: socket.socket) -> None:
    conn.settimeout(10.0)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    try:
        req = json.loads(data)
        reply = spawn(req, [listener.fileno(), conn.fileno()])
    except (ValueError, KeyError, OSError) as e:
        reply = {"error": f"bad spawn request {data[:200]!r}: {e}"}
    conn.sendall(json.dumps(reply).encode() + b"\n")


def serve(sock_path: str) -> int:
    """Listen on ``sock_path``, print ``ready``, serve spawn requests one at a time until stdin
    reaches EOF (the kubelet closed it or is gone)."""
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
    while True:
        ready, _, _ = select.select([listener.fileno(), 0], [], [])
        if 0 in ready and not os.read(0, 4096):
            with contextlib.suppress(OSError):
                os.unlink(sock_path)
            return 0
        if listener.fileno() in ready:
            conn, _ = listener.accept()
            with conn:
                try:
                    _handle(conn, listener)
                except OSError as e:  # a kubelet thread that gave up; the next request is served
                    print(f"kubeemu spawner: {e}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -S -m kubeemu.runtime.spawner SOCKET", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return serve(args[0])


if __name__ == "__main__":
    sys.exit(main())
