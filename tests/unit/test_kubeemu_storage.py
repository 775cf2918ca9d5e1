"""Storage in the lab's Kubernetes: the PV binder, WaitForFirstConsumer, the ``lab.kosmos.io/local``
provisioner (directories under a tmp storage root), reclaim Delete/Retain, the PVC/PV protection
finalizers, expansion, and a controller-manager restart that must not provision twice.

Each test runs a kubeemu ServerThread and the storage controllers of ``python -m kubeemu.ctrl``
(in a thread of their own, through :func:`kubeemu.ctrl.manager.run`, as the process does), and
acts as a user would: plain HTTP, and kubectl where its error text matters. There is no kubelet
here: pods are bound by ``spec.nodeName`` and a test marks a pod Running itself when it needs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from kubeemu.ctrl import manager, volume
from kubeemu.lab import write_kubeconfig
from kubeemu.runner import ServerThread
from tests.waiting import wait_until

pytestmark = pytest.mark.unit

NAMES = ["persistentvolume-binder", "pvc-protection", "pv-protection", "persistentvolume-expander",
         "lab-local-provisioner"]


class ControllerManager:
    """The storage controllers against ``url`` on a private event loop in a thread."""

    def __init__(self, url: str, root: Path, node_selector: str | None = None) -> None:
        self.url, self.root, self.node_selector = url, root, node_selector
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.task: Future[None] | None = None
        self._inner: asyncio.Task[None] | None = None
        self._started = threading.Event()

    async def _main(self) -> None:
        known = manager.registry(manager.Options(storage_root=self.root, storage_node_selector=self.node_selector))
        self._inner = asyncio.create_task(manager.run(self.url, NAMES, known))
        self._started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._inner

    def start(self) -> ControllerManager:
        self.thread.start()
        self.task = asyncio.run_coroutine_threadsafe(self._main(), self.loop)
        self._started.wait(10)
        return self

    def stop(self) -> None:
        """Cancel and wait for the clean end (informers stopped, client closed); a controller
        bug that ended the run early is raised here."""
        assert self.task is not None and self._inner is not None
        self.loop.call_soon_threadsafe(self._inner.cancel)
        try:
            self.task.result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class Api:
    """Plain HTTP to the emulator; raises on unexpected status codes with the server's message."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def ok(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        code, out = self.call(method, path, body, ctype)
        assert code < 300, f"{method} {path}: {code} {out.get('message')}"
        return out

    def get(self, path: str) -> Any:
        code, out = self.call("GET", path)
        if code == 404:
            return None
        assert code == 200, f"GET {path}: {code} {out}"
        return out

    def pvc(self, ns: str, name: str) -> Any:
        return self.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}")

    def pv(self, name: str) -> Any:
        return self.get(f"/api/v1/persistentvolumes/{name}")

    def pvs(self) -> list[Any]:
        return list(self.ok("GET", "/api/v1/persistentvolumes")["items"])

    def events(self, ns: str, name: str, kind: str = "PersistentVolumeClaim") -> list[tuple[str, str, str]]:
        """Events about object ``kind`` ``ns/name``, found as kubectl describe finds them."""
        sel = f"involvedObject.name%3D{name},involvedObject.kind%3D{kind},involvedObject.namespace%3D{ns}"
        items = self.ok("GET", f"/api/v1/namespaces/{ns}/events?fieldSelector={sel}")["items"]
        return [(e["type"], e["reason"], e["message"]) for e in items]


@pytest.fixture
def emu() -> Iterator[ServerThread]:
    with ServerThread(name="storage", service_cidrs=("10.96.0.0/24",), bookmark_interval=0.3) as s:
        yield s


@pytest.fixture
def api(emu: ServerThread) -> Api:
    a = Api(emu.url)
    for node in ("node-a", "node-b"):
        a.ok("POST", "/api/v1/nodes", {"metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}}})
    a.ok("POST", "/apis/storage.k8s.io/v1/storageclasses", volume.default_storage_class())
    retain = volume.default_storage_class("lab-retain")
    retain["metadata"]["annotations"] = {}
    retain["reclaimPolicy"] = "Retain"
    retain["allowVolumeExpansion"] = False
    a.ok("POST", "/apis/storage.k8s.io/v1/storageclasses", retain)
    return a


@pytest.fixture
def ctrl(emu: ServerThread, tmp_path: Path) -> Iterator[ControllerManager]:
    cm = ControllerManager(emu.url, tmp_path / "volumes").start()
    yield cm
    cm.stop()


def claim(name: str, size: str = "1Gi", cls: str | None = "lab-local", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
                            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}},
                                     **spec}}
    if cls is not None:
        body["spec"]["storageClassName"] = cls
    return body


def static_pv(name: str, size: str, cls: str = "manual", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"], "storageClassName": cls,
                     "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/tmp/{name}"}, **spec}}


def pod(name: str, claim_name: str, node: str | None = "node-a") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "busybox:1.36"}],
                            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim_name}}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def bound(api: Api, ns: str, name: str) -> Any:
    pvc = api.pvc(ns, name)
    return pvc if pvc and (pvc.get("status") or {}).get("phase") == "Bound" else None


PVCS = "/api/v1/namespaces/default/persistentvolumeclaims"
PODS = "/api/v1/namespaces/default/pods"


def test_binds_smallest_matching_static_volume(api: Api, ctrl: ControllerManager) -> None:
    api.ok("POST", "/api/v1/persistentvolumes", static_pv("big", "10Gi"))
    api.ok("POST", "/api/v1/persistentvolumes", static_pv("small", "2Gi"))
    api.ok("POST", "/api/v1/persistentvolumes", static_pv("other-class", "1Gi", cls="fast"))
    api.ok("POST", "/api/v1/persistentvolumes", static_pv("rwx", "1Gi", accessModes=["ReadWriteMany"]))
    wait_until(lambda: all(((api.pv(n) or {}).get("status") or {}).get("phase") == "Available"
                           for n in ("big", "small")), 10, "static PVs Available")
    api.ok("POST", PVCS, claim("data", "1Gi", "manual"))
    pvc = wait_until(lambda: bound(api, "default", "data"), 10, "claim data Bound")
    assert pvc["spec"]["volumeName"] == "small"
    ann = pvc["metadata"]["annotations"]
    assert ann["pv.kubernetes.io/bind-completed"] == "yes" and ann["pv.kubernetes.io/bound-by-controller"] == "yes"
    assert pvc["status"]["capacity"] == {"storage": "2Gi"} and pvc["status"]["accessModes"] == ["ReadWriteOnce"]
    pv = wait_until(lambda: (p := api.pv("small")) and p["status"]["phase"] == "Bound" and p, 10, "small Bound")
    assert pv["spec"]["claimRef"]["uid"] == pvc["metadata"]["uid"]
    assert pv["metadata"]["annotations"]["pv.kubernetes.io/bound-by-controller"] == "yes"
    assert "kubernetes.io/pv-protection" in wait_until(lambda: (api.pv("small") or {})["metadata"].get("finalizers"),
                                                      10, "pv-protection finalizer")
    assert "kubernetes.io/pvc-protection" in wait_until(
        lambda: (api.pvc("default", "data") or {})["metadata"].get("finalizers"), 10, "pvc-protection finalizer")
    # a selector no volume matches keeps a claim Pending; a volume pre-bound by claimRef is taken
    api.ok("POST", PVCS, claim("picky", "1Gi", "manual", selector={"matchLabels": {"tier": "gold"}}))
    api.ok("POST", "/api/v1/persistentvolumes",
           static_pv("reserved", "5Gi", claimRef={"namespace": "default", "name": "wants-reserved"}))
    api.ok("POST", PVCS, claim("wants-reserved", "1Gi", "manual"))
    assert wait_until(lambda: bound(api, "default", "wants-reserved"), 10, "pre-bound claim")["spec"][
        "volumeName"] == "reserved"
    assert api.pvc("default", "picky")["status"]["phase"] == "Pending"
    assert api.pv("big")["status"]["phase"] == "Available"


def test_wait_for_first_consumer_then_provisions_on_the_pods_node(api: Api, ctrl: ControllerManager) -> None:
    api.ok("POST", PVCS, claim("web-data"))
    wait_until(lambda: ("Normal", "WaitForFirstConsumer", "waiting for first consumer to be created before binding")
               in api.events("default", "web-data"), 10, "WaitForFirstConsumer event")
    api.ok("POST", PODS, pod("unscheduled", "web-data", node=None))
    wait_until(lambda: ("Normal", "WaitForPodScheduled", "waiting for pod unscheduled to be scheduled")
               in api.events("default", "web-data"), 20, "WaitForPodScheduled event")
    assert api.pvs() == [] and api.pvc("default", "web-data")["status"]["phase"] == "Pending"
    api.ok("POST", PODS, pod("web", "web-data", node="node-b"))
    pvc = wait_until(lambda: bound(api, "default", "web-data"), 10, "claim Bound after its pod is on a node")
    ann = pvc["metadata"]["annotations"]
    assert ann["volume.kubernetes.io/selected-node"] == "node-b"
    assert ann["volume.kubernetes.io/storage-provisioner"] == "lab.kosmos.io/local"
    uid = pvc["metadata"]["uid"]
    assert pvc["spec"]["volumeName"] == f"pvc-{uid}"
    pv = api.pv(f"pvc-{uid}")
    path = ctrl.root.resolve() / "node-b" / f"pvc-{uid}"
    assert pv["spec"]["local"]["path"] == str(path) and path.is_dir()
    assert pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-b"]}]}]
    assert pv["spec"]["capacity"] == {"storage": "1Gi"}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete" and pv["spec"]["storageClassName"] == "lab-local"
    assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == "lab.kosmos.io/local"
    def reasons_seen() -> set[str]:
        return {r for _, r, _ in api.events("default", "web-data")}

    reasons = wait_until(lambda: "ProvisioningSucceeded" in reasons_seen() and reasons_seen(), 10,
                         "ProvisioningSucceeded event")
    assert {"ExternalProvisioning", "Provisioning", "ProvisioningSucceeded"} <= reasons


def test_a_node_outside_the_storage_node_selector_is_left_to_others(api: Api, emu: ServerThread,
                                                                    tmp_path: Path) -> None:
    """``--storage-node-selector``: a claim whose consumer is on a node the provisioner does not
    serve (a ClusterTree virtual node, provisioned by its leaf) gets no volume, no failure event,
    and keeps its selected node; the served nodes are provisioned as before."""
    api.ok("POST", "/api/v1/nodes", {"metadata": {"name": "virt", "labels": {"kubernetes.io/hostname": "virt",
                                                                             "kosmos.io/node": "true"}}})
    cm = ControllerManager(emu.url, tmp_path / "volumes", node_selector="kosmos.io/node!=true").start()
    try:
        api.ok("POST", PVCS, claim("far"))
        api.ok("POST", PODS, pod("far", "far", node="virt"))
        wait_until(lambda: (api.pvc("default", "far")["metadata"].get("annotations") or {}).get(
            "volume.kubernetes.io/selected-node") == "virt", 10, "claim far's selected node")
        api.ok("POST", PVCS, claim("near"))
        api.ok("POST", PODS, pod("near", "near", node="node-a"))
        near = wait_until(lambda: bound(api, "default", "near"), 10, "claim near Bound")
        assert [p["metadata"]["name"] for p in api.pvs()] == [near["spec"]["volumeName"]]
        far = api.pvc("default", "far")
        assert far["status"]["phase"] == "Pending" and not far["spec"].get("volumeName")
        assert far["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "virt"
        assert not [e for e in api.events("default", "far") if e[1].startswith("Provisioning")]
        assert not (tmp_path / "volumes" / "virt").exists()
    finally:
        cm.stop()


def test_reclaim_delete_removes_directory_and_retain_keeps_it(api: Api, ctrl: ControllerManager) -> None:
    for name, cls in (("gone", "lab-local"), ("kept", "lab-retain")):
        api.ok("POST", PVCS, claim(name, cls=cls))
        api.ok("POST", PODS, pod(f"use-{name}", name))
    pvcs = {n: wait_until(functools.partial(bound, api, "default", n), 10, f"{n} Bound") for n in ("gone", "kept")}
    dirs = {n: Path(api.pv(p["spec"]["volumeName"])["spec"]["local"]["path"]) for n, p in pvcs.items()}
    for d in dirs.values():
        (d / "file").write_text("data\n")
    for n in ("gone", "kept"):
        api.ok("DELETE", f"{PVCS}/{n}")
        # pvc-protection: a scheduled pod still references it
        assert api.pvc("default", n)["metadata"]["deletionTimestamp"]
    assert all(api.pvc("default", n) for n in ("gone", "kept"))
    for n in ("gone", "kept"):
        api.ok("DELETE", f"{PODS}/use-{n}")
    gone_pv, kept_pv = pvcs["gone"]["spec"]["volumeName"], pvcs["kept"]["spec"]["volumeName"]
    wait_until(lambda: api.pvc("default", "gone") is None and api.pvc("default", "kept") is None, 10, "claims gone")
    wait_until(lambda: api.pv(gone_pv) is None, 10, "the Delete volume removed")
    assert not dirs["gone"].exists()
    kept = wait_until(lambda: (p := api.pv(kept_pv)) and p["status"]["phase"] == "Released" and p, 10, "Released")
    assert (dirs["kept"] / "file").read_text() == "data\n"
    assert kept["spec"]["claimRef"]["name"] == "kept"


def test_pv_protection_holds_a_bound_volume(api: Api, ctrl: ControllerManager) -> None:
    api.ok("POST", "/api/v1/persistentvolumes", static_pv("held", "1Gi"))
    api.ok("POST", PVCS, claim("holder", "1Gi", "manual"))
    wait_until(lambda: bound(api, "default", "holder"), 10, "holder Bound")
    wait_until(lambda: "kubernetes.io/pv-protection" in (api.pv("held")["metadata"].get("finalizers") or []), 10,
               "pv-protection finalizer")
    api.ok("DELETE", "/api/v1/persistentvolumes/held")
    assert api.pv("held")["metadata"]["deletionTimestamp"]
    assert bound(api, "default", "holder")
    api.ok("DELETE", f"{PVCS}/holder")
    wait_until(lambda: api.pv("held") is None, 10, "the released volume finally deleted")


def test_expansion_online_and_refusals(api: Api, ctrl: ControllerManager, emu: ServerThread, tmp_path: Path) -> None:
    api.ok("POST", PVCS, claim("grow"))
    api.ok("POST", PODS, pod("grower", "grow"))
    pvc = wait_until(lambda: bound(api, "default", "grow"), 10, "grow Bound")
    pv_name = pvc["spec"]["volumeName"]
    patch = {"spec": {"resources": {"requests": {"storage": "3Gi"}}}}
    api.ok("PATCH", f"{PVCS}/grow", patch, "application/merge-patch+json")
    # no pod runs it yet: the node part waits
    pending = wait_until(lambda: (p := api.pvc("default", "grow")) and any(
        c["type"] == "FileSystemResizePending" for c in p["status"].get("conditions") or []) and p, 10,
        "FileSystemResizePending")
    assert pending["status"]["capacity"] == {"storage": "1Gi"}
    assert pending["status"]["allocatedResources"] == {"storage": "3Gi"}
    assert pending["status"]["allocatedResourceStatuses"] == {"storage": "NodeResizePending"}
    assert api.pv(pv_name)["spec"]["capacity"] == {"storage": "3Gi"}
    running = api.ok("GET", f"{PODS}/grower")
    running["status"]["phase"] = "Running"
    api.ok("PUT", f"{PODS}/grower/status", running)
    done = wait_until(lambda: (p := api.pvc("default", "grow")) and p["status"]["capacity"] == {"storage": "3Gi"}
                      and p, 10, "status.capacity grown")
    assert not done["status"].get("conditions") and "allocatedResourceStatuses" not in done["status"]
    assert done["status"]["allocatedResources"] == {"storage": "3Gi"}
    reasons = {r for _, r, _ in api.events("default", "grow")}
    assert {"ExternalExpanding", "Resizing", "FileSystemResizeRequired"} <= reasons
    # Recorded after the claim's status, as the kubelet does (its events go out asynchronously):
    # the grown capacity can be read before it (CI saw that once).
    wait_until(lambda: any(r == "FileSystemResizeSuccessful" for _, r, _ in api.events("default", "grower", "Pod")),
               10, "FileSystemResizeSuccessful on the pod")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl binary on PATH")
    cfg = write_kubeconfig(tmp_path / "kubeconfig", {"emu": emu.url})

    def kc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([kubectl, "--kubeconfig", str(cfg), *args], capture_output=True, text=True, timeout=60)

    table = kc("get", "pvc", "grow", "--no-headers").stdout.split()
    assert table[:5] == ["grow", "Bound", pv_name, "3Gi", "RWO"], table
    sc = kc("get", "storageclass", "lab-local", "--no-headers").stdout.split()
    assert sc[:6] == ["lab-local", "(default)", "lab.kosmos.io/local", "Delete", "WaitForFirstConsumer", "true"], sc
    pv = kc("get", "pv", pv_name, "--no-headers").stdout.split()
    assert pv[:6] == [pv_name, "3Gi", "RWO", "Delete", "Bound", "default/grow"], pv
    shrink = kc("patch", "pvc", "grow", "-p", '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}')
    assert shrink.returncode != 0
    assert "spec.resources.requests.storage: Forbidden: field can not be less than previous value" in shrink.stderr
    api.ok("POST", PVCS, claim("fixed", cls="lab-retain"))
    api.ok("POST", PODS, pod("fixer", "fixed"))
    wait_until(lambda: bound(api, "default", "fixed"), 10, "fixed Bound")
    grow = kc("patch", "pvc", "fixed", "-p", '{"spec":{"resources":{"requests":{"storage":"5Gi"}}}}')
    assert grow.returncode != 0
    assert ('persistentvolumeclaims "fixed" is forbidden: only dynamically provisioned pvc can be resized and the '
            "storageclass that provisions the pvc must support resize") in grow.stderr


def test_restart_provisions_nothing_twice(api: Api, emu: ServerThread, tmp_path: Path) -> None:
    root = tmp_path / "volumes"
    first = ControllerManager(emu.url, root).start()
    try:
        api.ok("POST", PVCS, claim("keep"))
        api.ok("POST", PODS, pod("keeper", "keep"))
        pvc = wait_until(lambda: bound(api, "default", "keep"), 10, "keep Bound")
    finally:
        first.stop()
    # a claim left half-way: the provisioner made its PV and died before the binder bound it
    half_body = claim("half")
    half_body["metadata"]["annotations"] = {"volume.kubernetes.io/selected-node": "node-a",
                                            "volume.kubernetes.io/storage-provisioner": "lab.kosmos.io/local"}
    made = api.ok("POST", PVCS, half_body)
    api.ok("POST", PODS, pod("halfer", "half"))
    half_pv = f"pvc-{made['metadata']['uid']}"
    (root / "node-a" / half_pv).mkdir(parents=True)
    api.ok("POST", "/api/v1/persistentvolumes", {
        "metadata": {"name": half_pv, "annotations": {"pv.kubernetes.io/provisioned-by": "lab.kosmos.io/local"}},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "lab-local",
                 "persistentVolumeReclaimPolicy": "Delete", "local": {"path": str(root / "node-a" / half_pv)},
                 "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": "default",
                              "name": "half", "uid": made["metadata"]["uid"]},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]}]}]}}}})
    second = ControllerManager(emu.url, root).start()
    try:
        half = wait_until(lambda: bound(api, "default", "half"), 10, "half Bound after the restart")
        assert half["spec"]["volumeName"] == half_pv
        api.ok("POST", PVCS, claim("after"))
        api.ok("POST", PODS, pod("afterer", "after"))
        wait_until(lambda: bound(api, "default", "after"), 10, "a new claim served by the new controllers")
        names = sorted(p["metadata"]["name"] for p in api.pvs())
        want = sorted(f"pvc-{p['metadata']['uid']}" for p in (pvc, half, api.pvc("default", "after")))
        assert names == want
        assert bound(api, "default", "keep")["spec"]["volumeName"] == f"pvc-{pvc['metadata']['uid']}"
        assert sorted(p.name for p in (root / "node-a").iterdir()) == want
    finally:
        second.stop()


def test_claim_without_class_gets_the_default_class_retroactively(api: Api, ctrl: ControllerManager) -> None:
    api.ok("POST", PVCS, claim("classless", cls=None))
    api.ok("POST", PVCS, claim("explicitly-none", cls=""))
    got = wait_until(lambda: (api.pvc("default", "classless") or {})["spec"].get("storageClassName"), 10,
                     "the default class assigned")
    assert got == "lab-local"
    api.ok("POST", PODS, pod("classless-user", "classless"))
    wait_until(lambda: bound(api, "default", "classless"), 10, "classless Bound through lab-local")
    wait_until(lambda: ("Normal", "FailedBinding",
                        "no persistent volumes available for this claim and no storage class is set")
               in api.events("default", "explicitly-none"), 10, "FailedBinding for the class-less claim")
    assert api.pvc("default", "explicitly-none")["spec"]["storageClassName"] == ""


def test_lab_applies_the_default_storage_class(emu: ServerThread) -> None:
    from tools.lab.kube import apply_default_storage_class
    from tools.lab.state import ClusterRecord

    cluster = ClusterRecord("c1", "overlay", ["10.10.0.0/16"], ["10.96.0.0/24"], [], api_url=emu.url)
    apply_default_storage_class(cluster)
    apply_default_storage_class(cluster)  # again (a restarted lab): kept, no error
    sc = Api(emu.url).ok("GET", "/apis/storage.k8s.io/v1/storageclasses/lab-local")
    assert sc["metadata"]["annotations"] == {"storageclass.kubernetes.io/is-default-class": "true"}
    assert (sc["provisioner"], sc["volumeBindingMode"], sc["allowVolumeExpansion"], sc["reclaimPolicy"]) == (
        "lab.kosmos.io/local", "WaitForFirstConsumer", True, "Delete")


def test_wait_for_first_consumer_binds_the_static_volume_of_the_pods_node(api: Api, ctrl: ControllerManager) -> None:
    local = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "local-static"},
             "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"}
    api.ok("POST", "/apis/storage.k8s.io/v1/storageclasses", local)
    for node in ("node-a", "node-b"):
        api.ok("POST", "/api/v1/persistentvolumes", static_pv(
            f"disk-{node}", "5Gi", cls="local-static", local={"path": f"/mnt/{node}"},
            nodeAffinity={"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}))
    wait_until(lambda: all(((api.pv(f"disk-{n}") or {}).get("status") or {}).get("phase") == "Available"
                           for n in ("node-a", "node-b")), 10, "local PVs Available")
    api.ok("POST", PVCS, claim("local-data", cls="local-static"))
    wait_until(lambda: any(r == "WaitForFirstConsumer" for _, r, _ in api.events("default", "local-data")), 10,
               "WaitForFirstConsumer event")
    assert api.pv("disk-node-a")["status"]["phase"] == "Available"  # not bound before a consumer exists
    api.ok("POST", PODS, pod("local-user", "local-data", node="node-b"))
    pvc = wait_until(lambda: bound(api, "default", "local-data"), 10, "bound to the node-b disk")
    assert pvc["spec"]["volumeName"] == "disk-node-b"
    assert "volume.kubernetes.io/selected-node" not in pvc["metadata"].get("annotations", {})
    assert api.pv("disk-node-a")["status"]["phase"] == "Available"


def test_pending_claim_spec_is_immutable(api: Api) -> None:
    api.ok("POST", PVCS, claim("pending"))
    code, out = api.call("PATCH", f"{PVCS}/pending", {"spec": {"resources": {"requests": {"storage": "2Gi"}}}},
                         "application/merge-patch+json")
    assert code == 422 and out["reason"] == "Invalid"
    # 1.32's text with the VolumeAttributesClass feature gate off (its default)
    assert out["message"] == ('PersistentVolumeClaim "pending" is invalid: spec: Forbidden: spec is immutable after '
                              "creation except resources.requests for bound claims")
    code, out = api.call("PATCH", f"{PVCS}/pending", {"metadata": {"labels": {"tier": "db"}}},
                         "application/merge-patch+json")
    assert code == 200, out  # metadata stays mutable
