"""VolumeBinding and VolumeZone: bound PVs' node affinity, unbound immediate claims,
WaitForFirstConsumer (static PV on the node, provisioner, selected-node), Reserve/PreBind writes
through the handle's api_patch and the bounded wait for the bind."""

from __future__ import annotations

import threading
from typing import Any

from scheduler.framework import Code, CycleState
from scheduler.plugins.volumebinding import (
    ANN_BIND_COMPLETED,
    ANN_SELECTED_NODE,
    VolumeBinding,
    VolumeZone,
)
from scheduler.podutil import new_pod_info
from tests.sched_builders import FakeHandle, node, pod, run_filter, snapshot

NODE_CONFLICT = "node(s) had volume node affinity conflict"
BIND_CONFLICT = "node(s) didn't find available persistent volumes to bind"
OK = (Code.SUCCESS, ())
UR = Code.UNSCHEDULABLE_AND_UNRESOLVABLE


def pvc(name: str, cls: str = "", volume: str = "", size: str = "1Gi", **ann: str) -> dict:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if cls:
        spec["storageClassName"] = cls
    if volume:
        spec["volumeName"] = volume
    return {"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}",
                         "annotations": {k.replace("__", "/"): v for k, v in ann.items()}}, "spec": spec}


def pv(name: str, cls: str = "", size: str = "1Gi", host: str | None = None, labels: dict | None = None,
       claim: str | None = None) -> dict:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": size}}
    if cls:
        spec["storageClassName"] = cls
    if host:
        spec["nodeAffinity"] = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [host]}]}]}}
    if claim:
        spec["claimRef"] = {"namespace": "default", "name": claim}
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec,
            "status": {"phase": "Bound" if claim else "Available"}}


def sc(name: str, wffc: bool = True, provisioner: str = "lab.kosmos.io/hostpath",
       topologies: list | None = None) -> dict:
    o: dict[str, Any] = {"metadata": {"name": name}, "provisioner": provisioner,
                         "volumeBindingMode": "WaitForFirstConsumer" if wffc else "Immediate"}
    if topologies:
        o["allowedTopologies"] = topologies
    return o


def using(*claims: str) -> dict:
    return pod("user", volumes=[{"name": c, "persistentVolumeClaim": {"claimName": c}} for c in claims])


def nodes() -> list:
    return [node(n, labels={"kubernetes.io/hostname": n, "topology.kubernetes.io/zone": z})
            for n, z in (("n1", "z1"), ("n2", "z2"))]


def run(p: dict, pvcs: list, pvs: list, classes: list) -> tuple[dict[str, tuple], VolumeBinding, FakeHandle,
                                                             CycleState]:
    infos = snapshot(nodes())
    h = FakeHandle(infos, {"persistentvolumeclaims": pvcs, "persistentvolumes": pvs, "storageclasses": classes})
    vb = VolumeBinding(h, {})
    state = CycleState()
    got = {k: (v.code, v.reasons) for k, v in run_filter(vb, p, infos, state).items()}
    return got, vb, h, state


def test_no_claims_skips() -> None:
    got, *_ = run(pod(), [], [], [])
    assert got == {"n1": OK, "n2": OK}


def test_missing_and_immediate_claims() -> None:
    got, *_ = run(using("data"), [], [], [])
    assert got["n1"] == (UR, ('persistentvolumeclaim "data" not found',))
    got, *_ = run(using("data"), [pvc("data", "fast")], [], [sc("fast", wffc=False)])
    assert got["n1"] == (UR, ("pod has unbound immediate PersistentVolumeClaims",))
    got, *_ = run(using("data"), [pvc("data")], [], [])  # no class: immediate binding
    assert got["n1"] == (UR, ("pod has unbound immediate PersistentVolumeClaims",))
    got, *_ = run(using("data"), [pvc("data", "nope")], [], [])
    assert got["n1"] == (Code.ERROR, ('storageclass.storage.k8s.io "nope" not found',))


def test_bound_pv_node_affinity() -> None:
    got, *_ = run(using("data"), [pvc("data", "local", volume="pv1")], [pv("pv1", "local", host="n2", claim="data")],
                  [sc("local")])
    assert got == {"n1": (UR, (NODE_CONFLICT,)), "n2": OK}
    got, *_ = run(using("data"), [pvc("data", "local", volume="gone")], [], [sc("local")])
    assert got["n1"] == (UR, ("node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)",))


def test_wffc_static_pv_on_the_node() -> None:
    classes = [sc("local", provisioner="kubernetes.io/no-provisioner")]
    got, *_ = run(using("data"), [pvc("data", "local")], [pv("small", "local", size="512Mi", host="n1"),
                                                          pv("pv2", "local", host="n2")], classes)
    assert got == {"n1": (UR, (BIND_CONFLICT,)), "n2": OK}
    # two claims cannot share the node's only PV
    got, *_ = run(using("a", "b"), [pvc("a", "local"), pvc("b", "local")], [pv("pv2", "local", host="n2")], classes)
    assert got["n2"] == (UR, (BIND_CONFLICT,))


def test_wffc_provisioner_and_topology() -> None:
    topo = [{"matchLabelExpressions": [{"key": "topology.kubernetes.io/zone", "values": ["z2"]}]}]
    got, *_ = run(using("data"), [pvc("data", "dyn")], [], [sc("dyn", topologies=topo)])
    assert got == {"n1": (UR, (BIND_CONFLICT,)), "n2": OK}
    # a node already selected for the claim is the only one
    got, *_ = run(using("data"), [pvc("data", "dyn", **{"volume.kubernetes.io__selected-node": "n1"})], [],
                  [sc("dyn")])
    assert got == {"n1": OK, "n2": (UR, (BIND_CONFLICT,))}


def _bind_in_background(h: FakeHandle, claim: str, volume: str) -> threading.Thread:
    def bind() -> None:
        obj = h.listers["persistentvolumeclaims"][f"default/{claim}"]
        new = {**obj, "spec": {**obj["spec"], "volumeName": volume},
               "metadata": {**obj["metadata"], "annotations": {**obj["metadata"]["annotations"],
                                                               ANN_BIND_COMPLETED: "yes"}}}
        h.listers["persistentvolumeclaims"][f"default/{claim}"] = new
    t = threading.Timer(0.05, bind)
    t.start()
    return t


def test_prebind_provision_sets_selected_node_and_waits() -> None:
    p = using("data")
    got, vb, h, state = run(p, [pvc("data", "dyn")], [], [sc("dyn")])
    assert got["n2"] == OK
    pi = new_pod_info(p)
    assert vb.reserve(state, pi, "n2").ok
    t = _bind_in_background(h, "data", "pvc-123")
    st = vb.pre_bind(state, pi, "n2")
    t.join()
    assert st.ok, st
    assert h.patches == [("/api/v1/namespaces/default/persistentvolumeclaims/data",
                          {"metadata": {"annotations": {ANN_SELECTED_NODE: "n2"}}})]


def test_a_virtual_node_binds_nothing_and_waits_for_nothing() -> None:
    """On a ClusterTree virtual node the leaf provisions the claim once the pod is there (the
    tree manager mirrors the PV back): Reserve and PreBind write and wait for nothing, else the
    pod would wait for a binding only its arrival in the leaf can make (Kosmos'
    LeafNodeVolumeBinding skips them on leaf nodes too). A real node still gets selected-node."""
    p = using("data")
    infos = snapshot([*nodes(), node("vn", labels={"kubernetes.io/hostname": "vn", "kosmos.io/node": "true"})])
    h = FakeHandle(infos, {"persistentvolumeclaims": [pvc("data", "dyn")], "persistentvolumes": [],
                           "storageclasses": [sc("dyn")]})
    vb = VolumeBinding(h, {})
    vb.bind_timeout = 0.2
    state = CycleState()
    got = {k: (v.code, v.reasons) for k, v in run_filter(vb, p, infos, state).items()}
    assert got == {"n1": OK, "n2": OK, "vn": OK}
    pi = new_pod_info(p)
    assert vb.reserve(state, pi, "vn").ok
    assert vb.pre_bind(state, pi, "vn").ok
    assert h.patches == []
    st = vb.pre_bind(state, pi, "n1")  # nothing binds it here: times out, having asked for n1
    assert st.code == Code.ERROR and h.patches == [("/api/v1/namespaces/default/persistentvolumeclaims/data",
                                                    {"metadata": {"annotations": {ANN_SELECTED_NODE: "n1"}}})]


def test_prebind_static_binds_pv_and_assumes_it() -> None:
    p = using("data")
    classes = [sc("local", provisioner="kubernetes.io/no-provisioner")]
    got, vb, h, state = run(p, [pvc("data", "local")], [pv("pv1", "local", host="n1")], classes)
    assert got == {"n1": OK, "n2": (UR, (BIND_CONFLICT,))}
    pi = new_pod_info(p)
    assert vb.reserve(state, pi, "n1").ok
    # while assumed, another pod's claim cannot take pv1
    other = pod("other", volumes=[{"name": "x", "persistentVolumeClaim": {"claimName": "x"}}])
    h.add("persistentvolumeclaims", pvc("x", "local"))
    st2 = CycleState()
    assert run_filter(vb, other, h.snap.infos, st2)["n1"].reasons == (BIND_CONFLICT,)
    t = _bind_in_background(h, "data", "pv1")
    st = vb.pre_bind(state, pi, "n1")
    t.join()
    assert st.ok, st
    path, body = h.patches[0]
    assert path == "/api/v1/persistentvolumes/pv1"
    assert body["spec"]["claimRef"]["name"] == "data" and body["spec"]["claimRef"]["uid"] == "uid-data"
    # once bound the assumption is gone
    assert not vb._assumed


def test_prebind_times_out_and_unreserve_forgets() -> None:
    p = using("data")
    classes = [sc("local", provisioner="kubernetes.io/no-provisioner")]
    got, vb, _h, state = run(p, [pvc("data", "local")], [pv("pv1", "local", host="n1")], classes)
    assert got["n1"] == OK
    vb.bind_timeout = 0.2
    pi = new_pod_info(p)
    assert vb.reserve(state, pi, "n1").ok
    st = vb.pre_bind(state, pi, "n1")
    assert st.code == Code.ERROR and "timed out waiting for the condition" in st.message()
    vb.unreserve(state, pi, "n1")
    assert not vb._assumed


def test_volume_zone() -> None:
    p = using("data")
    infos = snapshot(nodes())
    h = FakeHandle(infos, {"persistentvolumeclaims": [pvc("data", volume="pv1")],
                           "persistentvolumes": [pv("pv1", labels={"topology.kubernetes.io/zone": "z1__z3"},
                                                    claim="data")]})
    got = {k: (v.code, v.reasons) for k, v in run_filter(VolumeZone(h, {}), p, infos).items()}
    assert got == {"n1": OK, "n2": (UR, ("node(s) had no available volume zone",))}
