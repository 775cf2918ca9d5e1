"""Test doubles for the kubelet API and the real kubectl, shared by the emulator's conformance
tests (``tests/conformance/test_logs_exec.py``) and the tree manager's kubelet tests.

:class:`FakeAccess` is a :class:`kubeemu.runtime.access.ContainerAccess` over CRI-format log files
a test writes and commands run directly on the host (``sh -c ...``); :func:`serve_kubelet` serves
:func:`kubeemu.kubeletapi.make_app` over it on an event loop; :class:`Kubectl` runs the real
kubectl with a kubeconfig and a discovery cache of the test's own; :func:`logs_follow_until_stopped`
is the check of ``kubectl logs -f``, :func:`exec_ends_with_kubectl` the check that a killed
``kubectl exec`` ends its command, :func:`read_head` reads an HTTP
response head off a raw socket.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from kubeemu.kubeletapi import make_app
from tests.waiting import wait_until


class FakeAccess:
    """ContainerAccess over files in a temp dir; state per (ns, pod, container)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state: dict[tuple[str, str, str], str] = {}  # running | waiting | exited
        self.attempt: dict[tuple[str, str, str], int] = {}

    def path(self, ns: str, pod: str, container: str, attempt: int) -> Path:
        d = self.root / f"{ns}_{pod}" / container
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{attempt}.log"

    def write(self, ns: str, pod: str, container: str, *lines: str, attempt: int | None = None) -> None:
        """Append CRI lines: ``"stdout F text"`` (the timestamp is added, increasing)."""
        n = self.attempt.get((ns, pod, container), 0) if attempt is None else attempt
        with self.path(ns, pod, container, n).open("a") as f:
            for i, line in enumerate(lines):
                f.write(f"2024-01-02T03:04:{5 + i:02d}.120000000Z {line}\n")

    def log_path(self, namespace: str, pod: str, container: str, previous: bool) -> Path:
        key = (namespace, pod, container)
        if key not in self.state:
            raise LookupError(f'container "{container}" in pod "{pod}" is not available')
        if self.state[key] == "waiting":
            raise LookupError(f'container "{container}" in pod "{pod}" is waiting to start: ContainerCreating')
        attempt = self.attempt.get(key, 0)
        if previous:
            if attempt == 0:
                raise LookupError(f'previous terminated container "{container}" in pod "{pod}" not found')
            attempt -= 1
        return self.path(namespace, pod, container, attempt)

    def exec_argv(self, namespace: str, pod: str, container: str, command: list[str]) -> list[str]:
        if self.state.get((namespace, pod, container)) != "running":
            raise LookupError(f'container not found ("{container}")')
        return list(command)

    def is_running(self, namespace: str, pod: str, container: str) -> bool:
        return self.state.get((namespace, pod, container)) == "running"


def serve_kubelet(access: FakeAccess, loop: asyncio.AbstractEventLoop) -> tuple[int, web.AppRunner]:
    """The kubelet app over ``access`` on ``loop`` (a running loop of another thread, e.g. an
    emulator's), on 127.0.0.1 with an ephemeral port: (port, the runner to clean up)."""
    runner = web.AppRunner(make_app(access, poll_interval=0.05))

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    return asyncio.run_coroutine_threadsafe(start(), loop).result(10), runner


def stop_kubelet(runner: web.AppRunner, loop: asyncio.AbstractEventLoop) -> None:
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)


KUBECTL = shutil.which("kubectl")


class Kubectl:
    """The real kubectl against the session's emulated cluster, with a kubeconfig and a
    discovery cache of the test's own (so a CRD one test makes never hides behind another
    test's cached discovery, and nothing is written under ``~/.kube``)."""

    def __init__(self, kubectl: str, kubeconfig: Path, cache_dir: Path) -> None:
        self.kubectl, self.kubeconfig, self.cache_dir = kubectl, kubeconfig, cache_dir

    def argv(self, *args: str) -> list[str]:
        """The command line, for a test that runs kubectl itself (``logs -f``, a killed exec)."""
        return [self.kubectl, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache_dir), *args]

    def __call__(self, *args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
        """Run it (``stdin`` fed in); with ``ok`` a non-zero exit fails the test with kubectl's stderr."""
        p = subprocess.run(self.argv(*args), input=stdin, capture_output=True, text=True, timeout=60)
        if ok:
            assert p.returncode == 0, f"kubectl {' '.join(args)}: {p.stderr}"
        return p


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: it ended and waits for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between open and read (ESRCH)
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def logs_follow_until_stopped(argv: list[str], access: FakeAccess, ns: str, pod: str, container: str,
                              out_path: Path) -> None:
    """``kubectl logs -f`` (``argv``) of the running ``container``, whose log holds ``first``:
    prints it, follows the lines written next (a partial entry joined with the next one), and
    ends (exit 0) once the container stops."""
    with out_path.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: out_path.read_text() == "first\n", 30, "kubectl logs -f printed the first line")
        access.write(ns, pod, container, "stdout P sec", "stdout F ond")
        wait_until(lambda: out_path.read_text() == "first\nsecond\n", 30, "kubectl logs -f followed the log")
        assert proc.poll() is None  # still following while the container runs
        access.write(ns, pod, container, "stdout F last words")
        access.state[(ns, pod, container)] = "exited"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out_path.read_text() == "first\nsecond\nlast words\n"


def exec_ends_with_kubectl(argv: list[str], pid_file: Path, what: str, env: Mapping[str, str] | None = None) -> None:
    """Run ``argv`` (a ``kubectl exec ... -- sh -c 'echo $$ > pid_file; exec sleep 600'``), wait
    for the command to start, kill kubectl: the command (``what``, in the failure message) must
    end, as a kubelet ends an exec whose client went away."""
    ex = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, "the exec'd command started")
        pid = int(pid_file.read_text())
        assert alive(pid)
    finally:
        ex.kill()
        ex.wait()
    wait_until(lambda: not alive(pid), 30, f"{what} (pid {pid}) ended when kubectl went away")


def read_head(s: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP response head read off ``s``: (head, the bytes after its blank line); the peer
    closing before the head ends fails the test."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    head, rest = got.split(b"\r\n\r\n", 1)
    return head, rest
