"""The lab's own plumbing on a real kernel, without the fabric's processes.

A lab built with ``start_processes=False`` has namespaces, the underlay bridge, pod veths and
the intra-cluster host-gw routes, but nothing between clusters: so pods of one cluster reach
each other (through the node or across the underlay) and pods of different clusters must not.
``down`` must leave no namespace and no process behind, with or without its state file.
Every test uses its own lab name (``kft`` + hex) and tears down in a finally.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric import netns as namespaces
from tools import lab, nsutil
from tools.diagnose import check

TOPO = """\
underlay: 198.18.0.0/24
clusters:
  - name: east
    podCIDRs: [10.10.0.0/16]
    nodes:
      - {name: e1, pods: 2}
      - {name: e2, pods: 1}
  - name: west
    podCIDRs: [10.20.0.0/16]
    nodes:
      - {name: w1, pods: 1}
"""


def _quiet(msg: str) -> None:
    pass


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = "kft" + uuid.uuid4().hex[:8]
    try:
        yield name
    finally:
        lab.down(name, progress=_quiet)
        assert not [ns for ns in namespaces.list_all() if ns.startswith(f"{name}-")]


def _write(tmp_path: Path, text: str, fname: str = "topo.yaml") -> Path:
    p = tmp_path / fname
    p.write_text(text)
    return p


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _routes(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "route", "show"], capture_output=True, text=True, check=True).stdout
    return {" ".join(line.split()) for line in out.splitlines()}


def test_plumbing_connects_pods_inside_a_cluster_only(tmp_path: Path, lab_name: str) -> None:
    before = _root_links()
    st = lab.up(_write(tmp_path, TOPO), lab_name, start_processes=False, progress=_quiet)
    assert _root_links() == before, "the lab must not create anything in the root namespace"

    expected = {f"{lab_name}-ul", f"{lab_name}-east-e1", f"{lab_name}-east-e2", f"{lab_name}-west-w1",
                f"{lab_name}-east-e1-p0", f"{lab_name}-east-e1-p1", f"{lab_name}-east-e2-p0",
                f"{lab_name}-west-w1-p0"}  # fmt: skip
    assert {ns for ns in namespaces.list_all() if ns.startswith(f"{lab_name}-")} == expected
    e1 = _routes(f"{lab_name}-east-e1")
    assert "10.10.1.0/24 via 198.18.0.12 dev eth0" in e1  # host-gw to e2
    assert "10.10.0.2 dev veth-p0 scope link" in e1
    assert not any(r.startswith("10.20.") for r in e1), "cross-cluster routes are the fabric's job"
    assert "default via 169.254.1.1 dev eth0" in _routes(f"{lab_name}-east-e1-p0")

    result = check.run(check.pods_of(st), timeout_s=1.0)
    assert len(result.pairs) == 4 * 3
    for p in result.pairs:
        same_cluster = p.src.split("/")[0] == p.dst.split("/")[0]
        assert p.ok == same_cluster, p
    assert result.passed == 6 and not result.ok
    assert result.elapsed_s < 10, "workers must run in parallel"

    # A second `up` of the same file changes nothing: same namespaces (same inodes), same state.
    inodes = {ns: namespaces.inode(ns) for ns in expected}
    state_before = lab.state_file(lab_name).read_text()
    lab.up(_write(tmp_path, TOPO), lab_name, start_processes=False, progress=_quiet)
    assert {ns: namespaces.inode(ns) for ns in expected} == inodes
    assert lab.state_file(lab_name).read_text() == state_before

    lab.down(lab_name, progress=_quiet)
    assert not [ns for ns in namespaces.list_all() if ns.startswith(f"{lab_name}-")]
    assert not lab.state_dir(lab_name).exists()
    assert not (lab.LAB_ROOT / f".{lab_name}.lock").exists()
    assert lab.down(lab_name, progress=_quiet) is False  # idempotent


def test_up_with_a_larger_file_adds_a_node_and_refuses_removals(tmp_path: Path, lab_name: str) -> None:
    lab.up(_write(tmp_path, TOPO), lab_name, start_processes=False, progress=_quiet)
    e1_ns = namespaces.inode(f"{lab_name}-east-e1")
    bigger = TOPO.replace("      - {name: e2, pods: 1}\n", "      - {name: e2, pods: 1}\n      - {name: e3, pods: 1}\n")
    st = lab.up(_write(tmp_path, bigger, "big.yaml"), lab_name, start_processes=False, progress=_quiet)
    e3 = st.node("east/e3")
    assert e3 is not None and e3.underlay_ip == "198.18.0.14"  # w1 kept .13
    assert namespaces.inode(f"{lab_name}-east-e1") == e1_ns, "existing nodes are left untouched"
    assert f"{e3.pod_cidr} via 198.18.0.14 dev eth0" in _routes(f"{lab_name}-east-e1")
    assert "10.10.0.0/24 via 198.18.0.11 dev eth0" in _routes(f"{lab_name}-east-e3")
    result = check.run([p for p in check.pods_of(st) if p.cluster == "east"], timeout_s=1.0)
    assert result.ok, [p for p in result.pairs if not p.ok]

    with pytest.raises(lab.LabUsageError, match="node east/e3 removed"):
        lab.up(_write(tmp_path, TOPO), lab_name, start_processes=False, progress=_quiet)
    assert namespaces.exists(f"{lab_name}-east-e3"), "a refused up changes nothing"


def test_down_after_a_crash_finds_namespaces_and_processes_without_state(tmp_path: Path, lab_name: str) -> None:
    st = lab.up(_write(tmp_path, TOPO), lab_name, start_processes=False, progress=_quiet)
    node = st.node("west/w1")
    assert node is not None
    # A stand-in for an agent, started the way the lab starts one.
    proc = nsutil.spawn_in_netns(node.netns, ["sleep", "300"])
    try:
        assert nsutil.pid_netns_inode(proc.pid) == namespaces.inode(node.netns)
        assert nsutil.pid_netns_inode(proc.pid) != nsutil.pid_netns_inode(os.getpid())
        lab.state_file(lab_name).unlink()  # the crash: no record of anything
        t0 = time.monotonic()
        assert lab.down(lab_name, progress=_quiet) is True
        assert proc.wait(timeout=5) is not None
        assert time.monotonic() - t0 < 5
        assert not [ns for ns in namespaces.list_all() if ns.startswith(f"{lab_name}-")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_corrupt_state_does_not_stop_down(tmp_path: Path, lab_name: str) -> None:
    lab.up(_write(tmp_path, TOPO), lab_name, start_processes=False, progress=_quiet)
    lab.state_file(lab_name).write_text("{garbage")
    with pytest.raises(lab.LabError, match="not valid JSON"):
        lab.up(_write(tmp_path, TOPO), lab_name, start_processes=False, progress=_quiet)
    assert lab.down(lab_name, progress=_quiet) is True
    assert not [ns for ns in namespaces.list_all() if ns.startswith(f"{lab_name}-")]


def test_terminate_never_signals_a_reused_pid(lab_name: str) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nsutil.spawn_in_netns(f"{lab_name}-absent", ["true"])
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        started = nsutil.start_time(sleeper.pid)
        assert started is not None
        assert nsutil.terminate([(sleeper.pid, started + 1)]) == []  # start time differs: not ours
        assert sleeper.poll() is None
        assert nsutil.terminate([(sleeper.pid, started)], grace_s=2) == [sleeper.pid]
        assert sleeper.wait(timeout=5) == -15
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


#: A stand-in for a kubelet's shim spawner with a request in flight: its command line names the
#: lab's state directory, and SIGTERM makes it fork one more process (which names it too) before
#: it exits, as a spawner's middle child forks its shim after the spawner is gone.
FORKS_AT_SIGTERM = """
import os, signal, sys, time
def term(*_):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(300)
        os._exit(0)
    with open(sys.argv[2], "w") as f:
        f.write(str(pid))
    os._exit(0)
signal.signal(signal.SIGTERM, term)
print("ready", flush=True)
time.sleep(300)
"""


def test_down_stops_processes_forked_while_it_runs(tmp_path: Path, lab_name: str) -> None:
    """A process of the lab that appears after ``down`` listed the processes is stopped too."""
    late = tmp_path / "late.pid"
    sock = f"{lab.state_dir(lab_name)}/kubelet-east/spawner.sock"
    argv = [sys.executable, "-c", FORKS_AT_SIGTERM, sock, str(late)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        assert lab.down(lab_name, progress=_quiet) is True
        assert proc.wait(timeout=10) == 0
        child = int(late.read_text())  # the fork really happened, after the first sweep's list
        assert not nsutil.alive(child), "down left the process forked while it ran"
        assert nsutil.pids_naming(f"{lab.state_dir(lab_name)}/") == []
    finally:
        for pid in (proc.pid, child):
            if pid and nsutil.alive(pid):
                os.kill(pid, 9)
        proc.wait()


def test_a_pod_made_again_at_once_under_its_name_gets_its_veth(tmp_path: Path, lab_name: str) -> None:
    """A pod removed and made again under the same name at once (a replacement, the tree
    repairing a leaf copy): the kernel destroys a deleted namespace's devices later, so the
    node's end of the old veth must be gone when remove_pod returns, and a leftover one (a
    namespace deleted by other means) must not make the new veth fail with "File exists"."""
    st = lab.up(_write(tmp_path, TOPO), lab_name, start_processes=False, progress=_quiet)
    node = next(n for c in st.clusters for n in c.nodes if c.name == "east")
    pod = lab.kube_pod(node, "default/web-1", (node.pod_cidr.rsplit(".", 2)[0] + ".200.9",))
    for _ in range(3):
        lab.add_pod(node, pod)
        assert lab.remove_pod(node, pod)
        assert subprocess.run(["ip", "-n", node.netns, "link", "show", "dev", pod.host_if],
                              capture_output=True, check=False).returncode != 0  # fmt: skip
    # A leftover node-side device of that name (a veth whose other end stayed on the node too),
    # its pod namespace gone: add_pod replaces it with the pod's own veth.
    subprocess.run(["ip", "-n", node.netns, "link", "add", pod.host_if, "type", "veth", "peer", "name", "kftleft0"],
                   check=True)  # fmt: skip
    lab.add_pod(node, pod)
    links = subprocess.run(["ip", "-n", node.netns, "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    assert "kftleft0" not in links and f" {pod.host_if}@" in links, links
    assert subprocess.run(["ip", "-n", pod.netns, "link", "show", "dev", "eth0"], capture_output=True,
                          check=False).returncode == 0  # fmt: skip
    assert lab.remove_pod(node, pod) and not namespaces.exists(pod.netns)
