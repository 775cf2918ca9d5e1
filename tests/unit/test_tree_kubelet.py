"""``kubectl logs`` and ``kubectl exec`` on a root pod reach its leaf copy through the virtual node.

In-process: a root and a leaf API server (kubeemu, :mod:`tests.tree_env`), the tree manager with
its kubelet server (:mod:`tree.kubelet`) on 127.0.0.1, and in the leaf a node whose kubelet is
kubeemu's kubelet app over a fake container runtime (:class:`tests.kubelet_doubles.FakeAccess`:
CRI log files this test writes, commands run on the host). The pod sync is not part of this
test: the leaf copy of a root pod is made here as the contract says (labels root-cluster and
root-uid, another name than the root pod's). The real kubectl talks to the root API server,
which dials the virtual node's kubelet endpoint (the one the manager advertises), which calls
the leaf's API server, which dials the leaf node's kubelet: every byte kubectl prints came
through all of them.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeemu.lab import write_kubeconfig
from scheduler.kube import Api, resource_path
from tests.kubelet_doubles import (
    KUBECTL,
    FakeAccess,
    Kubectl,
    exec_ends_with_kubectl,
    logs_follow_until_stopped,
    serve_kubelet,
    stop_kubelet,
)
from tests.tree_env import REPO, ROOT_ID, TreeEnv, tree_env
from tests.waiting import wait_until
from tree import identity
from tree.kubelet import KubeletServer, PodResolver
from tree.leaf import Options
from tree.manager import TreeManager

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
VNODE = "kosmos-c1"


@dataclass
class Tree:
    env: TreeEnv
    manager: TreeManager
    server: KubeletServer
    access: FakeAccess
    leaf: Api
    kubectl: Kubectl


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    if KUBECTL is None:
        pytest.skip("no kubectl binary on PATH (install one from Debian to run this test)")
    with tree_env() as env:
        leaf = env.leaf("l1")
        loop = env.leaves["l1"].loop
        access = FakeAccess(tmp_path / "kubelet")
        port, runner = serve_kubelet(access, loop)
        env.add_node("l1", "ln1")
        env.patch_node("l1", "ln1", {"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}}, status=True)
        resolvers: list[PodResolver] = []
        server = KubeletServer(lambda ns, name: resolvers[0](ns, name), "127.0.0.1", 0, timeout=5.0)
        opts = Options(root_id=ROOT_ID, leaf_timeout=0.5, unreachable_after=1.0, lease_period=0.2,
                       status_period=60.0, resync_period=1.0, root_timeout=5.0,
                       kubelet_address="127.0.0.1", kubelet_port=server.port)
        # the tests make the leaf copies themselves (renamed, another root's...): no pod sync here
        manager = env.start_manager(options=opts, sync_pods=False)
        resolvers.append(PodResolver(Api(env.root.host), ROOT_ID, manager.nodes, manager.leaf_api, timeout=5.0))
        server.start()
        env.add_cluster("c1", "l1")
        wait_until(lambda: _kubelet_port(env.vnode(VNODE)) == server.port, 10,
                   "the virtual node advertises the kubelet server")
        kubectl = Kubectl(KUBECTL, write_kubeconfig(tmp_path / "kubeconfig", {"root": env.root.host}),
                          tmp_path / "cache")
        try:
            yield Tree(env, manager, server, access, leaf, kubectl)
        finally:
            server.stop()
            stop_kubelet(runner, loop)


def _kubelet_port(node: Obj | None) -> int | None:
    port = (((node or {}).get("status") or {}).get("daemonEndpoints") or {}).get("kubeletEndpoint", {}).get("Port")
    return int(port) if port else None


def _namespace(t: Tree) -> str:
    ns = f"t-{uuid.uuid4().hex[:6]}"
    for api in (t.env.root, t.leaf):
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    return ns


def _root_pod(t: Tree, ns: str, name: str, *containers: str) -> Obj:
    """A root pod bound to the virtual node."""
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": VNODE, "containers": [{"name": c, "image": "busybox"} for c in containers]}}
    pod: Obj = t.env.root.create(resource_path("v1", "pods", ns), body)
    return pod


def _leaf_copy(t: Tree, root_pod: Obj, leaf_name: str) -> None:
    """The leaf copy as the pod sync makes it (its name need not be the root pod's)."""
    labels, annotations = identity.ownership(ROOT_ID, root_pod)
    spec = {**root_pod["spec"], "nodeName": "ln1"}
    t.leaf.create(resource_path("v1", "pods", root_pod["metadata"]["namespace"]), {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": leaf_name, "labels": labels, "annotations": annotations}, "spec": spec})


def _running_copy(t: Tree, name: str, leaf_name: str | None = None) -> str:
    """A new namespace (returned) with a root pod ``name`` (container ``c``) and its leaf copy
    ``leaf_name`` (default: the same name), the copy's container running."""
    ns = _namespace(t)
    _leaf_copy(t, _root_pod(t, ns, name, "c"), leaf_name or name)
    t.access.state[(ns, leaf_name or name, "c")] = "running"
    return ns


def test_logs_reach_the_leaf_copy_with_their_options(tree: Tree) -> None:
    ns = _namespace(tree)
    pod = _root_pod(tree, ns, "web", "app", "side")
    _leaf_copy(tree, pod, "web-0ab1c2d3")
    for c in ("app", "side"):
        tree.access.state[(ns, "web-0ab1c2d3", c)] = "running"
    tree.access.write(ns, "web-0ab1c2d3", "app", "stdout F one", "stderr F two", "stdout P thr", "stdout F ee",
                      "stdout F four")
    tree.access.write(ns, "web-0ab1c2d3", "side", "stdout F from the side")
    k = tree.kubectl
    assert k("logs", "web", "-n", ns, "-c", "app").stdout == "one\ntwo\nthree\nfour\n"
    assert k("logs", "web", "-n", ns, "-c", "app", "--tail=2").stdout == "ee\nfour\n"
    assert k("logs", "web", "-n", ns, "-c", "app", "--timestamps", "--tail=1").stdout == \
        "2024-01-02T03:04:09.12Z four\n"
    assert k("logs", "web", "-n", ns, "-c", "app", "--limit-bytes=6").stdout == "one\ntw"
    assert k("logs", "web", "-n", ns, "-c", "side").stdout == "from the side\n"
    # previous: the leaf kubelet's own error comes back through every hop, then the old attempt
    err = k("logs", "web", "-n", ns, "-c", "side", "--previous", ok=False)
    assert err.returncode == 1
    assert 'previous terminated container "side" in pod "web-0ab1c2d3" not found' in err.stderr
    tree.access.attempt[(ns, "web-0ab1c2d3", "side")] = 1
    tree.access.write(ns, "web-0ab1c2d3", "side", "stdout F second life")
    assert k("logs", "web", "-n", ns, "-c", "side", "--previous").stdout == "from the side\n"
    assert k("logs", "web", "-n", ns, "-c", "side").stdout == "second life\n"


def test_logs_follow_streams_through_until_the_leaf_container_stops(tree: Tree, tmp_path: Path) -> None:
    ns = _running_copy(tree, "f")
    tree.access.write(ns, "f", "c", "stdout F first")
    logs_follow_until_stopped(tree.kubectl.argv("logs", "-f", "f", "-n", ns), tree.access, ns, "f", "c",
                              tmp_path / "follow.out")


def test_exec_output_exit_code_and_stdin_reach_the_leaf(tree: Tree) -> None:
    ns = _running_copy(tree, "e", "e-renamed")
    k = tree.kubectl
    out = k("exec", "e", "-n", ns, "--", "echo", "hello", "world", ok=False)
    assert (out.returncode, out.stdout) == (0, "hello world\n"), out.stderr
    out = k("exec", "e", "-n", ns, "--", "sh", "-c", "echo out; echo err >&2; exit 3", ok=False)
    assert out.returncode == 3 and out.stdout == "out\n"
    assert "err\n" in out.stderr and "command terminated with exit code 3" in out.stderr
    out = k("exec", "-i", "e", "-n", ns, "--", "cat", stdin="hi\nthere\n", ok=False)
    assert (out.returncode, out.stdout) == (0, "hi\nthere\n"), out.stderr
    big = "x" * 300_000 + "\n"
    out = k("exec", "-i", "e", "-n", ns, "--", "wc", "-c", stdin=big, ok=False)
    assert out.stdout.strip() == str(len(big)), out.stderr
    # the leaf refuses (its container does not run): its reason comes back
    tree.access.state[(ns, "e-renamed", "c")] = "waiting"
    out = k("exec", "e", "-n", ns, "--", "true", ok=False)
    assert out.returncode == 1 and 'container not found ("c")' in out.stderr


def test_a_pod_without_a_leaf_copy_gets_a_clear_error(tree: Tree) -> None:
    ns = _namespace(tree)
    _root_pod(tree, ns, "lonely", "c")
    out = tree.kubectl("logs", "lonely", "-n", ns, ok=False)
    assert out.returncode == 1 and f"pod {ns}/lonely has no copy in leaf cluster c1" in out.stderr, out.stderr
    out = tree.kubectl("exec", "lonely", "-n", ns, "--", "true", ok=False)
    assert out.returncode == 1 and f"pod {ns}/lonely has no copy in leaf cluster c1" in out.stderr, out.stderr
    # a copy of another root (same labels but another root id) is not ours
    pod = tree.env.root.get(resource_path("v1", "pods", ns, "lonely"))
    labels, _ = identity.ownership("another-root", pod)
    tree.leaf.create(resource_path("v1", "pods", ns), {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "lonely", "labels": labels},
        "spec": {"nodeName": "ln1", "containers": [{"name": "c", "image": "busybox"}]}})
    tree.access.state[(ns, "lonely", "c")] = "running"
    out = tree.kubectl("exec", "lonely", "-n", ns, "--", "true", ok=False)
    assert out.returncode == 1 and "has no copy in leaf cluster c1" in out.stderr, out.stderr


def test_healthz_and_unknown_paths(tree: Tree) -> None:
    api = Api(tree.server.url)
    assert api._pool.request("GET", tree.server.url + "/healthz").data == b"ok"
    r = api._pool.request("GET", tree.server.url + "/pods")
    assert r.status == 404


def test_a_pod_the_root_does_not_have_is_not_found(tree: Tree) -> None:
    api = Api(tree.server.url)
    r = api._pool.request("GET", tree.server.url + "/containerLogs/default/nowhere/c")
    assert (r.status, r.data) == (404, b'pods "nowhere" not found')


def test_callers_going_away_end_the_leaf_stream_and_the_leaf_command(tree: Tree, tmp_path: Path) -> None:
    ns = _running_copy(tree, "quiet")
    tree.access.write(ns, "quiet", "c", "stdout F hello")
    # A followed log of a quiet container, asked as the root API server asks (kubeemu's keeps its
    # side open until it has something to write, so the caller here is a plain connection).
    with socket.create_connection(("127.0.0.1", tree.server.port), timeout=10) as caller:
        caller.sendall(f"GET /containerLogs/{ns}/quiet/c?follow=true HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = b""
        while b"hello" not in got:
            chunk = caller.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200") and tree.server._streams
    # the log is quiet: only the caller's end can tell the server to let go of the leaf stream
    wait_until(lambda: not tree.server._streams, 30, "the leaf log stream cut once its caller went away")
    tree.access.write(ns, "quiet", "c", "stdout F after")  # the leaf's kubelet notices on its next write
    pid_file = tmp_path / "pid"
    exec_ends_with_kubectl(tree.kubectl.argv("exec", "quiet", "-n", ns, "--", "sh", "-c",
                                             f"echo $$ > {pid_file}; exec sleep 600"), pid_file, "the leaf command")
    tree.access.state[(ns, "quiet", "c")] = "exited"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kosmos_tree_serves_the_kubelet_its_virtual_nodes_advertise(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tree.main", *args], capture_output=True, text=True,
                              timeout=60, cwd=REPO, check=False)
    bad = run("--master", "http://127.0.0.1:1", "--kubelet-client-ca", "ca.crt")
    assert bad.returncode == 2 and "--kubelet-client-ca needs them" in bad.stderr
    with tree_env() as env:
        env.add_node("l1", "ln1")
        env.add_cluster("c1", "l1")
        port = _free_port()
        log = (tmp_path / "tree.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "tree.main", "--master", env.root.host, "--leader-elect=false",
                                 "--root-id", ROOT_ID, "--listen", "127.0.0.1:0", "--kubelet-port", str(port),
                                 "--node-lease-period", "0.2", "--resync-period", "1"],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            node = wait_until(lambda: (n := env.vnode(VNODE)) is not None and _kubelet_port(n) == port and n, 30,
                              f"{VNODE} advertising the kubelet port {port}")
            assert node["status"]["addresses"] == [{"type": "InternalIP", "address": "127.0.0.1"}]
            assert Api(f"http://127.0.0.1:{port}")._pool.request(
                "GET", f"http://127.0.0.1:{port}/healthz").data == b"ok"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        assert proc.returncode == 0, (tmp_path / "tree.log").read_text()[-2000:]
