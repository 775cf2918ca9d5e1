"""The kubelet's handle on its shim spawner (:mod:`kubeemu.runtime.zygote`): start, restart, requests.

:class:`Spawner` is owned by :class:`kubeemu.runtime.pods.Runtime`. In this order:

1. when the kubelet starts (:meth:`Spawner.start`), or else on the first spawn, it execs
   ``python -S -m kubeemu.runtime.zygote <kubelet root>/spawner.sock`` (an exec, no
   ``preexec_fn``: the kubelet may have used gRPC; see DESIGN.md, "Processes"),
   waits for its ``ready`` line and records it in ``spawner.json`` (PID + start time, for
   ``lab down``). Its stdin is a pipe from the kubelet: the spawner exits when the kubelet is
   gone (EOF), and :meth:`Spawner.close` (kubelet shutdown) ends it the same way;
2. each :meth:`Spawner.spawn` is one connection to the socket: a JSON request line (spec, network
   namespace, shim log), a JSON reply line (the shim's PID + start time, or an error);
3. a spawner found dead before a request is reaped and started again; a request it dies during,
   or that it cannot serve, fails with a :class:`SpawnError` naming the cause (the container's
   ``CreateContainerError``; the pod worker tries again on its next sync).

Who reaps the shims: init (PID 1), never the kubelet or the spawner (the spawner's middle child
exits at once, so each shim is an orphan from its start, as ``containerd-shim`` daemonizes
itself). The same holds for shims of this kubelet, of an earlier one or of an earlier spawner:
the kubelet tracks them only by PID + start time (``shim.json``, ``container.json``;
:mod:`kubeemu.runtime.procs` counts a zombie as gone), so nothing depends on being their parent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import select
import socket
import subprocess
import sys
import threading

from kubeemu.runtime import shim

_log = logging.getLogger(__name__)

#: How long one spawn may take, waiting for the spawner to read it included (it reads requests
#: one after another, each a few milliseconds), before the kubelet gives up on it.
SPAWN_TIMEOUT_S = 60.0
#: How long the kubelet waits for a new spawner's ``ready`` line (its imports, on a busy machine).
READY_TIMEOUT_S = 30.0


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
        self._closed = False  # after close(): a late spawn (a thread of a detached pod worker) starts nothing

    def argv(self) -> list[str]:
        # -S: no site packages (the spawner needs only the standard library and kubeemu, on
        # PYTHONPATH). The socket path on the command line also names the kubelet's root in
        # every shim's (they are its forks): how ``lab down``'s checks find a lab's processes.
        return [self.python, "-S", "-m", "kubeemu.runtime.zygote", str(self.sock)]

    def _ensure(self) -> subprocess.Popen[bytes]:
        """The running spawner (under the lock): started when there is none or it died."""
        if self._closed:
            raise SpawnError(f"the shim spawner {self.sock} is closed (the kubelet is stopping)")
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

    def start(self) -> None:
        """Start the spawner now rather than on the first spawn (blocking): a node's container
        runtime runs before its first pod arrives, so that pod does not wait for it."""
        with self._lock:
            self._ensure()

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
        """End the spawner (its stdin closed: it exits) and reap it; the shims it started live on.
        Later spawns fail: a pod worker's thread still running after the kubelet detached must
        not start a spawner nobody closes."""
        with self._lock:
            proc, self._proc, self._closed = self._proc, None, True
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
        for f in (self.record, self.sock):
            with contextlib.suppress(OSError):
                f.unlink()


def recorded(root: pathlib.Path) -> tuple[int, int | None] | None:
    """The spawner recorded under a kubelet root (``spawner.json``), running or not."""
    try:
        rec = json.loads((pathlib.Path(root) / "spawner.json").read_text())
        return int(rec["pid"]), rec.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None
