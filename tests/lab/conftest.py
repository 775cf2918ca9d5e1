"""Lab tier fixtures: a real lab built through the ``fabric-tool`` CLI, as a user would.

:class:`Lab` drives a lab through ``fabric-tool``; :class:`KubeLab` adds the real kubectl for
``kubernetes: true`` labs (the one kubectl helper every Kubernetes lab test uses); both are
brought up and torn down by :func:`lab_running` (:func:`kube_lab_running` for a KubeLab), which
checks that ``lab down`` leaves nothing behind.

Topology used by the module-scoped ``lab`` fixture (examples/lab.yaml shape, own name)::

      east (p2p)                         west (p2p)
   e1 [p0 p1]  e2 [p0 p1]            w1 [p0 p1]  w2 [p0 p1]
       \\          \\                    /           /
        +----------+---- br-ul (lab ns, reflector) +

Every test tolerates running after the others: each one restores what it breaks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from tools import nsutil
from tools.bench import common as bench_common
from tools.lab.state import state_dir

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FABRIC_TOOL = str(BIN / "fabric-tool")
#: Short enough to keep the drift tests quick, long enough not to hide a missed netlink event.
RESYNC_S = 4.0
KUBECTL = shutil.which("kubectl")
#: The mark of every test module that drives a lab's Kubernetes with kubectl.
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary on PATH (install one to run this test)")


def run(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def spool() -> IO[str]:
    """Where a long ping of a gap measurement writes (seek to 0 and read it once ping ended).

    Not a pipe: ``ping -D`` writes one line per reply (about 80 bytes for IPv4, 85 for IPv6)
    and blocks once a pipe's 64 KiB are full, sending nothing until someone reads. The
    active/active cut tests start every ping at once and read them one after another when all
    are done, so each 800-reply IPv6 ping (68 KB) stopped at reply ~769 until its turn came: a
    pause of 0.5-2.8 s without loss, longer the later the flow was read, that looked like an IPv6
    dataplane problem of the surviving gateways (IPv4's 800 lines just fit). Measured in the lab:
    e1's underlay saw the echo requests themselves stop after seq 769 for exactly the gap ping
    reported, while no route, nexthop or neighbour changed at that time. A file never blocks."""
    return tempfile.TemporaryFile("w+")


class Ping:
    """A 10 ms ICMP ping (``family`` 4 or 6) from one pod to another, with the kernel timestamp
    of every reply: the measure of an outage is the largest gap between replies."""

    def __init__(self, lab: Lab, src: str, dst: str, duration_s: int, family: int = 4) -> None:
        pods = lab.pods()
        target = pods[dst]["ip"] if family == 4 else pods[dst]["ip6"]
        self._out = spool()
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", pods[src]["netns"], "ping", f"-{family}", "-n", "-D", "-i", "0.01", "-W", "1",
             "-w", str(duration_s), target],
            stdout=self._out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def stop(self) -> list[float]:
        """Reply times (epoch seconds). Stops the ping if it still runs."""
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGINT)
        self._proc.wait(timeout=30)
        self._out.seek(0)
        out = self._out.read()
        self._out.close()
        return [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\].*icmp_seq=", out, re.M)]


def largest_gap(replies: list[float], start: float, end: float) -> float:
    """Longest time without a reply inside [start, end] (epoch seconds); a window without any
    reply fails the test instead of measuring the whole window as one gap."""
    assert any(start <= t <= end for t in replies), "no replies at all in the window"
    return bench_common.largest_gap(replies, start, end)


class Lab:
    def __init__(self, name: str, topology: Path) -> None:
        self.name = name
        self.topology = topology
        #: Set by :func:`lab_running`: what ``lab up`` printed, and the lab's processes at ``down``.
        self.up_stdout = ""
        self.down_pids: set[int] = set()

    def tool(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return run(FABRIC_TOOL, *args, check=check, timeout=timeout)

    def lab(self, verb: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.tool("lab", verb, "--name", self.name, *args, check=check)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.lab("status", "--json").stdout)
        return out

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {f"{c['name']}/{n['name']}": n for c in self.status()["clusters"] for n in c["nodes"]}

    def pods(self) -> dict[str, dict[str, Any]]:
        out = {}
        for c in self.status()["clusters"]:
            for n in c["nodes"]:
                for p in n["pods"]:
                    out[f"{c['name']}/{n['name']}/{p['name']}"] = p
        return out

    def check(self) -> dict[str, Any]:
        p = self.tool("check", "--lab", self.name, "--json", check=False)
        out: dict[str, Any] = json.loads(p.stdout)
        out["returncode"] = p.returncode
        return out

    def all_in_sync(self) -> bool:
        return all(n["in_sync"] for n in self.nodes().values())

    def nsrun(self, netns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", netns, *cmd, check=check)

    def ipj(self, netns: str, *args: str) -> Any:
        return json.loads(run("ip", "-n", netns, "-j", *args).stdout or "[]")


#: Run inside a pod with ``kubectl exec`` (argv ``N TIMEOUT URL...``): GET each URL ``N`` times, each
#: request given ``TIMEOUT`` seconds, print the answers (JSON: URL -> answers, ``ERROR ...`` for a
#: failed request). Shared by the lab tests that count which backend answered.
HTTP_ROUNDS = """
import json, sys, urllib.request
n, timeout, out = int(sys.argv[1]), float(sys.argv[2]), {}
for url in sys.argv[3:]:
    got = out.setdefault(url, [])
    for _ in range(n):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                got.append(r.read().decode().strip())
        except Exception as e:
            got.append("ERROR " + repr(e))
print(json.dumps(out))
"""


class KubeLab(Lab):
    """A ``kubernetes: true`` lab used as a user uses it: the real kubectl, with the kubeconfig
    ``lab up`` wrote (one context per cluster, named after it; set by :func:`kube_lab_running`)."""

    kubeconfig: Path

    def kubectl_argv(self, context: str, *args: str) -> list[str]:
        """The kubectl command line, for a test that runs it itself (``logs -f`` in the background)."""
        assert KUBECTL is not None, "no kubectl binary on PATH"
        return [KUBECTL, "--kubeconfig", str(self.kubeconfig), "--context", context, *args]

    def kubectl(self, context: str, *args: str, check: bool = True, timeout: float = 60,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``kubectl --context CONTEXT ARGS`` (``stdin`` fed to it); with ``check`` a non-zero exit
        fails the test showing both outputs."""
        p = subprocess.run(self.kubectl_argv(context, *args), input=stdin, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl --context {context} {' '.join(args)} -> {p.returncode}\n"
                                 f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p

    def apply(self, context: str, manifest: str) -> None:
        """``kubectl apply -f -`` of ``manifest`` (YAML or JSON)."""
        self.kubectl(context, "apply", "-f", "-", stdin=manifest)

    def get(self, context: str, *args: str, check: bool = True) -> Any:
        """``kubectl get ARGS -o json``, decoded; with ``check=False`` None when kubectl fails
        (the object does not exist), so a wait can poll for a deletion."""
        p = self.kubectl(context, "get", *args, "-o", "json", check=check)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def http_rounds(self, context: str, ns: str, pod: str, urls: list[str], n: int, *,
                    timeout: float) -> dict[str, list[str]]:
        """``n`` HTTP GETs of each URL from inside pod ``ns/pod`` (``kubectl exec`` of
        :data:`HTTP_ROUNDS`), each request given ``timeout`` seconds: the answers by URL."""
        out = self.kubectl(context, "exec", "-n", ns, pod, "--", "python3", "-c", HTTP_ROUNDS, str(n), str(timeout),
                           *urls, timeout=120).stdout
        answers: dict[str, list[str]] = json.loads(out)
        return answers

    def kube(self, cluster: str) -> dict[str, Any]:
        """``lab status``'s ``kubernetes`` part of ``cluster`` (its processes' PIDs and logs)."""
        k: dict[str, Any] = next(c["kubernetes"] for c in self.status()["clusters"] if c["name"] == cluster)
        return k

    def kube_pids(self) -> set[int]:
        """Every Kubernetes process of the lab (API servers, kubelets, controller-managers,
        kube-proxies, schedulers): they too must be gone after ``lab down``."""
        pids: set[int] = set()
        for c in self.status()["clusters"]:
            k = c["kubernetes"] or {}
            pids |= {p for key, p in k.items() if key.endswith("_pid") and p}
        return pids


def new_lab_name() -> str:
    """A lab name of its own (``kft`` + 5 hex digits), so labs never collide with the CI's."""
    return "kft" + uuid.uuid4().hex[:5]


LabT = TypeVar("LabT", bound=Lab)


@contextlib.contextmanager
def lab_running(lab: LabT, *up_args: str, extra_pids: Callable[[LabT], set[int]] | None = None) -> Iterator[LabT]:
    """``fabric-tool lab up`` ``lab.topology`` with ``up_args``; yield; ``lab down``; then assert
    the lab left nothing behind (:func:`assert_lab_gone`). Every lab tier fixture goes through
    this. ``up``'s stdout is kept in ``lab.up_stdout``; the processes found before ``down``
    (:func:`lab_pids`, plus ``extra_pids(lab)``) in ``lab.down_pids``, for further checks."""
    root_links = _root_links()
    pids: set[int] = set()
    try:
        lab.up_stdout = lab.lab("up", str(lab.topology), *up_args).stdout
        yield lab
    finally:
        with contextlib.suppress(Exception):
            pids = lab_pids(lab) | (extra_pids(lab) if extra_pids is not None else set())
        lab.down_pids = pids
        _save_logs(lab.name)
        lab.lab("down", check=False)
    assert_lab_gone(lab.name, pids, root_links)


#: A failed lab test's report gets, per log file of its lab, at most this many of the last
#: warning/error lines: what CI prints is often all anyone sees of a failure under load.
DIGEST_LINES = 12
_NOTEWORTHY = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|Error:")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach a digest of the lab's logs to a failed lab test's report (:func:`log_digest`)."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when != "call" or not rep.failed:
        return
    # By class name: pytest may load this file as a plugin under another module name than the
    # tests import it by (``tests.lab.conftest``), which makes two distinct Lab classes.
    labs = [v for v in getattr(item, "funcargs", {}).values() if any(c.__name__ == "Lab" for c in type(v).__mro__)]
    for lab in labs:
        rep.sections.append((f"lab {lab.name}: last warnings and errors per log", log_digest(lab.name)))


def log_digest(name: str) -> str:
    """The last :data:`DIGEST_LINES` noteworthy lines of each of lab ``name``'s process logs."""
    out = []
    for path in sorted((state_dir(name) / "logs").glob("*.log")):
        try:
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if _NOTEWORTHY.search(ln)]
        except OSError as e:
            lines = [f"(unreadable: {e})"]
        if lines:
            out.append(f"--- {path.name}")
            out.extend(ln[:300] for ln in lines[-DIGEST_LINES:])
    return "\n".join(out) or "(no warnings or errors logged)"


def _save_logs(name: str) -> None:
    """Copy the lab's process logs to ``$FABRIC_TEST_LAB_LOGS/<lab>`` (when set) before ``down``
    removes them: how a failure seen once under load can be read afterwards."""
    dest = os.environ.get("FABRIC_TEST_LAB_LOGS")
    if not dest:
        return
    with contextlib.suppress(OSError):
        shutil.copytree(state_dir(name) / "logs", Path(dest) / name, dirs_exist_ok=True)


KubeLabT = TypeVar("KubeLabT", bound=KubeLab)


@contextlib.contextmanager
def kube_lab_running(lab: KubeLabT, *up_args: str) -> Iterator[KubeLabT]:
    """:func:`lab_running` for a Kubernetes lab: its Kubernetes processes count among those that
    must be gone after ``down`` (:meth:`KubeLab.kube_pids`), and ``lab.kubeconfig`` is set."""
    with lab_running(lab, *up_args, extra_pids=lambda lb: lb.kube_pids()) as running:
        running.kubeconfig = Path(running.lab("kubeconfig").stdout.strip())
        yield running


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    up = ("--resync-period", str(RESYNC_S), "--grace-period", "30", "--timeout", "90")
    with lab_running(Lab(new_lab_name(), REPO / "examples" / "lab.yaml"), *up) as running:
        yield running


def _root_links() -> set[str]:
    return {ln.split(":")[1].strip().split("@")[0] for ln in run("ip", "-o", "link", "show").stdout.splitlines()}


def lab_pids(lab: Lab) -> set[int]:
    """Every process the lab says it runs (reflector and agents)."""
    st = lab.status()
    pids = {st["reflector"]["pid"]} | {n["agent_pid"] for n in lab.nodes().values()}
    return {int(p) for p in pids if p}


def alive(pid: int) -> bool:
    """Alive and not a zombie (an exited child waits for init to reap it; it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _processes_naming(text: str) -> list[str]:
    """``PID command line`` of every process whose command line contains ``text``."""
    return [f"{pid} {(nsutil.cmdline(pid) or '')[:160]}" for pid in nsutil.pids_naming(text)]


def lab_mounts(name: str) -> list[str]:
    """``type on mount point`` of every file system mounted under lab ``name``'s state directory
    (its bpf filesystem, its kubelets' tmpfs roots)."""
    prefix = f"/run/kosmos-fabric/lab/{name}/"
    with open("/proc/self/mounts") as f:
        rows = [line.split() for line in f]
    return [f"{r[2]} on {r[1]}" for r in rows if len(r) > 2 and (r[1] + "/").startswith(prefix)]


def assert_lab_gone(name: str, pids: set[int], root_links: set[str]) -> None:
    """``lab down`` left no namespace, process, pinned object or root-namespace link behind."""
    leftovers = [n for n in os.listdir("/run/netns") if n.startswith(name + "-")] if os.path.isdir("/run/netns") else []
    assert not leftovers, f"lab down left namespaces behind: {leftovers}"
    alive_pids = [p for p in pids if alive(p)]
    assert not alive_pids, f"lab down left processes running: {alive_pids}"
    # Also those started after the list above was taken (a kubelet restarting a container while
    # down ran): every process of the lab names its state directory on its command line.
    strays = _processes_naming(f"/run/kosmos-fabric/lab/{name}/")
    assert not strays, f"lab down left processes of the lab running: {strays}"
    assert not os.path.exists(f"/sys/fs/bpf/kosmos-fabric/{name}"), "lab down left pinned BPF objects"
    mounts = lab_mounts(name)
    assert not mounts, f"lab down left file systems mounted: {mounts}"
    assert _root_links() == root_links, "the lab changed the root namespace's links"
