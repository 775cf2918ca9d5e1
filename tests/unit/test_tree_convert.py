"""Pod convert policies (tree/convert.py): every converter with every convert type, the two
selectors, precedence between kinds and between several matching policies, unusable policies
ignored with an error naming the object and field; and Kosmos' CRDs
(deploy/base/host/crd-*convertpolicies.yaml) served by the emulator, a Kosmos-shaped manifest
applied with kubectl, the schema's refusals, and :class:`ConvertPolicies` following the root.

Kosmos publishes no example PodConvertPolicy (kosmos-io/kosmos@df846c34 has none in examples/,
docs/ or test/); :data:`KOSMOS_MANIFEST` is written against its Go types
(pkg/apis/kosmos/v1alpha1/podconvertpolicy_types.go), field for field.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeemu.runner import ServerThread
from scheduler.kube import Api, resource_path
from tests import crds
from tests.waiting import wait_until
from tree import convert as cv
from tree.metrics import TreeMetrics

REPO = Path(__file__).resolve().parents[2]
HOST = REPO / "deploy" / "base" / "host"
CRD_FILES = (HOST / "crd-podconvertpolicies.yaml", HOST / "crd-clusterpodconvertpolicies.yaml")
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

Obj = dict[str, Any]


def policy(name: str, *, namespace: str | None = None, labels: Obj | None = None, node: Any = None,
           converters: Any = None, **spec: Any) -> Obj:
    """A PodConvertPolicy (``namespace`` given) or ClusterPodConvertPolicy."""
    s: Obj = {"labelSelector": {"matchLabels": labels} if labels is not None else {}, **spec}
    if node is not None:
        s["leafNodeSelector"] = node
    if converters is not None:
        s["converters"] = converters
    meta: Obj = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "kosmos.io/v1alpha1", "kind": cv.POD_KIND if namespace else cv.CLUSTER_KIND,
            "metadata": meta, "spec": s}


def loaded(*objs: Obj) -> list[cv.Policy]:
    good, bad = cv.load_all(objs)
    assert not bad, bad
    return good


def pods(labels: Obj | None = None, namespace: str = "default", **spec: Any) -> tuple[Obj, Obj]:
    """(leaf pod as the syncer built it, root pod) with ``spec`` on the leaf pod."""
    root: Obj = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "web-0", "namespace": namespace, "uid": "u1", "labels": labels or {"app": "web"}},
                 "spec": {"nodeName": "kosmos-leaf1", "containers": [{"name": "c", "image": "nginx"}]}}
    leaf: Obj = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "web-0", "namespace": namespace, "labels": dict(root["metadata"]["labels"]),
                              "annotations": {"kosmos.io/root-name": f"{namespace}/web-0"}},
                 "spec": {"containers": [{"name": "c", "image": "nginx"}], **spec}}
    return leaf, root


def run(leaf: Obj, root: Obj, *objs: Obj, node_labels: Obj | None = None, cluster: str = "leaf1") -> Obj:
    return cv.convert(leaf, root, cluster=cluster, node_labels=node_labels or {}, policies=loaded(*objs))


# ---------------------------------------------------------------------------------------------
# Converters and convert types
# ---------------------------------------------------------------------------------------------

#: converter -> (a value the pod has, a value the policy sets); the field is cv.CONVERTERS'.
SAMPLES: dict[str, tuple[Any, Any]] = {
    "schedulerNameConverter": ("default-scheduler", "leaf-scheduler"),
    "nodeNameConverter": ("node-a", "node-b"),
    "nodeSelectorConverter": ({"disk": "hdd"}, {"disk": "ssd", "zone": "z1"}),
    "tolerationConverter": ([{"key": "old", "operator": "Exists"}],
                            [{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}]),
    "affinityConverter": ({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                              {"topologyKey": "kubernetes.io/hostname", "labelSelector": {}}]}},
                          {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                              "nodeSelectorTerms": [{"matchExpressions": [
                                  {"key": "zone", "operator": "In", "values": ["z1"]}]}]}}}),
    "topologySpreadConstraintsConverter": (
        [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {}}],
        [{"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
          "labelSelector": {"matchLabels": {"app": "web"}}}]),
    "hostAliasesConverter": ([{"ip": "10.0.0.1", "hostnames": ["old"]}],
                             [{"ip": "10.0.0.2", "hostnames": ["db", "db.local"]}]),
}


def test_samples_cover_every_converter_of_the_crd() -> None:
    crd = yaml.safe_load(CRD_FILES[0].read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    conv = props["converters"]["properties"]
    assert set(SAMPLES) == set(cv.CONVERTERS) == set(conv)
    for key, (field, _typ) in cv.CONVERTERS.items():
        assert conv[key]["properties"]["convertType"]["enum"] == ["add", "remove", "replace"], key
        assert set(conv[key]["properties"]) == {"convertType", field}, key
        assert conv[key]["required"] == ["convertType"], key


@pytest.mark.parametrize("key", sorted(SAMPLES))
@pytest.mark.parametrize("has", [True, False], ids=["pod-has-field", "pod-has-none"])
@pytest.mark.parametrize("ctype", ["add", "remove", "replace"])
def test_each_converter_and_convert_type(key: str, has: bool, ctype: str) -> None:
    field, _ = cv.CONVERTERS[key]
    old, new = SAMPLES[key]
    leaf, root = pods(**({field: copy.deepcopy(old)} if has else {}))
    out = run(leaf, root, policy("p", converters={key: {"convertType": ctype, field: new}}))
    expected = {"add": old if has else new, "remove": None, "replace": new}[ctype]
    assert out["spec"].get(field) == expected
    assert out["spec"]["containers"] == leaf["spec"]["containers"]  # nothing else touched
    assert out["metadata"]["annotations"][cv.POLICY_ANNOTATION] == "p"


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_replace_without_a_value_clears_the_field(key: str) -> None:
    field, _ = cv.CONVERTERS[key]
    leaf, root = pods(**{field: copy.deepcopy(SAMPLES[key][0])})
    out = run(leaf, root, policy("p", converters={key: {"convertType": "replace"}}))
    assert field not in out["spec"]


@pytest.mark.parametrize("empty", [[], {}, ""], ids=["list", "map", "string"])
def test_add_treats_an_empty_field_as_absent(empty: Any) -> None:
    key = {"list": "tolerationConverter", "dict": "nodeSelectorConverter",
           "str": "schedulerNameConverter"}[type(empty).__name__]
    field, _ = cv.CONVERTERS[key]
    leaf, root = pods(**{field: empty})
    out = run(leaf, root, policy("p", converters={key: {"convertType": "add", field: SAMPLES[key][1]}}))
    assert out["spec"][field] == SAMPLES[key][1]


def test_topology_spread_add_looks_at_the_constraints_not_at_the_affinity() -> None:
    """Kosmos' convertTopologySpreadConstraints ``add`` tests ``pod.Spec.Affinity == nil``."""
    key = "topologySpreadConstraintsConverter"
    new = SAMPLES[key][1]
    conv = policy("p", converters={key: {"convertType": "add", "topologySpreadConstraints": new}})
    leaf, root = pods(affinity=SAMPLES["affinityConverter"][0])
    assert run(leaf, root, conv)["spec"]["topologySpreadConstraints"] == new  # Kosmos: not added
    leaf, root = pods(topologySpreadConstraints=SAMPLES[key][0])
    assert run(leaf, root, conv)["spec"]["topologySpreadConstraints"] == SAMPLES[key][0]  # Kosmos: overwritten


def test_all_converters_of_one_policy_apply_together() -> None:
    leaf, root = pods(schedulerName="default-scheduler", nodeSelector={"disk": "hdd"})
    out = run(leaf, root, policy("p", converters={
        "schedulerNameConverter": {"convertType": "replace", "schedulerName": "volcano"},
        "nodeSelectorConverter": {"convertType": "remove"},
        "hostAliasesConverter": {"convertType": "add", "hostAliases": SAMPLES["hostAliasesConverter"][1]},
    }))
    assert out["spec"]["schedulerName"] == "volcano"
    assert "nodeSelector" not in out["spec"]
    assert out["spec"]["hostAliases"] == SAMPLES["hostAliasesConverter"][1]


def test_inputs_are_not_changed_and_the_output_shares_nothing_with_the_policy() -> None:
    leaf, root = pods(nodeSelector={"disk": "hdd"})
    before = copy.deepcopy((leaf, root))
    policies = loaded(policy("p", converters={"tolerationConverter": {
        "convertType": "replace", "tolerations": SAMPLES["tolerationConverter"][1]}}))
    out = cv.convert(leaf, root, cluster="leaf1", node_labels={}, policies=policies)
    assert (leaf, root) == before
    out["spec"]["tolerations"][0]["key"] = "changed"
    again = cv.convert(leaf, root, cluster="leaf1", node_labels={}, policies=policies)
    assert again["spec"]["tolerations"] == SAMPLES["tolerationConverter"][1]
    assert out is not leaf and again == cv.convert(leaf, root, cluster="leaf1", node_labels={}, policies=policies)


def test_no_matching_policy_leaves_the_pod_as_built() -> None:
    leaf, root = pods(nodeSelector={"disk": "hdd"})
    out = run(leaf, root, policy("p", labels={"app": "db"},
                                 converters={"nodeSelectorConverter": {"convertType": "remove"}}))
    assert out == leaf
    assert run(leaf, root) == leaf


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------

REMOVE_NS = {"nodeSelectorConverter": {"convertType": "remove"}}


@pytest.mark.parametrize(("selector", "matches"), [
    ({}, True),
    ({"matchLabels": {"app": "web"}}, True),
    ({"matchLabels": {"app": "web", "tier": "front"}}, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}, True),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, True),
    ({"matchExpressions": [{"key": "app", "operator": "Exists"}],
      "matchLabels": {"app": "db"}}, False),
])
def test_label_selector_selects_by_the_root_pods_labels(selector: Obj, matches: bool) -> None:
    leaf, root = pods(nodeSelector={"disk": "hdd"})
    leaf["metadata"]["labels"] = {"kosmos.io/root-cluster": "r"}  # the leaf pod's own labels do not count
    p = policy("p", converters=REMOVE_NS)
    p["spec"]["labelSelector"] = selector
    assert ("nodeSelector" not in run(leaf, root, p)["spec"]) is matches


@pytest.mark.parametrize(("node_sel", "node_labels", "cluster", "matches"), [
    (None, {}, "leaf1", True),
    ({}, {}, "leaf1", True),
    ({"matchLabels": {"kosmos.io/cluster": "leaf1"}}, {}, "leaf1", True),  # every virtual node carries it
    ({"matchLabels": {"kosmos.io/cluster": "leaf1"}}, {}, "leaf2", False),
    ({"matchLabels": {"topology.kubernetes.io/zone": "z1"}}, {"topology.kubernetes.io/zone": "z1"}, "leaf1", True),
    ({"matchLabels": {"topology.kubernetes.io/zone": "z1"}}, {"topology.kubernetes.io/zone": "z2"}, "leaf1", False),
    ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"gpu": "a100"}, "leaf1", True),
], ids=["absent", "empty", "cluster", "other-cluster", "zone", "other-zone", "exists"])
def test_leaf_node_selector_selects_by_the_virtual_nodes_labels(node_sel: Obj | None, node_labels: Obj,
                                                                 cluster: str, matches: bool) -> None:
    leaf, root = pods(nodeSelector={"disk": "hdd"})
    p = policy("p", converters=REMOVE_NS, node=node_sel)
    out = run(leaf, root, p, node_labels=node_labels, cluster=cluster)
    assert ("nodeSelector" not in out["spec"]) is matches


def test_a_pod_convert_policy_applies_only_in_its_namespace() -> None:
    leaf, root = pods(namespace="shop", nodeSelector={"disk": "hdd"})
    assert run(leaf, root, policy("p", namespace="other", converters=REMOVE_NS)) == leaf
    assert "nodeSelector" not in run(leaf, root, policy("p", namespace="shop", converters=REMOVE_NS))["spec"]


# ---------------------------------------------------------------------------------------------
# Precedence
# ---------------------------------------------------------------------------------------------


def scheduler(name: str) -> Obj:
    return {"schedulerNameConverter": {"convertType": "replace", "schedulerName": name}}


def chosen(leaf: Obj, root: Obj, *objs: Obj, node_labels: Obj | None = None) -> tuple[str | None, str | None]:
    out = run(leaf, root, *objs, node_labels=node_labels)
    return (out["spec"].get("schedulerName"),
            (out["metadata"].get("annotations") or {}).get(cv.POLICY_ANNOTATION))


def test_a_matching_cluster_policy_beats_a_namespaced_one() -> None:
    leaf, root = pods()
    objs = [policy("a-ns", namespace="default", converters=scheduler("ns")),
            policy("z-cluster", converters=scheduler("cluster"))]
    for order in itertools.permutations(objs):
        assert chosen(leaf, root, *order) == ("cluster", "z-cluster")


def test_a_namespaced_policy_applies_when_no_cluster_policy_matches() -> None:
    """Kosmos would skip every PodConvertPolicy here, because a ClusterPodConvertPolicy exists."""
    leaf, root = pods()
    assert chosen(leaf, root, policy("other-app", labels={"app": "db"}, converters=scheduler("cluster")),
                  policy("mine", namespace="default", converters=scheduler("ns"))) == ("ns", "mine")
    leaf2, root2 = pods()
    assert chosen(leaf2, root2, policy("other-leaf", node={"matchLabels": {"kosmos.io/cluster": "leaf9"}},
                                       converters=scheduler("cluster")),
                  policy("mine", namespace="default", converters=scheduler("ns"))) == ("ns", "mine")


@pytest.mark.parametrize("namespaced", [False, True], ids=["cluster", "namespaced"])
def test_several_matching_policies_of_one_kind_the_first_name_wins_whatever_the_order(namespaced: bool) -> None:
    leaf, root = pods()
    ns = "default" if namespaced else None
    objs = [policy(n, namespace=ns, converters=scheduler(n)) for n in ("b", "a-2", "a-10", "c")]
    for order in itertools.permutations(objs):
        assert chosen(leaf, root, *order) == ("a-10", "a-10")  # byte order: "a-10" < "a-2"


def test_converters_of_several_policies_are_never_combined() -> None:
    leaf, root = pods(nodeSelector={"disk": "hdd"})
    out = run(leaf, root, policy("a", converters=scheduler("a")), policy("b", converters=REMOVE_NS))
    assert out["spec"]["schedulerName"] == "a" and out["spec"]["nodeSelector"] == {"disk": "hdd"}


def test_a_policy_without_converters_is_passed_over_and_empty_converters_win() -> None:
    leaf, root = pods()
    assert chosen(leaf, root, policy("a"), policy("b", converters=scheduler("b"))) == ("b", "b")
    assert chosen(leaf, root, policy("a", converters={}), policy("b", converters=scheduler("b"))) == (None, "a")


def test_precedence_with_a_leaf_node_selector() -> None:
    leaf, root = pods()
    objs = (policy("a-zone1", node={"matchLabels": {"zone": "z1"}}, converters=scheduler("z1")),
            policy("b-any", converters=scheduler("any")))
    assert chosen(leaf, root, *objs, node_labels={"zone": "z1"}) == ("z1", "a-zone1")
    assert chosen(leaf, root, *objs, node_labels={"zone": "z2"}) == ("any", "b-any")


# ---------------------------------------------------------------------------------------------
# Unusable policies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("obj", "message"), [
    ({"kind": cv.CLUSTER_KIND, "metadata": {"name": "p"}, "spec": {}},
     "ClusterPodConvertPolicy p: spec.labelSelector is required"),
    ({"kind": cv.POD_KIND, "metadata": {"name": "p"}, "spec": {"labelSelector": {}}},
     "PodConvertPolicy p: metadata.namespace is missing"),
    ({"kind": cv.CLUSTER_KIND, "metadata": {"name": "p"}},
     "ClusterPodConvertPolicy p: spec is missing"),
    (policy("p", namespace="ns", labelSelector={"matchExpressions": [{"key": "app", "operator": "In"}]}),
     "PodConvertPolicy ns/p: spec.labelSelector.matchExpressions[0]: operator 'In' of key 'app' needs values"),
    (policy("p", node={"matchExpressions": [{"key": "z", "operator": "Gt", "values": ["1"]}]}),
     "ClusterPodConvertPolicy p: spec.leafNodeSelector.matchExpressions[0]: unsupported operator 'Gt'"),
    (policy("p", labelSelector={"matchLabels": {"app": 1}}),
     "ClusterPodConvertPolicy p: spec.labelSelector.matchLabels: must map strings to strings"),
    (policy("p", node="zone=z1"), "ClusterPodConvertPolicy p: spec.leafNodeSelector: must be an object"),
    (policy("p", converters={"nodeNameConverter": {"convertType": "set", "nodeName": "n"}}),
     "ClusterPodConvertPolicy p: spec.converters.nodeNameConverter.convertType: 'set' is not one of add, remove, "
     "replace"),
    (policy("p", converters={"nodeNameConverter": {"nodeName": "n"}}),
     "spec.converters.nodeNameConverter.convertType: None is not one of"),
    (policy("p", converters={"tolerationConverter": {"convertType": "add", "tolerations": {"key": "k"}}}),
     "ClusterPodConvertPolicy p: spec.converters.tolerationConverter.tolerations: must be an array"),
    (policy("p", converters={"tolerationConverter": {"convertType": "add", "tolerations": ["k"]}}),
     "spec.converters.tolerationConverter.tolerations: every item must be an object"),
    (policy("p", converters={"schedulerNameConverter": {"convertType": "add", "schedulerName": 3}}),
     "spec.converters.schedulerNameConverter.schedulerName: must be a string"),
    (policy("p", converters={"nodeSelectorConverter": {"convertType": "add", "nodeSelector": {"a": True}}}),
     "spec.converters.nodeSelectorConverter.nodeSelector: must map strings to strings"),
    (policy("p", converters={"affinityConverter": "remove"}),
     "spec.converters.affinityConverter: must be an object"),
    (policy("p", converters=["remove"]), "ClusterPodConvertPolicy p: spec.converters: must be an object"),
], ids=lambda v: None if isinstance(v, str) else str(v.get("metadata", {}).get("name")) + "-" + json.dumps(
    v.get("spec"))[:40])
def test_an_unusable_policy_is_refused_naming_the_object_and_field(obj: Obj, message: str) -> None:
    with pytest.raises(cv.PolicyError) as e:
        cv.load(obj)
    assert message in str(e.value)


def test_an_unusable_policy_is_ignored_and_the_others_still_apply() -> None:
    bad = policy("a-bad", converters={"nodeNameConverter": {"convertType": "set"}})
    bad_selector = policy("a-bad-selector", labelSelector={"matchExpressions": [{"key": "x", "operator": "Is"}]},
                          converters=scheduler("never"))
    good = policy("b-good", converters=scheduler("good"))
    policies, errors = cv.load_all([bad, bad_selector, good])
    assert [p.name for p in policies] == ["b-good"]
    assert len(errors) == 2 and all(isinstance(e, cv.PolicyError) for e in errors)
    leaf, root = pods()
    out = cv.convert(leaf, root, cluster="leaf1", node_labels={}, policies=policies)
    assert out["spec"]["schedulerName"] == "good"


# ---------------------------------------------------------------------------------------------
# The CRDs in the emulator; ConvertPolicies on a root
# ---------------------------------------------------------------------------------------------

KOSMOS_MANIFEST = """\
apiVersion: kosmos.io/v1alpha1
kind: ClusterPodConvertPolicy
metadata:
  name: leaf1-gpu
spec:
  labelSelector:
    matchLabels:
      app: trainer
  leafNodeSelector:
    matchLabels:
      kosmos.io/cluster: leaf1
  converters:
    schedulerNameConverter:
      convertType: replace
      schedulerName: volcano
    tolerationConverter:
      convertType: replace
      tolerations:
        - key: nvidia.com/gpu
          operator: Exists
          effect: NoSchedule
    nodeSelectorConverter:
      convertType: add
      nodeSelector:
        accelerator: nvidia-a100
---
apiVersion: kosmos.io/v1alpha1
kind: PodConvertPolicy
metadata:
  name: shop-web
  namespace: shop
spec:
  labelSelector:
    matchExpressions:
      - key: app
        operator: In
        values: [web, api]
  converters:
    affinityConverter:
      convertType: remove
    topologySpreadConstraintsConverter:
      convertType: replace
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              app: web
    hostAliasesConverter:
      convertType: add
      hostAliases:
        - ip: 10.96.0.10
          hostnames: [registry.local]
    nodeNameConverter:
      convertType: remove
"""

POD_POLICIES = resource_path(cv.GROUP_VERSION, cv.POD_POLICIES, "shop")
CLUSTER_POLICIES = resource_path(cv.GROUP_VERSION, cv.CLUSTER_POLICIES)


def kubectl(server: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "--server", server, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def install_crds(api: Api) -> None:
    crds.install(api, CRD_FILES, [CLUSTER_POLICIES, POD_POLICIES])


@pytest.fixture
def root() -> Iterator[Api]:
    with ServerThread(name="convert-root", bookmark_interval=0.3) as s:
        api = Api(s.url)
        install_crds(api)
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        yield api


def virtual_node(api: Api, name: str, cluster: str, **labels: str) -> None:
    api.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": name, "labels": {"kosmos.io/node": "true", "kosmos.io/cluster": cluster, **labels}}})


@pytest.fixture
def policies(root: Api) -> Iterator[cv.ConvertPolicies]:
    p = cv.ConvertPolicies(root, metrics=TreeMetrics())
    p.start()
    try:
        assert p.wait_synced(10)
        yield p
    finally:
        p.stop()


def test_crds_are_kosmos_own_names_and_scopes() -> None:
    docs = {d["spec"]["names"]["kind"]: d for f in CRD_FILES for d in [yaml.safe_load(f.read_text())]}
    assert docs[cv.POD_KIND]["spec"]["scope"] == "Namespaced"
    assert docs[cv.POD_KIND]["spec"]["names"]["shortNames"] == ["pcp"]
    assert docs[cv.CLUSTER_KIND]["spec"]["scope"] == "Cluster"
    for kind, plural in ((cv.POD_KIND, cv.POD_POLICIES), (cv.CLUSTER_KIND, cv.CLUSTER_POLICIES)):
        d = docs[kind]
        assert d["metadata"]["name"] == f"{plural}.kosmos.io"
        assert d["spec"]["group"] == "kosmos.io" and d["spec"]["names"]["plural"] == plural
        assert [v["name"] for v in d["spec"]["versions"]] == ["v1alpha1"]
        spec = d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert spec["required"] == ["labelSelector"]
        assert set(spec["properties"]) == {"labelSelector", "leafNodeSelector", "converters"}


@pytest.mark.skipif(not Path(KUBECTL).exists(), reason="kubectl not installed")
def test_a_kosmos_manifest_applies_unchanged_and_converts(root: Api, policies: cv.ConvertPolicies) -> None:
    p = kubectl(root.host, "apply", "-f", "-", stdin=KOSMOS_MANIFEST)
    assert p.returncode == 0, p.stderr
    assert "clusterpodconvertpolicy.kosmos.io/leaf1-gpu created" in p.stdout
    got = kubectl(root.host, "get", "pcp", "-n", "shop", "shop-web", "-o",
                  "jsonpath={.spec.converters.hostAliasesConverter.hostAliases[0].hostnames[0]}")
    assert got.returncode == 0 and got.stdout == "registry.local", got.stderr
    virtual_node(root, "kosmos-leaf1", "leaf1")
    virtual_node(root, "kosmos-leaf2", "leaf2")
    wait_until(lambda: len(policies.policies()) == 2, 10, "both policies in the informers")
    wait_until(lambda: policies._own_node("kosmos-leaf2"), 10, "the virtual nodes in the informer")

    leaf, rootpod = pods(labels={"app": "trainer"}, namespace="shop", schedulerName="default-scheduler",
                         tolerations=[{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                       "effect": "NoExecute", "tolerationSeconds": 300}])
    out = policies.converter("leaf1")(leaf, rootpod)
    assert out["spec"]["schedulerName"] == "volcano"
    assert out["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert out["spec"]["nodeSelector"] == {"accelerator": "nvidia-a100"}
    assert out["metadata"]["annotations"][cv.POLICY_ANNOTATION] == "leaf1-gpu"
    # The same pod bound to leaf2's virtual node: the cluster policy's leafNodeSelector says no,
    # and shop-web does not select app=trainer.
    rootpod["spec"]["nodeName"] = "kosmos-leaf2"
    assert policies.converter("leaf2")(leaf, rootpod) == leaf

    leaf, rootpod = pods(labels={"app": "web"}, namespace="shop", nodeName="n1",
                         affinity=SAMPLES["affinityConverter"][0])
    out = policies.converter("leaf1")(leaf, rootpod)
    assert "affinity" not in out["spec"] and "nodeName" not in out["spec"]
    assert out["spec"]["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "ScheduleAnyway"
    assert out["spec"]["hostAliases"] == [{"ip": "10.96.0.10", "hostnames": ["registry.local"]}]
    assert out["metadata"]["annotations"][cv.POLICY_ANNOTATION] == "shop-web"


@pytest.mark.skipif(not Path(KUBECTL).exists(), reason="kubectl not installed")
@pytest.mark.parametrize(("doc", "expect"), [
    ("""apiVersion: kosmos.io/v1alpha1
kind: ClusterPodConvertPolicy
metadata: {name: bad-type}
spec:
  labelSelector: {}
  converters: {nodeNameConverter: {convertType: set, nodeName: n}}
""", 'Unsupported value: "set"'),
    ("""apiVersion: kosmos.io/v1alpha1
kind: PodConvertPolicy
metadata: {name: no-selector, namespace: shop}
spec:
  converters: {nodeNameConverter: {convertType: remove}}
""", "spec.labelSelector: Required value"),
    ("""apiVersion: kosmos.io/v1alpha1
kind: ClusterPodConvertPolicy
metadata: {name: no-type}
spec:
  labelSelector: {}
  converters: {schedulerNameConverter: {schedulerName: s}}
""", "convertType: Required value"),
    ("""apiVersion: kosmos.io/v1alpha1
kind: ClusterPodConvertPolicy
metadata: {name: toleration-object}
spec:
  labelSelector: {}
  converters: {tolerationConverter: {convertType: add, tolerations: "key=k"}}
""", "tolerations: Invalid value"),
], ids=["unknown-convertType", "missing-labelSelector", "missing-convertType", "tolerations-not-a-list"])
def test_the_schema_refuses_bad_policies(root: Api, doc: str, expect: str) -> None:
    p = kubectl(root.host, "create", "-f", "-", stdin=doc)
    assert p.returncode != 0, p.stdout
    assert expect in p.stderr, p.stderr


def test_convert_policies_follow_the_root_and_ignore_an_unusable_policy(root: Api,
                                                                       policies: cv.ConvertPolicies) -> None:
    virtual_node(root, "kosmos-leaf1", "leaf1")
    hook = policies.converter("leaf1")
    leaf, rootpod = pods(namespace="shop")
    assert hook(leaf, rootpod) == leaf  # no policy yet

    root.create(POD_POLICIES, policy("b-web", namespace="shop", labels={"app": "web"}, converters=scheduler("b")))
    wait_until(lambda: hook(leaf, rootpod)["spec"].get("schedulerName") == "b", 10, "b-web applied")
    # A selector the schema lets through but no API server could compile: logged, listed, ignored.
    root.create(POD_POLICIES, policy("a-broken", namespace="shop",
                                     labelSelector={"matchExpressions": [{"key": "app", "operator": "In"}]},
                                     converters=scheduler("a")))
    assert policies.metrics is not None
    registry = policies.metrics.registry
    # Counted when it arrives (no pod converted meanwhile).
    wait_until(lambda: registry.get_sample_value("fabric_tree_convert_policy_errors") == 1, 10,
               "the broken policy counted")
    assert list(policies.errors) == ["PodConvertPolicy shop/a-broken"]
    assert "spec.labelSelector.matchExpressions[0]" in policies.errors["PodConvertPolicy shop/a-broken"]
    assert hook(leaf, rootpod)["spec"]["schedulerName"] == "b"
    # Fixed: it sorts first, so it wins.
    fixed = root.get(resource_path(cv.GROUP_VERSION, cv.POD_POLICIES, "shop", "a-broken"))
    fixed["spec"]["labelSelector"] = {"matchLabels": {"app": "web"}}
    root.update(resource_path(cv.GROUP_VERSION, cv.POD_POLICIES, "shop", "a-broken"), fixed)
    wait_until(lambda: hook(leaf, rootpod)["spec"].get("schedulerName") == "a", 10, "a-broken, fixed, applied")
    assert policies.errors == {}
    assert registry.get_sample_value("fabric_tree_convert_policy_errors") == 0
    # A cluster policy that matches beats both.
    root.create(CLUSTER_POLICIES, policy("z", converters=scheduler("z")))
    wait_until(lambda: hook(leaf, rootpod)["spec"].get("schedulerName") == "z", 10, "the cluster policy applied")
    root.request("DELETE", resource_path(cv.GROUP_VERSION, cv.CLUSTER_POLICIES, name="z"))
    wait_until(lambda: hook(leaf, rootpod)["spec"].get("schedulerName") == "a", 10, "back to a-broken")


def test_not_ready_until_listed_and_while_a_needed_virtual_node_is_unknown(root: Api) -> None:
    nodes: dict[str, Obj] = {}
    p = cv.ConvertPolicies(root, nodes=nodes.get)
    leaf, rootpod = pods(namespace="shop")
    with pytest.raises(cv.ConvertNotReady):
        p.converter("leaf1")(leaf, rootpod)  # not started: nothing listed
    root.create(CLUSTER_POLICIES, policy("everywhere", converters=scheduler("all")))
    root.create(CLUSTER_POLICIES, policy("a-zoned", node={"matchLabels": {"zone": "z1"}}, labels={"app": "db"},
                                         converters=scheduler("z1")))
    p.start()
    try:
        assert p.wait_synced(10)
        wait_until(lambda: len(p.policies()) == 2, 10, "both policies listed")
        # No policy selecting app=web looks at the node: no need to know it.
        assert p.converter("leaf1")(leaf, rootpod)["spec"]["schedulerName"] == "all"
        leaf, rootpod = pods(labels={"app": "db"}, namespace="shop")
        with pytest.raises(cv.ConvertNotReady, match="virtual node kosmos-leaf1 unknown"):
            p.converter("leaf1")(leaf, rootpod)
        nodes["kosmos-leaf1"] = {"metadata": {"name": "kosmos-leaf1", "labels": {"zone": "z1"}}}
        assert p.converter("leaf1")(leaf, rootpod)["spec"]["schedulerName"] == "z1"
    finally:
        p.stop()


def test_without_the_crds_there_are_no_policies_and_nothing_waits() -> None:
    with ServerThread(name="convert-no-crd") as s:
        p = cv.ConvertPolicies(Api(s.url))
        p.start()
        try:
            assert p.wait_synced(10)
            assert not p.cluster_informer.served and not p.pod_informer.served
            leaf, rootpod = pods()
            assert p.converter("leaf1")(leaf, rootpod) == leaf
        finally:
            p.stop()


def test_the_readme_example_is_a_usable_policy() -> None:
    readme = (REPO / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "ConvertPolicy" in b]
    (p,) = loaded(yaml.safe_load(block))
    leaf, root = pods(labels={"app": "trainer"})
    out = cv.convert(leaf, root, cluster="leaf1", node_labels={}, policies=[p])
    assert out["spec"]["schedulerName"] == "volcano" and out["spec"]["nodeSelector"] == {"accelerator": "nvidia-a100"}


def test_a_leaf_pod_with_null_annotations_or_spec_fields_is_converted() -> None:
    leaf, root = pods()
    leaf["metadata"]["annotations"] = None
    out = run(leaf, root, policy("p", converters=scheduler("s")))
    assert out["metadata"]["annotations"] == {cv.POLICY_ANNOTATION: "p"}
    leaf["spec"]["nodeSelector"] = None
    out = run(leaf, root, policy("p", converters={"nodeSelectorConverter": {"convertType": "add",
                                                                            "nodeSelector": {"a": "b"}}}))
    assert out["spec"]["nodeSelector"] == {"a": "b"}
