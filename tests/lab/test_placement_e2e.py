"""Issue 19's lab acceptance, end to end: the root's ``kosmos-scheduler`` (``--reflector``,
``--fabric-cluster root``: :func:`tools.lab.schedulers.fabric_flags`) places by the tree manager's
per-leaf-node records (LeafNodeFit) and by the RTT the fabric's probes measure (NetworkAffinity).

The lab (module fixture, its own name; kept small for CI): host ``root`` (node r1), leaves
``leafa`` (``tree: cluster``, nodes a1 and a2 with 2 CPUs / 4Gi each: the virtual node
``kosmos-leafa`` advertises 4 CPUs) and ``leafb`` (``tree: cluster``, node b1 with 4 CPUs / 8Gi).

1. Never strand a pod. The issue's example is a leaf of 8 nodes with 2 free CPUs each (16 in
   total); the lab uses 2 such nodes (4 in total) to keep the lab light: the logic is the same,
   the sum (4) >= the request (3) > every node's free CPUs (2), so Kosmos' sum would bind the pod
   and the leaf could not run it. A 3-CPU pod for ``kosmos-leafa`` stays Pending with LeafNodeFit's
   reason in its PodScheduled condition and is never bound; a 2-CPU pod binds and runs in leafa.
2. Network-aware placement. A target pod runs in the root (r1, the root's own fabric cluster);
   a pod with ``kosmos.io/network-affinity`` naming it (score only, no ``maxRttMs``) and allowed
   only on the two leaves lands in the leaf with the lower RTT to the root; the delay is then
   moved to the other leaf and a second such pod lands in the first one.
3. A stranded pod is re-placed. Leaf users' pods hold hostPort 18080 on a1 and a2 (the leaf-
   resources records carry no ports, so the root cannot know). A one-replica Deployment
   ``mover`` (1 CPU, hostPort 18080, preferring leafa, allowed on both leaves) is bound to
   ``kosmos-leafa``; LeafNodeFit pins its copy to the leaf node it reserved (the root pod's
   ``kosmos.io/leaf-node``, the copy's required ``matchFields``); the leaf's scheduler cannot
   place it (ports), and after ``--stranded-after`` (the lab's default, 30 s) the tree manager
   creates the copy again without the pin (Event ``LeafNodeUnpinned``). The test then taints
   a1 and a2 NoSchedule (as an operator draining the leaf would): the unpinned copy stays
   Unschedulable, so after another ``--stranded-after`` the root pod is evicted (Event
   ``LeafCannotHostPod`` naming the leaf's message), the ReplicaSet makes a new pod, LeafNodeFit
   (the records carry the taints) keeps it off leafa, and it runs in leafb. The leaf is restored
   afterwards.

How the delay is made. The issue says netem in the lab underlay, but this machine's kernel has no
netem (``# CONFIG_NET_SCH_NETEM is not set`` in /proc/config.gz; ``tc qdisc add ... netem`` says
"Specified qdisc kind is unknown"), nor ``fq`` (no EDT delay from BPF either). So the test puts a
user-space delay line (:data:`DELAY_LINE`) into the lab's underlay, inside the lab namespace only:
each node of the delayed leaf has its underlay veth end (``ul_if``) taken off the bridge ``br-ul``
and a new veth pair ``dl*`` put in its place; one process (``ip netns exec <lab ns> python3``)
copies frames between the two, holding each frame the node sent for :data:`DELAY_S` (the reply
direction is not delayed: one delay per round trip). Every tunnel packet of those nodes (probes
included: ICMP echo through ``vx-bridge``, fabric/agent/probes.py) crosses it, so the agents' RTTs
and the reflector's ``fabric.kosmos.io/reachability`` records show the delay. Segmentation and
checksum offloads are turned off on every node's ``eth0`` and on ``br-ul`` (all within the lab;
they stay off until ``lab down``), so no frame larger than the MTU and none whose checksum is
left to an offload reaches a packet socket (the copy of such a frame arrives with a wrong
checksum and is dropped: the tunnels' outer UDP first, which cut the delayed leaf off in a first
try). Removing the delay puts ``ul_if`` back on the bridge and deletes the ``dl*`` pair; ``lab
down`` deletes the lab namespace with everything in it.

The two leaves are alike (4 CPUs, 8Gi each; the pods request 100m) so the other scores hardly
differ between them and NetworkAffinity (weight 2) decides; the second pod's leaf (leafa) is also
the one LeastAllocated slightly prefers after the first pod (100m on leafb), the first pod's is not.

Needs root (the lab) and kubectl.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.conftest import needs_kubectl
from tests.lab.tree_lab import TreeLab, topology, tree_lab_running
from tests.waiting import wait_until
from tools.lab.state import load_state

pytestmark = needs_kubectl

TOPOLOGY = topology("""\
      - name: leafa
        tree: cluster
        podCIDRs: [10.41.0.0/16]
        serviceCIDRs: [10.141.0.0/20]
        nodes:
          - {name: a1, pods: 0, resources: {cpu: "2", memory: 4Gi}}
          - {name: a2, pods: 0, resources: {cpu: "2", memory: 4Gi}}
      - name: leafb
        tree: cluster
        podCIDRs: [10.42.0.0/16]
        serviceCIDRs: [10.142.0.0/20]
        nodes: [{name: b1, pods: 0, resources: {cpu: "4", memory: 8Gi}}]
    """)

#: LeafNodeFit's Unschedulable reason (scheduler/plugins/kosmos_leaffit.py REASON).
LEAF_FIT_REASON = "node(s) had no leaf node with room for the pod"
#: One-way delay the delay line adds (well under the probes' 0.3 s detection time, so no probe
#: counts as lost, and far above the lab's sub-millisecond RTTs).
DELAY_S = 0.04
REACHABILITY = "fabric.kosmos.io/reachability"
BRIDGE = "br-ul"

#: The delay line: argv ``DELAY_S PORT:LINE ...``. Frames arriving on PORT (sent by the node) leave
#: on LINE after DELAY_S; frames arriving on LINE (from the bridge) leave on PORT at once.
DELAY_LINE = r"""
import collections, select, socket, sys, threading, time
delay = float(sys.argv[1])
pairs = [a.split(":") for a in sys.argv[2:]]
def sock(dev):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((dev, 0))
    return s
socks = {}
for port, line in pairs:
    p, l = sock(port), sock(line)
    socks[p.fileno()] = (p, l, True)
    socks[l.fileno()] = (l, p, False)
q = collections.deque()
cv = threading.Condition()
def sender():
    while True:
        with cv:
            while not q:
                cv.wait()
            due, out, frame = q[0]
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
            continue
        with cv:
            q.popleft()
        try:
            out.send(frame)
        except OSError:
            pass
threading.Thread(target=sender, daemon=True).start()
print("ready", flush=True)
while True:
    for fd in select.select(list(socks), [], [])[0]:
        s, out, delayed = socks[fd]
        frame, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        if delayed:
            with cv:
                q.append((time.monotonic() + delay, out, frame))
                cv.notify()
        else:
            try:
                out.send(frame)
            except OSError:
                pass
"""


@pytest.fixture(scope="module")
def tlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TreeLab]:
    with tree_lab_running(TreeLab, TOPOLOGY, tmp_path_factory.mktemp("place")) as running:
        yield running


# -- helpers -------------------------------------------------------------------------------------


def _pod(name: str, cpu: str, *, node_selector: dict[str, str] | None = None,
         clusters: list[str] | None = None, annotations: dict[str, str] | None = None) -> str:
    """A ``kosmos-scheduler`` pod requesting ``cpu`` that tolerates the virtual nodes' taint, kept
    to the leaf ``node_selector`` names or to the ``clusters`` (required node affinity)."""
    spec: dict[str, Any] = {
        "schedulerName": "kosmos-scheduler",
        "tolerations": [{"key": "kosmos.io/node", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "c", "image": "python:3", "command": ["sleep", "infinity"],
                        "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}],
    }
    if node_selector:
        spec["nodeSelector"] = node_selector
    if clusters:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kosmos.io/cluster", "operator": "In", "values": clusters}]}]}}}
    meta: dict[str, Any] = {"name": name, "namespace": "default", "annotations": annotations or {}}
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})


def _root_pod(tlab: TreeLab, name: str) -> dict[str, Any]:
    got: dict[str, Any] = tlab.get("root", "pod", name, "-n", "default")
    return got


def _condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def _rtts(tlab: TreeLab) -> dict[tuple[str, str], float | None]:
    """The reflector's reachability records: (source, target) -> rttMs (None: not measured)."""
    # ``records --lab`` lists as admin/lab (a reader/lab may read the status only).
    out = tlab.tool("records", "--lab", tlab.name, "--kind", REACHABILITY, "--json").stdout
    rtts: dict[tuple[str, str], float | None] = {}
    for r in json.loads(out)["records"]:
        doc = json.loads(r["text"])
        rtts[(doc["source"], doc["target"])] = doc.get("rttMs")
    return rtts


def _rtt_to_root(tlab: TreeLab, leaf: str) -> float | None:
    """The RTT NetworkAffinity uses for a pod near a target in the root, placed in ``leaf``: the
    leaf's own measurement, else the reverse one (README, "Network-aware placement")."""
    rtts = _rtts(tlab)
    mine = rtts.get((leaf, "root"))
    return mine if mine is not None else rtts.get(("root", leaf))


@contextlib.contextmanager
def _delayed(tlab: TreeLab, leaf: str) -> Iterator[None]:
    """Every node of ``leaf`` behind the delay line (module docstring) while the block runs."""
    state = load_state(tlab.name)
    assert state is not None, f"no state of lab {tlab.name}"
    ul = state.ul_netns
    nodes = [n for c in state.clusters if c.name == leaf for n in c.nodes]
    assert nodes, f"no nodes of {leaf} in lab {tlab.name}"

    def ip(*args: str) -> None:
        tlab.nsrun(ul, "ip", *args)

    # Whole frames with their checksums done: a frame a packet socket reads must be one the other
    # side can take as it is (every node's eth0, as any node may send to the delayed ones).
    tlab.nsrun(ul, "ethtool", "-K", BRIDGE, "tx", "off", "tso", "off", "gso", "off", check=False)
    for n in state.nodes():
        tlab.nsrun(n.netns, "ethtool", "-K", "eth0", "tx", "off", "tso", "off", "gso", "off", check=False)
    pairs: list[str] = []
    for i, n in enumerate(nodes):
        line, peer = f"dl{i}", f"dl{i}b"
        ip("link", "add", line, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "master", BRIDGE)
        for dev in (line, peer):
            ip("link", "set", dev, "up")
        tlab.nsrun(ul, "ethtool", "-K", line, "tx", "off", "tso", "off", "gso", "off", "gro", "off", check=False)
        tlab.nsrun(ul, "ethtool", "-K", n.ul_if, "gro", "off", check=False)
        pairs.append(f"{n.ul_if}:{line}")
    proc = subprocess.Popen(["ip", "netns", "exec", ul, sys.executable, "-c", DELAY_LINE, str(DELAY_S), *pairs],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "the delay line did not start"
        for n in nodes:  # the node's port leaves the bridge: its frames go through the line now
            ip("link", "set", n.ul_if, "nomaster")
        yield
    finally:
        for n in nodes:
            ip("link", "set", n.ul_if, "master", BRIDGE)
        proc.terminate()
        proc.wait(timeout=10)
        for i in range(len(nodes)):
            ip("link", "del", f"dl{i}")


def _wait_rtts(tlab: TreeLab, far: str, near: str) -> tuple[float, float]:
    """Wait until the records say ``far`` is at least half the delay from the root and ``near``
    less than that; returns their RTTs (ms)."""
    half_ms = DELAY_S * 1000 / 2

    def moved() -> tuple[float, float] | None:
        f, n = _rtt_to_root(tlab, far), _rtt_to_root(tlab, near)
        return (f, n) if f is not None and n is not None and f >= half_ms > n else None

    return wait_until(moved, 90, f"reachability records: {far} >= {half_ms} ms from root, {near} below")


def _bound_to(tlab: TreeLab, name: str) -> str:
    return wait_until(lambda: _root_pod(tlab, name)["spec"].get("nodeName"), 60, f"pod {name} bound")


# -- tests ---------------------------------------------------------------------------------------


def test_a_pod_no_leaf_node_can_host_is_never_bound_to_the_leaf(tlab: TreeLab) -> None:
    wait_until(lambda: "kosmos-leafa" in tlab.host_nodes() or None, 60, "the virtual node kosmos-leafa")
    vn = tlab.host_nodes()["kosmos-leafa"]
    assert vn["status"]["allocatable"]["cpu"] == "4", vn["status"]["allocatable"]  # the sum would take 3
    only_a = {"kosmos.io/cluster": "leafa"}
    tlab.apply("root", _pod("big", "3", node_selector=only_a))

    def rejected() -> dict[str, Any] | None:
        cond = _condition(_root_pod(tlab, "big"), "PodScheduled")
        return cond if cond is not None and cond.get("status") == "False" else None

    cond = wait_until(rejected, 60, "pod big's PodScheduled=False")
    assert cond.get("reason") == "Unschedulable" and LEAF_FIT_REASON in cond.get("message", ""), cond
    tlab.apply("root", _pod("fits", "2", node_selector=only_a))
    assert _bound_to(tlab, "fits") == "kosmos-leafa"
    wait_until(lambda: (_root_pod(tlab, "fits").get("status") or {}).get("phase") == "Running" or None, 90,
               "pod fits Running (in leafa)")
    leaf_pods = tlab.get("leafa", "pods", "-A")["items"]
    assert [p["spec"].get("nodeName") for p in leaf_pods if p["metadata"]["name"].startswith("fits")] != [], leaf_pods
    big = _root_pod(tlab, "big")
    assert not big["spec"].get("nodeName") and big["status"].get("phase") == "Pending", big
    assert LEAF_FIT_REASON in (_condition(big, "PodScheduled") or {}).get("message", "")
    for name in ("big", "fits"):
        tlab.kubectl("root", "delete", "pod", name, "-n", "default", "--wait=false")


def test_a_network_affinity_pod_follows_the_lower_rtt(tlab: TreeLab) -> None:
    target = {"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "target", "namespace": "default", "labels": {"app": "target"}},
              "spec": {"nodeName": "r1", "containers": [{"name": "c", "image": "python:3",
                                                          "command": ["sleep", "infinity"]}]}}
    tlab.apply("root", json.dumps(target))
    near = json.dumps({"podSelector": {"matchLabels": {"app": "target"}}, "weight": 100})
    ann = {"kosmos.io/network-affinity": near}
    placed: dict[str, str] = {}
    for far, other, pod in (("leafa", "leafb", "near-1"), ("leafb", "leafa", "near-2")):
        with _delayed(tlab, far):
            rtt_far, rtt_near = _wait_rtts(tlab, far, other)
            print(f"{far}: {rtt_far} ms to root, {other}: {rtt_near} ms")
            time.sleep(2)  # the scheduler's own watch of the records trails fabric-tool's read a little
            tlab.apply("root", _pod(pod, "100m", clusters=["leafa", "leafb"], annotations=ann))
            placed[pod] = _bound_to(tlab, pod)
    assert placed == {"near-1": "kosmos-leafb", "near-2": "kosmos-leafa"}, placed


#: The host port the leaf users' pods hold on leafa's nodes (test 3).
HOST_PORT = 18080
#: The tree manager's Event reasons (tree/podsync.py REASON_UNPINNED, REASON_STRANDED).
LEAF_NODE_UNPINNED = "LeafNodeUnpinned"
LEAF_CANNOT_HOST = "LeafCannotHostPod"


def _blocker(node: str) -> str:
    """A leafa user's pod on ``node`` holding :data:`HOST_PORT` (bound by nodeName: no scheduler)."""
    return json.dumps({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": f"port-{node}", "namespace": "default"},
                       "spec": {"nodeName": node, "containers": [{
                           "name": "c", "image": "python:3", "command": ["sleep", "infinity"],
                           "ports": [{"containerPort": HOST_PORT, "hostPort": HOST_PORT}],
                           "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}})


def _mover() -> str:
    """The Deployment of test 3: 1 CPU and :data:`HOST_PORT`, leafa preferred, both leaves allowed."""
    template = json.loads(_pod("mover", "1", clusters=["leafa", "leafb"]))
    template = {"metadata": {"labels": {"app": "mover"}}, "spec": template["spec"]}
    spec = template["spec"]
    spec["containers"][0]["ports"] = [{"containerPort": HOST_PORT, "hostPort": HOST_PORT}]
    spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] = [
        {"weight": 100, "preference": {"matchExpressions": [
            {"key": "kosmos.io/cluster", "operator": "In", "values": ["leafa"]}]}}]
    spec["terminationGracePeriodSeconds"] = 1
    return json.dumps({"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": "mover", "namespace": "default"},
                       "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "mover"}},
                                "template": template}})


def _movers(tlab: TreeLab) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = tlab.get("root", "pods", "-n", "default", "-l", "app=mover")["items"]
    return items


def _leaf_copies(tlab: TreeLab, leaf: str, root_uid: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = tlab.get(leaf, "pods", "-A", "-l", f"kosmos.io/root-uid={root_uid}")["items"]
    return items


def _reasons(tlab: TreeLab, uid: str) -> dict[str, str]:
    """The root Events about pod ``uid``: reason -> message."""
    items = tlab.get("root", "events", "-n", "default")["items"]
    return {e["reason"]: e.get("message", "") for e in items if e["involvedObject"].get("uid") == uid}


def test_a_stranded_pod_is_unpinned_then_evicted_and_runs_elsewhere(tlab: TreeLab) -> None:
    for node in ("a1", "a2"):
        tlab.apply("leafa", _blocker(node))
    tlab.apply("root", _mover())
    first = wait_until(lambda: next((p for p in _movers(tlab) if p["spec"].get("nodeName")), None), 60,
                       "the mover pod bound")
    uid = first["metadata"]["uid"]
    assert first["spec"]["nodeName"] == "kosmos-leafa", first["spec"]
    pin = (first["metadata"].get("annotations") or {}).get("kosmos.io/leaf-node")
    assert pin in ("a1", "a2"), first["metadata"]  # LeafNodeFit's PreBind: the reserved leaf node
    copy = wait_until(lambda: next(iter(_leaf_copies(tlab, "leafa", uid)), None), 60, "the pinned leaf copy")
    terms = copy["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert all({"key": "metadata.name", "operator": "In", "values": [pin]} in t.get("matchFields", [])
               for t in terms), terms
    # ports taken: the leaf cannot place it; after --stranded-after it is created again, unpinned
    unpinned = wait_until(lambda: next((c for c in _leaf_copies(tlab, "leafa", uid)
                                        if c["metadata"]["uid"] != copy["metadata"]["uid"]), None), 120,
                          "the copy created again without its pin")
    assert "kosmos.io/pinned-leaf-node" not in (unpinned["metadata"].get("annotations") or {}), unpinned
    reasons = wait_until(lambda: (r := _reasons(tlab, uid)) and LEAF_NODE_UNPINNED in r and r, 30,
                         "the LeafNodeUnpinned Event")
    assert f"leaf node {pin}" in reasons[LEAF_NODE_UNPINNED] and "ports" in reasons[LEAF_NODE_UNPINNED], reasons
    tlab.kubectl("leafa", "taint", "nodes", "a1", "a2", "drain=now:NoSchedule")
    try:
        # still Unschedulable: evicted after another --stranded-after; the next pod runs in leafb
        def moved() -> dict[str, Any] | None:
            return next((p for p in _movers(tlab) if p["metadata"]["uid"] != uid and
                         p["spec"].get("nodeName") and (p.get("status") or {}).get("phase") == "Running"), None)

        second = wait_until(moved, 150, "the Deployment's next pod Running elsewhere")
        assert second["spec"]["nodeName"] == "kosmos-leafb", second["spec"]
        reasons = _reasons(tlab, uid)
        assert LEAF_CANNOT_HOST in reasons and "leafa" in reasons[LEAF_CANNOT_HOST], reasons
        assert "ReplicaSet" in reasons[LEAF_CANNOT_HOST], reasons
        assert [c for c in _leaf_copies(tlab, "leafb", second["metadata"]["uid"])
                if c["spec"].get("nodeName") == "b1"], "the new pod's copy runs on b1"
        wait_until(lambda: not _leaf_copies(tlab, "leafa", uid) or None, 60, "the stranded copy gone from leafa")
    finally:
        tlab.kubectl("root", "delete", "deployment", "mover", "-n", "default", "--wait=false", check=False)
        tlab.kubectl("leafa", "taint", "nodes", "a1", "a2", "drain-", check=False)
        for node in ("a1", "a2"):
            tlab.kubectl("leafa", "delete", "pod", f"port-{node}", "-n", "default", "--wait=false", check=False)

