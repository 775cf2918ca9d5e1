"""Issue 17's acceptance, the application half: real pods through the ClusterTree in the lab.

A user's ordinary manifests, applied with the real kubectl to the root (``role: host``) of a lab,
run as real processes in a leaf and are used from the other clusters through the fabric. Kosmos'
own e2e, as far as apps go (the three leaf modes appearing is ``test_tree_e2e.py``'s).

The lab (module fixture, its own name): host ``root`` (node r1), leaves ``leafa`` (``tree:
cluster``: virtual node ``kosmos-leafa``, leaf nodes a1 and a2) and ``leafb`` (``tree: node``: virtual
node ``b1``). Everything is the lab's: the root's Kosmos scheduler (profile
``kosmos-scheduler``), the root's controller-manager (Deployment, EndpointSlices), kube-proxy,
the leaves' kubelet runtime, ``kosmos-tree`` with its kubelet relay on 127.0.0.1. Tests run in
file order on one Deployment ``web`` (``python3 -m http.server``, a readinessProbe, ConfigMap and
Secret as volumes and environment) pinned to ``kosmos-leafa``:

1. it runs in leafa: the leaf copy (found by its ``kosmos.io/root-uid`` label) Running there, the
   root pod Running with the leaf pod's IP, scheduled by ``kosmos-scheduler``; it answers HTTP
   at that IP from the other leaf's node and from a leafb user's pod, and through a ClusterIP
   Service of the root from a pod on r1 (the root's kube-proxy sends to the leaf pod IP; the
   fabric carries it);
2. ``kubectl logs`` and ``kubectl exec`` on the root pod reach the leaf pod through the virtual
   node's kubelet; the leaf's Events about it show on the root pod;
3. the leaf process sees the root's ConfigMap and Secret (files and environment); an edit of the
   root ConfigMap reaches the leaf copy within seconds;
4. deleting the root pod deletes its leaf copy, and the Deployment's next pod runs in leafa
   (its process reads the edited ConfigMap);
5. deleting the leaf copy: the root pod is kept (same UID) and a new copy runs (issue item 3);
   after 4 and 5 the leaf holds exactly one copy per root pod: nothing orphaned;
6. a root pod ``clash`` whose name a leafa user's pod has: its copy is ``clash-<hash>``, and
   ``kubectl logs``/``exec`` on the root pod reach that copy, not the user's pod;
7. placement inside the leaf: a root pod annotated ``kosmos.io/cluster-selector`` and one a
   ``ClusterPodConvertPolicy`` selects both land on a2, as their node selectors say;
8. ``fabric-tool unjoin leafb`` while a root pod runs there: our copies in leafb (pod,
   ConfigMap) go, the leaf user's pod and ConfigMap and leafa's copies stay; the root pod,
   bound to the deleted virtual node, is then removed by the root's PodGC.

Needs root (the lab) and kubectl.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubeemu.ctrl import podgc
from tests.lab.conftest import needs_kubectl
from tests.lab.tree_lab import TreeLab, topology, tree_lab_running
from tests.waiting import wait_until

pytestmark = needs_kubectl

NS = "tapps"
#: kubectl polls cost a process each: poll twice a second, not at the helper's default.
POLL_S = 0.5

TOPOLOGY = topology("""\
      - name: leafa
        tree: cluster
        podCIDRs: [10.41.0.0/16]
        serviceCIDRs: [10.141.0.0/20]
        nodes: [{name: a1, pods: 0}, {name: a2, pods: 0}]
      - name: leafb
        tree: node
        podCIDRs: [10.42.0.0/16]
        serviceCIDRs: [10.142.0.0/20]
        nodes: [{name: b1, pods: 0}]
    """)

#: The app: a web server naming its pod (hostname = pod name), pinned to ``kosmos-leafa`` as a
#: Kosmos user pins one (node selector + the virtual nodes' toleration), scheduled by the Kosmos
#: profile; a Service over it; a client pod on the root's real node.
APP = textwrap.dedent(f"""\
    apiVersion: v1
    kind: Namespace
    metadata: {{name: {NS}}}
    ---
    apiVersion: v1
    kind: ConfigMap
    metadata: {{name: webcfg, namespace: {NS}}}
    data: {{greeting: hello-from-root}}
    ---
    apiVersion: v1
    kind: Secret
    metadata: {{name: websec, namespace: {NS}}}
    stringData: {{token: s3cr3t}}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web, namespace: {NS}}}
    spec:
      replicas: 1
      selector: {{matchLabels: {{app: web}}}}
      template:
        metadata: {{labels: {{app: web}}}}
        spec:
          schedulerName: kosmos-scheduler
          terminationGracePeriodSeconds: 3
          nodeSelector: {{kubernetes.io/hostname: kosmos-leafa}}
          tolerations: [{{key: kosmos.io/node, operator: Exists, effect: NoSchedule}}]
          containers:
            - name: web
              image: python:3
              command: [sh, -c, 'mkdir -p /tmp/www && echo "web $(hostname)" > /tmp/www/index.html &&
                echo "serving as $(hostname)" && cd /tmp/www && exec python3 -m http.server 8080']
              ports: [{{name: http, containerPort: 8080}}]
              readinessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 1}}
              env: [{{name: GREETING, valueFrom: {{configMapKeyRef: {{name: webcfg, key: greeting}}}}}}]
              envFrom: [{{secretRef: {{name: websec}}}}]
              volumeMounts:
                - {{name: cfg, mountPath: /etc/webcfg}}
                - {{name: sec, mountPath: /etc/websec}}
          volumes:
            - {{name: cfg, configMap: {{name: webcfg}}}}
            - {{name: sec, secret: {{secretName: websec}}}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {{name: web, namespace: {NS}}}
    spec:
      selector: {{app: web}}
      ports: [{{port: 80, targetPort: http}}]
    ---
    apiVersion: v1
    kind: Pod
    metadata: {{name: client, namespace: {NS}}}
    spec:
      terminationGracePeriodSeconds: 1
      nodeSelector: {{kubernetes.io/hostname: r1}}
      containers: [{{name: c, image: python:3, command: [sleep, infinity]}}]
    """)

#: A root Deployment placed on leafb by cluster (affinity on ``kosmos.io/cluster``), for unjoin.
WEBB = textwrap.dedent(f"""\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: webb, namespace: {NS}}}
    spec:
      replicas: 1
      selector: {{matchLabels: {{app: webb}}}}
      template:
        metadata: {{labels: {{app: webb}}}}
        spec:
          schedulerName: kosmos-scheduler
          terminationGracePeriodSeconds: 1
          affinity:
            nodeAffinity:
              requiredDuringSchedulingIgnoredDuringExecution:
                nodeSelectorTerms: [{{matchExpressions: [{{key: kosmos.io/cluster, operator: In, values: [leafb]}}]}}]
          tolerations: [{{key: kosmos.io/node, operator: Exists, effect: NoSchedule}}]
          containers:
            - {{name: c, image: python:3, command: [sleep, infinity], envFrom: [{{configMapRef: {{name: webcfg}}}}]}}
    """)

#: A leafb user's own pod (the HTTP client of the other leaf) and ConfigMap, in the namespace
#: our copies use too.
LEAF_USER = textwrap.dedent(f"""\
    apiVersion: v1
    kind: Namespace
    metadata: {{name: {NS}}}
    ---
    apiVersion: v1
    kind: ConfigMap
    metadata: {{name: mine, namespace: {NS}}}
    data: {{k: v}}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {{name: mine, namespace: {NS}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{{name: c, image: python:3, command: [sleep, infinity]}}]
    """)


#: A leafa user's pod named as a root pod will be, and that root pod (``WHO`` tells them apart).
CLASH_LEAF = textwrap.dedent(f"""\
    apiVersion: v1
    kind: Pod
    metadata: {{name: clash, namespace: {NS}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{{name: c, image: python:3, command: [sleep, infinity], env: [{{name: WHO, value: leaf-user}}]}}]
    """)

CLASH_ROOT = textwrap.dedent(f"""\
    apiVersion: v1
    kind: Pod
    metadata: {{name: clash, namespace: {NS}}}
    spec:
      terminationGracePeriodSeconds: 1
      nodeSelector: {{kosmos.io/cluster: leafa}}
      tolerations: [{{key: kosmos.io/node, operator: Exists, effect: NoSchedule}}]
      containers:
        - name: c
          image: python:3
          command: [sh, -c, 'echo i-am-the-roots; exec sleep infinity']
          env: [{{name: WHO, value: root}}]
    """)


#: Placement in the leaf (both onto a2, not a1): ``sel`` by its ``kosmos.io/cluster-selector``
#: annotation, ``conv`` by a ClusterPodConvertPolicy matching its labels and leaf cluster. The
#: policy is made with the lab (long before the pod), as a pod's scheduling fields cannot be
#: converted once its leaf copy exists.
POLICY = textwrap.dedent("""\
    apiVersion: kosmos.io/v1alpha1
    kind: ClusterPodConvertPolicy
    metadata: {name: to-a2}
    spec:
      labelSelector: {matchLabels: {app: conv}}
      leafNodeSelector: {matchLabels: {kosmos.io/cluster: leafa}}
      converters:
        nodeSelectorConverter: {convertType: replace, nodeSelector: {kubernetes.io/hostname: a2}}
    """)
#: The two pods.
PLACED = textwrap.dedent(f"""\
    apiVersion: v1
    kind: Pod
    metadata: {{name: conv, namespace: {NS}, labels: {{app: conv}}}}
    spec:
      terminationGracePeriodSeconds: 1
      nodeSelector: {{kosmos.io/cluster: leafa}}
      tolerations: [{{key: kosmos.io/node, operator: Exists, effect: NoSchedule}}]
      containers: [{{name: c, image: python:3, command: [sleep, infinity]}}]
    ---
    apiVersion: v1
    kind: Pod
    metadata:
      name: sel
      namespace: {NS}
      annotations: {{kosmos.io/cluster-selector: '{{"nodeSelector": {{"kubernetes.io/hostname": "a2"}}}}'}}
    spec:
      terminationGracePeriodSeconds: 1
      nodeSelector: {{kosmos.io/cluster: leafa}}
      tolerations: [{{key: kosmos.io/node, operator: Exists, effect: NoSchedule}}]
      containers: [{{name: c, image: python:3, command: [sleep, infinity]}}]
    """)


class AppsLab(TreeLab):
    def ns_pods(self, context: str, *selector: str) -> list[dict[str, Any]]:
        """Pods of :data:`NS` in ``context`` (``-l`` ``selector``), not yet being deleted."""
        items: list[dict[str, Any]] = self.get(context, "pods", "-n", NS, *selector)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def copies(self, context: str, root_uid: str | None = None) -> list[dict[str, Any]]:
        """This root's pod copies in leaf ``context`` (of the root pod ``root_uid``, or all),
        terminating ones included: a copy is gone only once the leaf has no object left."""
        sel = f"kosmos.io/root-cluster={self.root_id}"
        if root_uid is not None:
            sel += f",kosmos.io/root-uid={root_uid}"
        items: list[dict[str, Any]] = self.get(context, "pods", "-A", "-l", sel)["items"]
        return items


@pytest.fixture(scope="module")
def tlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppsLab]:
    with tree_lab_running(AppsLab, TOPOLOGY, tmp_path_factory.mktemp("tree-apps")) as running:
        running.root_id = running.get("root", "namespace", "kube-system")["metadata"]["uid"]
        running.apply("root", APP)
        running.apply("leafb", LEAF_USER)
        running.apply("root", POLICY)
        yield running


def _running(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or [])
    return st.get("phase") == "Running" and ready and bool(st.get("podIP"))


def _web_in_leafa(tlab: AppsLab) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(root pod, its leaf copy) of ``web`` once both run and the root shows the copy's IP."""
    roots = tlab.ns_pods("root", "-l", "app=web")
    if len(roots) != 1 or not _running(roots[0]):
        return None
    copies = tlab.copies("leafa", roots[0]["metadata"]["uid"])
    if len(copies) != 1 or not _running(copies[0]) or copies[0]["status"]["podIP"] != roots[0]["status"]["podIP"]:
        return None
    return roots[0], copies[0]


def _wait_web(tlab: AppsLab, timeout: float, message: str,
              predicate: Callable[[], tuple[dict[str, Any], dict[str, Any]] | None] | None = None,
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`wait_until` ``predicate`` (default :func:`_web_in_leafa`); a time-out's message
    carries what web's root pods and leafa's copies looked like then: under load in CI, the
    failure's text is often all anyone sees of it."""
    try:
        return wait_until(predicate or (lambda: _web_in_leafa(tlab)), timeout, message, interval=POLL_S)
    except AssertionError as e:
        state = [f"root {_brief(p)}" for p in tlab.get("root", "pods", "-n", NS, "-l", "app=web")["items"]]
        state += [f"leafa copy {_brief(c)}" for c in tlab.copies("leafa")]
        raise AssertionError("\n".join([str(e), *state])) from None


def _brief(pod: dict[str, Any]) -> str:
    m, st = pod["metadata"], pod.get("status") or {}
    conds = ",".join(f"{c['type']}={c['status']}" for c in st.get("conditions") or [])
    return (f"{m['name']} uid={m['uid']} root-uid={(m.get('labels') or {}).get('kosmos.io/root-uid')} "
            f"node={pod['spec'].get('nodeName')} phase={st.get('phase')} ip={st.get('podIP')} "
            f"deleting={m.get('deletionTimestamp')} reason={st.get('reason')} message={st.get('message')} [{conds}]")


HTTP_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())"


def _get_from_netns(netns: str, url: str) -> str:
    p = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", HTTP_GET, url], capture_output=True,
                       text=True, timeout=30)
    return p.stdout.strip() if p.returncode == 0 else f"ERROR {p.stderr.strip()[-200:]}"


def test_a_pinned_deployment_runs_in_the_leaf_and_answers_across_clusters(tlab: AppsLab) -> None:
    root_pod, copy = _wait_web(tlab, 120, "web Running in leafa, its IP on the root pod")
    name = root_pod["metadata"]["name"]
    assert root_pod["spec"]["nodeName"] == "kosmos-leafa"
    assert copy["spec"]["nodeName"] in ("a1", "a2") and copy["metadata"]["name"] == name
    assert tlab.kube("root")["scheduler_pid"], "the lab runs the Kosmos scheduler in the host"
    scheduled = tlab.get("root", "events", "-n", NS, "--field-selector",
                         f"involvedObject.name={name},reason=Scheduled")["items"]
    assert "kosmos-scheduler" in {(e.get("source") or {}).get("component") for e in scheduled}, scheduled
    ip = root_pod["status"]["podIP"]
    # From the other leaf's node and from a pod of the other leaf (its user's), through the
    # fabric, to the IP the root shows.
    assert _get_from_netns(tlab.nodes()["leafb/b1"]["netns"], f"http://{ip}:8080/") == f"web {name}"
    wait_until(lambda: _running(tlab.get("leafb", "pod", "mine", "-n", NS)), 60, "leafb's user pod",
               interval=POLL_S)
    out = tlab.kubectl("leafb", "exec", "-n", NS, "mine", "--", "python3", "-c", HTTP_GET, f"http://{ip}:8080/")
    assert out.stdout.strip() == f"web {name}"
    # A ClusterIP Service of the root: from a root pod, kube-proxy picks the leaf pod's IP.
    client = wait_until(lambda: next((p for p in tlab.ns_pods("root") if p["metadata"]["name"] == "client"
                                      and _running(p)), None), 60, "the client pod on r1", interval=POLL_S)
    assert client["spec"]["nodeName"] == "r1"
    cluster_ip = tlab.get("root", "service", "web", "-n", NS)["spec"]["clusterIP"]

    def through_service() -> str | None:
        out = tlab.kubectl("root", "exec", "-n", NS, "client", "--", "python3", "-c", HTTP_GET,
                           f"http://{cluster_ip}/", check=False)
        return out.stdout.strip() if out.returncode == 0 else None

    assert wait_until(through_service, 30, "an answer through the root Service", interval=POLL_S) == f"web {name}"


def test_logs_exec_and_leaf_events_through_the_virtual_node(tlab: AppsLab) -> None:
    root_pod, _ = _wait_web(tlab, 60, "web Running in leafa")
    name = root_pod["metadata"]["name"]
    logs = tlab.kubectl("root", "logs", "-n", NS, name, "-c", "web").stdout
    assert f"serving as {name}" in logs, logs
    out = tlab.kubectl("root", "exec", "-n", NS, name, "-c", "web", "--", "cat", "/etc/hostname").stdout
    assert out.strip() == name
    # stdin reaches the leaf process; its exit code comes back.
    assert tlab.kubectl("root", "exec", "-i", "-n", NS, name, "--", "cat", stdin="through\n").stdout == "through\n"
    assert tlab.kubectl("root", "exec", "-n", NS, name, "--", "sh", "-c", "exit 3", check=False).returncode == 3

    def leaf_events() -> set[str] | None:
        evs = tlab.get("root", "events", "-n", NS, "--field-selector", f"involvedObject.name={name}")["items"]
        reasons = {e["reason"] for e in evs if (e.get("source") or {}).get("component") == "kosmos-tree/leafa"}
        return reasons if {"Created", "Started"} <= reasons else None

    wait_until(leaf_events, 30, "the leaf's Created/Started events on the root pod", interval=POLL_S)
    described = tlab.kubectl("root", "describe", "pod", "-n", NS, name).stdout
    assert "kosmos-tree/leafa" in described and "Started container web" in described, described


def test_configmap_and_secret_reach_the_leaf_process_and_edits_follow(tlab: AppsLab) -> None:
    root_pod, _ = _wait_web(tlab, 60, "web Running in leafa")
    out = tlab.kubectl("root", "exec", "-n", NS, root_pod["metadata"]["name"], "--", "sh", "-c",
                       'echo "$GREETING $token $(cat /etc/webcfg/greeting) $(cat /etc/websec/token)"').stdout
    assert out.split() == ["hello-from-root", "s3cr3t", "hello-from-root", "s3cr3t"]
    cm_uid = tlab.get("root", "configmap", "webcfg", "-n", NS)["metadata"]["uid"]
    copy = tlab.get("leafa", "configmap", "-n", NS, "-l", f"kosmos.io/root-uid={cm_uid}")["items"]
    assert [c["data"] for c in copy] == [{"greeting": "hello-from-root"}]
    tlab.kubectl("root", "patch", "configmap", "webcfg", "-n", NS, "-p", '{"data": {"greeting": "edited"}}')

    def edited() -> bool:
        items = tlab.get("leafa", "configmap", "-n", NS, "-l", f"kosmos.io/root-uid={cm_uid}")["items"]
        return [c["data"] for c in items] == [{"greeting": "edited"}]

    wait_until(edited, 15, "the edit on the leaf's copy of webcfg", interval=POLL_S)


def _no_orphans(tlab: AppsLab) -> None:
    """Every copy in leafa belongs to a live root pod, one copy each."""
    roots = {p["metadata"]["uid"] for p in tlab.ns_pods("root", "-l", "app=web")}
    copies = [c["metadata"]["labels"]["kosmos.io/root-uid"] for c in tlab.copies("leafa")]
    assert sorted(copies) == sorted(roots), (copies, roots)


def test_deleting_the_root_pod_deletes_its_leaf_copy(tlab: AppsLab) -> None:
    old, _ = _wait_web(tlab, 60, "web Running in leafa")
    old_uid = old["metadata"]["uid"]
    tlab.kubectl("root", "delete", "pod", "-n", NS, old["metadata"]["name"], "--wait=false")
    wait_until(lambda: tlab.copies("leafa", old_uid) == [], 60, "the old leaf copy gone", interval=POLL_S)
    new, _ = _wait_web(tlab, 120, "the Deployment's new pod Running in leafa")
    assert new["metadata"]["uid"] != old_uid
    # The new pod started after the ConfigMap edit: its leaf process reads the edited data.
    out = tlab.kubectl("root", "exec", "-n", NS, new["metadata"]["name"], "--", "sh", "-c",
                       'echo "$GREETING $(cat /etc/webcfg/greeting)"').stdout
    assert out.split() == ["edited", "edited"]
    wait_until(lambda: tlab.get("root", "pod", old["metadata"]["name"], "-n", NS, check=False) is None, 30,
               "the old root pod gone", interval=POLL_S)
    _no_orphans(tlab)


def test_a_leaf_side_deletion_is_repaired_and_the_root_pod_kept(tlab: AppsLab) -> None:
    root_pod, copy = _wait_web(tlab, 60, "web Running in leafa")
    tlab.kubectl("leafa", "delete", "pod", "-n", NS, copy["metadata"]["name"], "--wait=false")

    def repaired() -> tuple[dict[str, Any], dict[str, Any]] | None:
        got = _web_in_leafa(tlab)
        return got if got is not None and got[1]["metadata"]["uid"] != copy["metadata"]["uid"] else None

    after, new_copy = _wait_web(tlab, 90, "a new leaf copy Running", repaired)
    assert after["metadata"]["uid"] == root_pod["metadata"]["uid"]
    assert new_copy["metadata"]["labels"]["kosmos.io/root-uid"] == root_pod["metadata"]["uid"]
    _no_orphans(tlab)


def test_logs_and_exec_reach_a_copy_renamed_for_a_leaf_users_pod(tlab: AppsLab) -> None:
    """The leaf already has a pod ``clash`` of its own: our copy is ``clash-<hash>``, found by its
    root-UID label, and ``kubectl logs``/``exec`` on the root's ``clash`` reach the copy, not the
    user's pod."""
    tlab.apply("leafa", CLASH_LEAF)
    tlab.apply("root", CLASH_ROOT)

    def copy_running() -> dict[str, Any] | None:
        root = tlab.get("root", "pod", "clash", "-n", NS, check=False)
        if root is None or not _running(root):
            return None
        copies = tlab.copies("leafa", root["metadata"]["uid"])
        return copies[0] if len(copies) == 1 and _running(copies[0]) else None

    copy = wait_until(copy_running, 90, "the root's clash running in leafa", interval=POLL_S)
    assert copy["metadata"]["name"].startswith("clash-"), copy["metadata"]["name"]
    assert "i-am-the-roots" in tlab.kubectl("root", "logs", "-n", NS, "clash").stdout
    out = tlab.kubectl("root", "exec", "-n", NS, "clash", "--", "sh", "-c", "echo $WHO").stdout
    assert out.strip() == "root"
    assert tlab.get("leafa", "pod", "clash", "-n", NS)["metadata"].get("labels", {}).get("kosmos.io/root-uid") is None


def test_placement_in_the_leaf_by_annotation_and_by_convert_policy(tlab: AppsLab) -> None:
    tlab.apply("root", PLACED)

    def placed() -> dict[str, dict[str, Any]] | None:
        out = {}
        for name in ("conv", "sel"):
            root = tlab.get("root", "pod", name, "-n", NS, check=False)
            copies = tlab.copies("leafa", root["metadata"]["uid"]) if root is not None and _running(root) else []
            if len(copies) != 1 or not _running(copies[0]):
                return None
            out[name] = copies[0]
        return out

    copies = wait_until(placed, 90, "conv and sel running in leafa", interval=POLL_S)
    for name, copy in copies.items():
        assert copy["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "a2"}, (name, copy["spec"])
        assert copy["spec"]["nodeName"] == "a2", name
    assert copies["conv"]["metadata"]["annotations"]["kosmos-io/convert-policy"] == "to-a2"
    assert "kosmos-io/convert-policy" not in copies["sel"]["metadata"].get("annotations", {})


def test_unjoin_of_a_leaf_with_running_pods_removes_only_our_copies(tlab: AppsLab) -> None:
    a_root, a_copy = _wait_web(tlab, 60, "web Running in leafa")
    tlab.apply("root", WEBB)

    def webb_in_leafb() -> dict[str, Any] | None:
        roots = tlab.ns_pods("root", "-l", "app=webb")
        if len(roots) != 1 or roots[0]["spec"].get("nodeName") != "b1":
            return None
        copies = tlab.copies("leafb", roots[0]["metadata"]["uid"])
        return roots[0] if len(copies) == 1 and _running(copies[0]) else None

    webb = wait_until(webb_in_leafb, 120, "webb's copy Running in leafb", interval=POLL_S)
    assert tlab.get("leafb", "configmap", "-n", NS, "-l", f"kosmos.io/root-cluster={tlab.root_id}")["items"]
    mine_uid = tlab.get("leafb", "pod", "mine", "-n", NS)["metadata"]["uid"]

    tlab.tool("unjoin", "leafb", "--lab", tlab.name, "--timeout", "60")

    ours = f"kosmos.io/root-cluster={tlab.root_id}"
    for kind in ("pods", "configmaps", "secrets"):
        assert tlab.get("leafb", kind, "-A", "-l", ours)["items"] == [], kind
    assert tlab.get("leafb", "pod", "mine", "-n", NS)["metadata"]["uid"] == mine_uid
    assert tlab.get("leafb", "configmap", "mine", "-n", NS) is not None
    assert "b1" not in {n["metadata"]["name"] for n in tlab.get("root", "nodes")["items"]}
    # leafa is untouched: the same copy runs.
    still = tlab.copies("leafa", a_root["metadata"]["uid"])
    assert [c["metadata"]["uid"] for c in still] == [a_copy["metadata"]["uid"]]
    # The root pod is the root's: unjoin does not delete it, but its node is gone, so the root's
    # PodGC force-deletes it once the node's quarantine is over (one pass to see the node missing,
    # the quarantine, one pass to delete; a margin for the lab's load).
    wait_until(lambda: tlab.get("root", "pod", webb["metadata"]["name"], "-n", NS, check=False) is None,
               podgc.GC_CHECK_PERIOD * 2 + podgc.QUARANTINE_TIME + 30, "PodGC deleted the root pod of the gone node",
               interval=POLL_S)
