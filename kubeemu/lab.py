"""Starting emulated clusters as processes, and the kubeconfig that points kubectl at them.

This is the whole surface ``tools/lab`` needs: ``start_cluster`` (one ``python -m kubeemu``
process per cluster, optionally inside a network namespace via ``ip netns exec``),
``ClusterHandle.stop`` and ``write_kubeconfig`` (one context per cluster, plain http, no
credentials: the emulator has no authentication).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml

_log = logging.getLogger(__name__)


@dataclass
class ClusterHandle:
    """A running emulated cluster process."""

    name: str
    url: str
    pid: int
    pod_cidrs: tuple[str, ...] = ()
    service_cidrs: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    argv: tuple[str, ...] = ()

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; only this handle's own pid."""
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return
            if self.proc is None and not self.alive():
                return
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(5)


def start_cluster(
    name: str,
    pod_cidrs: Sequence[str],
    service_cidrs: Sequence[str],
    nodes: Sequence[str] = (),
    listen: str = "127.0.0.1:0",
    netns: str | None = None,
    log: IO[bytes] | None = None,
    graceful_pods: bool = False,
    python: str = sys.executable,
    timeout: float = 15.0,
    on_spawn: Callable[[int], None] | None = None,
) -> ClusterHandle:
    """Start ``python -m kubeemu`` for one cluster and wait until it answers ``/readyz``.

    ``netns`` runs it inside that network namespace (``listen`` must then be an address of that
    namespace; the lab's choice). ``nodes`` is informational here: Node objects are registered
    by the lab kubelet (``kubeemu.kubelet``), which also holds their podCIDRs. ``on_spawn`` is
    called with the new PID before anything is awaited, so a caller can record the process
    (the lab writes it to its state file) before an interrupt could orphan it.
    """
    argv = [python, "-m", "kubeemu", "--listen", listen, "--name", name,
            "--service-cidr", ",".join(service_cidrs)]
    if graceful_pods:
        argv.append("--graceful-pods")
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log if log is not None else subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    if on_spawn is not None:
        on_spawn(proc.pid)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    url = ""
    line = proc.stdout.readline().decode()
    if " listening on " in line:
        url = line.rsplit(" listening on ", 1)[1].strip()
    if not url:
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"cluster {name}: kubeemu did not start (argv {' '.join(argv)}; first line {line!r})")
    handle = ClusterHandle(name, url, proc.pid, tuple(pod_cidrs), tuple(service_cidrs), tuple(nodes), proc,
                           tuple(argv))
    if netns:
        return handle  # /readyz is only reachable from inside the namespace
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                if r.status == 200:
                    return handle
        except OSError:
            time.sleep(0.05)
    handle.stop()
    raise RuntimeError(f"cluster {name}: kubeemu at {url} not ready after {timeout}s")


def kubeconfig(clusters: Mapping[str, str], current: str | None = None) -> dict[str, object]:
    """A kubeconfig dict with one cluster/context/user per emulated cluster (http, no auth)."""
    names = list(clusters)
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": n, "cluster": {"server": clusters[n]}} for n in names],
        "users": [{"name": f"{n}-admin", "user": {}} for n in names],
        "contexts": [{"name": n, "context": {"cluster": n, "user": f"{n}-admin", "namespace": "default"}}
                     for n in names],
        "current-context": current or (names[0] if names else ""),
        "preferences": {},
    }


def write_kubeconfig(path: Path, clusters: Mapping[str, str], current: str | None = None) -> Path:
    """Write the kubeconfig atomically (mode 0600, as kubectl expects); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(kubeconfig(clusters, current), f, sort_keys=False)
    tmp.replace(path)
    return path


def stats(url: str) -> dict[str, object]:
    """The admin stats of a running emulator (objects per resource, revision, watches)."""
    with urllib.request.urlopen(url + "/_kubeemu/stats", timeout=5) as r:
        data: dict[str, object] = json.loads(r.read())
        return data
