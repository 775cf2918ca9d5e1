"""Issue 17's acceptance, state and failures, end to end in a lab: a StatefulSet with claims over
two leaves, the tree manager killed while pods churn, a leaf's API server unreachable.

The lab (module fixture, its own name): host ``root`` (node r1) and two leaves joined in
cluster mode, ``leafa`` (node a1) and ``leafb`` (node b1): virtual nodes ``kosmos-leafa`` and
``kosmos-leafb``. ``lab-local`` (WaitForFirstConsumer) is every cluster's default StorageClass.
Tests run in file order, each leaving the lab as it found it:

1. A root StatefulSet ``db`` (2 replicas, one per leaf: anti-affinity over ``kosmos.io/cluster``;
   a claim from its volumeClaimTemplate): each pod runs in its leaf and writes into its volume;
   the root claim is Bound to the root mirror of the leaf's PV (node affinity to the virtual node);
   a deleted pod comes back with the same name and claim on the same leaf and reads what its
   predecessor wrote; a larger request on the root claim reaches the leaf claim and its PV.
2. Crash consistency: Deployment ``steady`` (a fifth of the pods, never scaled) beside
   Deployment ``churn`` scaled up and down (both together ``TREE_CHURN_PODS`` at the peak,
   default 100: the lab starts that many in seconds on the two-core CI; 200 is the issue's
   figure, for a manual run) while ``kosmos-tree`` is SIGKILLed (its PID from ``lab status``;
   the lab's supervisor restarts it, and the next one waits for the dead one's Lease to lapse)
   ``TREE_CHURN_KILLS`` times (default 3), each at a random moment (``TREE_CHURN_SEED`` replays
   one) while it works through a scale step. Then every root pod has exactly one leaf copy, in
   the leaf of its virtual node, under its own name; no leaf copy of ours lacks its root pod;
   the steady pods kept their leaf pods (same leaf UIDs) and no leaf container ever restarted.
3. Leaf ``leafb``'s API server SIGSTOPped (its PID from ``lab status``; not killed) for
   ``TREE_OUTAGE_SECONDS`` (default 75: the tree manager's threshold, 40 s, plus a probe period
   and a probe timeout, 10 s each, plus a margin: the shortest that shows the node turn NotReady;
   ``TREE_OUTAGE_SECONDS=120`` runs the issue's 2 minutes): ``kosmos-leafb`` turns Ready=False,
   reason ``LeafUnreachable``, within the threshold plus a probe period and timeout, while
   ``kosmos-leafa`` stays Ready and takes a new pod; no root pod on ``kosmos-leafb`` is deleted,
   evicted or changed by us for the whole outage. The lab's root runs no node lifecycle
   controller (kubeemu's controller-manager has none), so no NoExecute taint is put on the
   NotReady node and nothing evicts; upstream's would taint it ``node.kubernetes.io/not-ready``
   and evict after the pods' default 300 s toleration, which is not us and is longer than 2
   minutes. After SIGCONT, the node is Ready again and a leaf-side status change (a container
   restart in the leaf) shows in the root pod within 30 s.

Needs root (the lab) and kubectl.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import needs_kubectl
from tests.lab.tree_lab import TreeLab, lease_holder, node_ready, topology, tree_lab_running
from tests.waiting import wait_until

pytestmark = needs_kubectl

TOPOLOGY = topology("""\
      - name: leafa
        tree: cluster
        podCIDRs: [10.41.0.0/16]
        serviceCIDRs: [10.141.0.0/20]
        nodes: [{name: a1, pods: 0}]
      - name: leafb
        tree: cluster
        podCIDRs: [10.42.0.0/16]
        serviceCIDRs: [10.142.0.0/20]
        nodes: [{name: b1, pods: 0}]
    """)

LEAVES = {"kosmos-leafa": "leafa", "kosmos-leafb": "leafb"}
ROOT_CLUSTER = "kosmos.io/root-cluster"
ROOT_UID = "kosmos.io/root-uid"
#: kosmos-tree's defaults (tree.leaf.Options), which the lab runs with.
UNREACHABLE_AFTER_S = 40.0
PROBE_PERIOD_S = 10.0
PROBE_TIMEOUT_S = 10.0

#: Pods of these tests may go to virtual nodes only.
ON_VIRTUAL_NODES = """\
      tolerations: [{key: kosmos.io/node, operator: Exists, effect: NoSchedule}]
      nodeSelector: {kosmos.io/node: "true"}
      terminationGracePeriodSeconds: 1"""


class StateLab(TreeLab):
    def leaf_copies(self, namespace: str) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """This root's leaf pods in ``namespace`` of every leaf, by root UID: [(leaf, pod)]."""
        out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for leaf in LEAVES.values():
            for p in self.get(leaf, "pods", "-n", namespace, "-l", f"{ROOT_CLUSTER}={self.root_id}")["items"]:
                out.setdefault(p["metadata"]["labels"][ROOT_UID], []).append((leaf, p))
        return out

    def root_pods(self, namespace: str, *selector: str) -> dict[str, dict[str, Any]]:
        """The root's pods in ``namespace``, by UID."""
        return {p["metadata"]["uid"]: p for p in self.get("root", "pods", "-n", namespace, *selector)["items"]}

    def diagnose(self) -> str:
        """The tree manager's log tail, for a failed wait."""
        log = self.tree().get("log")
        text = Path(log).read_text()[-4000:] if log and Path(log).exists() else "(no log)"
        return f"\nkosmos-tree log (tail):\n{text}"


@pytest.fixture(scope="module")
def slab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StateLab]:
    with tree_lab_running(StateLab, TOPOLOGY, tmp_path_factory.mktemp("tree-state")) as running:
        running.root_id = running.get("root", "namespace", "kube-system")["metadata"]["uid"]
        wait_until(lambda: all(node_ready(n) == "True" for name, n in running.host_nodes().items() if name in LEAVES)
                   and set(LEAVES) <= set(running.host_nodes()), 60, "both virtual nodes Ready")
        yield running


def _running(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    return st.get("phase") == "Running" and all(c.get("ready") for c in st.get("containerStatuses") or [{}])


# ---------------------------------------------------------------------------------------------
# 1. A StatefulSet with claims on two leaves

STS = """\
apiVersion: v1
kind: Namespace
metadata: {name: state}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: state}
spec:
  serviceName: db
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
PLACEMENT
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - {labelSelector: {matchLabels: {app: db}}, topologyKey: kosmos.io/cluster}
      containers:
        - name: db
          image: busybox
          command: [sh, -c, '[ -f /data/born ] || hostname > /data/born; exec sleep 3600']
          volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
    - metadata: {name: data}
      spec: {storageClassName: lab-local, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
""".replace("PLACEMENT", ON_VIRTUAL_NODES)


def _sts_pod(slab: StateLab, name: str, not_uid: str | None = None) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        pod = slab.get("root", "pod", name, "-n", "state", check=False)
        return pod if pod and _running(pod) and pod["metadata"]["uid"] != not_uid else None

    try:
        out: dict[str, Any] = wait_until(running, 90, f"root pod state/{name} Running and ready", interval=0.5)
    except AssertionError as e:
        events = slab.kubectl("root", "get", "events", "-n", "state", check=False).stdout
        raise AssertionError(f"{e}\nevents:\n{events}{slab.diagnose()}") from None
    return out


def test_statefulset_with_claims_on_two_leaves_keeps_its_data_and_its_leaf(slab: StateLab) -> None:
    slab.apply("root", STS)
    pods = {n: _sts_pod(slab, n) for n in ("db-0", "db-1")}
    nodes = {n: p["spec"]["nodeName"] for n, p in pods.items()}
    assert sorted(nodes.values()) == sorted(LEAVES), nodes  # one per leaf
    for name, pod in pods.items():
        leaf = LEAVES[nodes[name]]
        copy = slab.get(leaf, "pod", name, "-n", "state")
        assert copy["metadata"]["labels"][ROOT_UID] == pod["metadata"]["uid"]
        claim = slab.get("root", "pvc", f"data-{name}", "-n", "state")
        assert claim["status"]["phase"] == "Bound", claim["status"]
        mirror = slab.get("root", "pv", claim["spec"]["volumeName"])
        assert mirror["spec"]["claimRef"]["uid"] == claim["metadata"]["uid"]
        assert mirror["status"]["phase"] == "Bound"
        assert mirror["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"] == [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [nodes[name]]}]}]
        leaf_claim = slab.get(leaf, "pvc", f"data-{name}", "-n", "state")
        assert leaf_claim["status"]["phase"] == "Bound"
        leaf_pv = slab.get(leaf, "pv", leaf_claim["spec"]["volumeName"])
        assert leaf_pv["spec"]["local"]["path"] == mirror["spec"]["local"]["path"]  # the leaf's volume
        slab.kubectl("root", "exec", "-n", "state", name, "--", "sh", "-c", f"echo kept-{name} > /data/note")

    # A deleted pod comes back with its name and claim, on its leaf, and reads its data.
    old = pods["db-0"]
    slab.kubectl("root", "delete", "pod", "db-0", "-n", "state")
    again = _sts_pod(slab, "db-0", not_uid=old["metadata"]["uid"])
    assert again["spec"]["nodeName"] == nodes["db-0"]
    assert again["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "data-db-0"
    copies = slab.leaf_copies("state")
    assert [leaf for leaf, _ in copies[again["metadata"]["uid"]]] == [LEAVES[nodes["db-0"]]]
    assert old["metadata"]["uid"] not in copies
    note = slab.kubectl("root", "exec", "-n", "state", "db-0", "--", "cat", "/data/note", "/data/born").stdout
    assert note.split() == ["kept-db-0", "db-0"]

    # A larger request flows down to the leaf; the leaf's expansion shows in the root.
    slab.kubectl("root", "patch", "pvc", "data-db-1", "-n", "state", "-p",
                 '{"spec": {"resources": {"requests": {"storage": "2Gi"}}}}')
    leaf = LEAVES[nodes["db-1"]]
    wait_until(lambda: slab.get(leaf, "pvc", "data-db-1", "-n", "state")["status"].get("capacity", {}).get("storage")
               == "2Gi", 60, "the leaf claim's capacity 2Gi")
    claim = wait_until(lambda: (c := slab.get("root", "pvc", "data-db-1", "-n", "state"))["status"].get(
        "capacity", {}).get("storage") == "2Gi" and c, 30, "the root claim's capacity 2Gi")
    assert slab.get("root", "pv", claim["spec"]["volumeName"])["spec"]["capacity"]["storage"] == "2Gi"
    slab.kubectl("root", "delete", "statefulset", "db", "-n", "state")
    wait_until(lambda: not slab.leaf_copies("state") and not slab.root_pods("state"), 60,
               "the StatefulSet's pods gone in root and leaves")


# ---------------------------------------------------------------------------------------------
# 2. Crash consistency

CHURN = """\
apiVersion: v1
kind: Namespace
metadata: {name: churn}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: DEPLOYMENT, namespace: churn}
spec:
  replicas: REPLICAS
  selector: {matchLabels: {app: DEPLOYMENT}}
  template:
    metadata: {labels: {app: DEPLOYMENT}}
    spec:
PLACEMENT
      topologySpreadConstraints:
        - {maxSkew: 1, topologyKey: kosmos.io/cluster, whenUnsatisfiable: DoNotSchedule,
           labelSelector: {matchLabels: {app: DEPLOYMENT}}}
      containers:
        - {name: c, image: busybox, command: [sleep, '3600']}
""".replace("PLACEMENT", ON_VIRTUAL_NODES)


def _deployment(name: str, replicas: int) -> str:
    return CHURN.replace("DEPLOYMENT", name).replace("REPLICAS", str(replicas))


def _settled(slab: StateLab, replicas: int) -> dict[str, dict[str, Any]] | None:
    """The root's churn pods once there are ``replicas`` of them, all Running, none being
    deleted, and the leaves hold copies of exactly these (None before)."""
    pods = slab.root_pods("churn")
    if len(pods) != replicas or not all(_running(p) and not p["metadata"].get("deletionTimestamp")
                                        for p in pods.values()):
        return None
    return pods if set(slab.leaf_copies("churn")) == set(pods) else None


def _new_tree(slab: StateLab, old: int) -> bool:
    return slab.tree()["pid"] not in (None, old)


def _new_holder(slab: StateLab, old: str) -> bool:
    return lease_holder(slab) not in (None, old)


def test_killing_the_tree_manager_while_pods_churn_leaves_one_copy_each(slab: StateLab) -> None:
    peak = int(os.environ.get("TREE_CHURN_PODS", "100"))
    kills = int(os.environ.get("TREE_CHURN_KILLS", "3"))
    seed = int(os.environ.get("TREE_CHURN_SEED", str(time.time_ns() % 100_000)))
    rng = random.Random(seed)
    print(f"churn: peak {peak} pods, {kills} kills, TREE_CHURN_SEED={seed}")
    # "steady" is never scaled: its pods live through the churn and must keep their leaf copy.
    base = peak // 5
    slab.apply("root", _deployment("steady", base))
    first = wait_until(lambda: _settled(slab, base), 90, f"{base} steady pods Running with their copies",
                       interval=0.5)
    before = {uid: (leaf, p["metadata"]["uid"]) for uid, [(leaf, p)] in slab.leaf_copies("churn").items()}
    assert set(before) == set(first)
    slab.apply("root", _deployment("churn", 0))

    restarts = slab.status()["restarts"].get("tree", 0)
    steps = [rng.randint(0, peak - base) for _ in range(kills)] + [peak - base, (peak - base) // 2]
    for i, replicas in enumerate(steps):
        if i < kills:  # the manager holding the Lease is the one at work
            holder = wait_until(lambda: lease_holder(slab), 60, "a kosmos-tree holding the Lease")
        slab.kubectl("root", "scale", "-n", "churn", "deployment/churn", f"--replicas={replicas}")
        if i >= kills:
            continue
        time.sleep(rng.uniform(0.0, 3.0))  # a random moment of the manager's work on this step
        old = slab.tree()["pid"]
        os.kill(old, signal.SIGKILL)
        wait_until(functools.partial(_new_tree, slab, old), 120, "the supervisor's new kosmos-tree")
        wait_until(functools.partial(_new_holder, slab, holder), 60, "the new kosmos-tree holding the Lease")
    assert slab.status()["restarts"]["tree"] == restarts + kills

    final = base + steps[-1]
    try:
        pods = wait_until(lambda: _settled(slab, final), 180, f"{final} churn pods Running with their copies",
                          interval=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}{slab.diagnose()}") from None
    copies = slab.leaf_copies("churn")
    assert set(copies) == set(pods)  # no orphan: every copy has its root pod, and the reverse
    for uid, pod in pods.items():
        assert len(copies[uid]) == 1, [f"{leaf}/{p['metadata']['name']}" for leaf, p in copies[uid]]  # no duplicate
        leaf, copy = copies[uid][0]
        assert leaf == LEAVES[pod["spec"]["nodeName"]] and copy["metadata"]["name"] == pod["metadata"]["name"]
        assert [c.get("restartCount") for c in copy["status"]["containerStatuses"]] == [0], copy["status"]
    survivors = set(before) & set(pods)
    assert survivors == set(before), "a steady pod was replaced"
    assert {uid: (copies[uid][0][0], copies[uid][0][1]["metadata"]["uid"]) for uid in survivors} == \
        {uid: before[uid] for uid in survivors}
    slab.kubectl("root", "delete", "namespace", "churn", "--wait=false")
    wait_until(lambda: not slab.leaf_copies("churn"), 120, "the churn pods' leaf copies gone", interval=1.0)


# ---------------------------------------------------------------------------------------------
# 3. A leaf's API server unreachable

OUTAGE = """\
apiVersion: v1
kind: Namespace
metadata: {name: outage}
---
apiVersion: v1
kind: Pod
metadata: {name: NAME, namespace: outage}
spec:
  nodeName: NODE
PLACEMENT
  containers:
    - name: c
      image: busybox
      command: [sh, -c, 'while [ ! -e /tmp/stop ]; do sleep 0.2; done; rm /tmp/stop; exit 3']
"""


def _outage_pod(name: str, node: str) -> str:
    placement = "\n".join(line[4:] for line in ON_VIRTUAL_NODES.splitlines())
    return OUTAGE.replace("NAME", name).replace("NODE", node).replace("PLACEMENT", placement)


def _condition(node: dict[str, Any], kind: str = "Ready") -> dict[str, Any]:
    return next((c for c in (node.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def _restarts(pod: dict[str, Any] | None) -> int:
    return sum(c.get("restartCount") or 0 for c in ((pod or {}).get("status") or {}).get("containerStatuses") or [])


def test_an_unreachable_leaf_api_turns_its_node_not_ready_and_evicts_nothing(slab: StateLab) -> None:
    outage_s = float(os.environ.get("TREE_OUTAGE_SECONDS", "75"))
    notready_within = UNREACHABLE_AFTER_S + PROBE_PERIOD_S + PROBE_TIMEOUT_S + 5.0
    assert outage_s >= notready_within, f"TREE_OUTAGE_SECONDS={outage_s:g} is shorter than the threshold"
    slab.apply("root", _outage_pod("steady", "kosmos-leafb"))
    pod = wait_until(lambda: (p := slab.get("root", "pod", "steady", "-n", "outage", check=False)) and _running(p)
                     and p, 60, "pod steady Running on kosmos-leafb")
    leaf_uid = slab.get("leafb", "pod", "steady", "-n", "outage")["metadata"]["uid"]
    apiserver = slab.kube("leafb")["apiserver_pid"]
    assert apiserver, "leafb's API server does not run"

    stopped = time.monotonic()
    os.kill(apiserver, signal.SIGSTOP)
    try:
        node = wait_until(lambda: (n := slab.host_nodes()["kosmos-leafb"]) and _condition(n).get("status") == "False"
                          and n, notready_within, "kosmos-leafb Ready=False", interval=1.0)
        cond = _condition(node)
        assert cond["reason"] == "LeafUnreachable", cond
        print(f"outage: kosmos-leafb NotReady {time.monotonic() - stopped:.1f} s after SIGSTOP")
        assert node_ready(slab.host_nodes()["kosmos-leafa"]) == "True"  # one leaf's outage stalls no other
        slab.apply("root", _outage_pod("elsewhere", "kosmos-leafa"))
        wait_until(lambda: (p := slab.get("root", "pod", "elsewhere", "-n", "outage", check=False)) and _running(p),
                   60, "a new pod on kosmos-leafa Running during leafb's outage", interval=0.5)

        def untouched() -> bool:
            """The root pod on the unreachable leaf is the same, not being deleted, still Running
            (we neither evict nor rewrite it), and its node untainted NoExecute."""
            p = slab.get("root", "pod", "steady", "-n", "outage")
            assert p["metadata"]["uid"] == pod["metadata"]["uid"] and not p["metadata"].get("deletionTimestamp")
            assert p["status"]["phase"] == "Running", p["status"]
            taints = slab.host_nodes()["kosmos-leafb"]["spec"].get("taints") or []
            assert not [t for t in taints if t.get("effect") == "NoExecute"], taints
            return time.monotonic() - stopped >= outage_s

        wait_until(untouched, outage_s + 30, f"the end of the {outage_s:g} s outage", interval=2.0)
        assert _condition(slab.host_nodes()["kosmos-leafb"])["reason"] == "LeafUnreachable"
    finally:
        os.kill(apiserver, signal.SIGCONT)
    resumed = time.monotonic()
    # A status change in the leaf after the outage reaches the root pod within 30 s.
    slab.kubectl("leafb", "exec", "-n", "outage", "steady", "--", "touch", "/tmp/stop", timeout=25)
    wait_until(lambda: _restarts(slab.get("root", "pod", "steady", "-n", "outage")) >= 1,
               max(1.0, 30 - (time.monotonic() - resumed)), "the leaf container's restart in the root pod",
               interval=0.5)
    print(f"outage: the leaf's container restart in the root {time.monotonic() - resumed:.1f} s after SIGCONT")
    assert slab.get("leafb", "pod", "steady", "-n", "outage")["metadata"]["uid"] == leaf_uid  # never recreated
    wait_until(lambda: node_ready(slab.host_nodes()["kosmos-leafb"]) == "True", 30, "kosmos-leafb Ready again")
    slab.kubectl("root", "delete", "namespace", "outage", "--wait=false")
