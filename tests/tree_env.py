"""A root cluster and leaf clusters for the tree manager's tests: in-process kubeemu servers
(``ServerThread`` on 127.0.0.1), the ``Cluster`` CRD installed in the root, a kubeconfig
Secret per leaf, and helpers to make leaf nodes and pods, Clusters, and read the virtual nodes.

:class:`TreeEnv` starts managers with short timings (probe every 0.2 s, NotReady after 1 s
without an answer, resync every second) and stops every manager and server at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kubeemu.ctrl import manager as ctrl_manager
from kubeemu.runner import ServerThread
from scheduler.kube import Api, ApiError, resource_path
from tests.waiting import wait_until
from tree.deps import Dependencies
from tree.leaf import Options
from tree.manager import TreeManager

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "deploy" / "base" / "host" / "crd-clusters.yaml"
CLUSTERS = resource_path("kosmos.io/v1alpha1", "clusters")
ROOT_ID = "root-under-test"
SECRET_NS = "kosmos-system"

Obj = dict[str, Any]


def leaf_kubeconfig(url: str, name: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": name,
                           "clusters": [{"name": name, "cluster": {"server": url}}],
                           "users": [{"name": name, "user": {}}],
                           "contexts": [{"name": name, "context": {"cluster": name, "user": name}}]})


class TreeEnv:
    def __init__(self, *, graceful_pods: bool = False) -> None:
        """``graceful_pods``: bound pods are deleted gracefully (they stay, with a
        deletionTimestamp, until deleted with grace 0), as in a real cluster; root and leaves."""
        self.graceful_pods = graceful_pods
        self.root_emu = ServerThread(name="root", bookmark_interval=0.3, graceful_pods=graceful_pods).start()
        self.root = Api(self.root_emu.url)
        self.leaves: dict[str, ServerThread] = {}
        self.managers: list[TreeManager] = []
        self.deps: list[Dependencies] = []
        self.controllers: list[Controllers] = []
        self.root.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(CRD.read_text()))
        self.root.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": SECRET_NS}})
        wait_until(lambda: self._served(), 10, "the Cluster CRD served")

    def _served(self) -> bool:
        try:
            self.root.get(CLUSTERS)
            return True
        except ApiError:
            return False

    def close(self) -> None:
        for d in self.deps:
            d.stop()
        for c in self.controllers:
            c.stop()
        for m in self.managers:
            m.stop()
        for emu in self.leaves.values():
            emu.stop()
        self.root_emu.stop()

    # ------------------------------------------------------------------ leaves

    def leaf(self, name: str) -> Api:
        if name not in self.leaves:
            self.leaves[name] = ServerThread(name=name, bookmark_interval=0.3,
                                             graceful_pods=self.graceful_pods).start()
        return Api(self.leaves[name].url)

    def fault(self, leaf: str, **faults: Any) -> None:
        """Faults of a leaf's server (``error_count``/``error_code``, ``latency_ms``); none: clear."""
        api = self.leaf(leaf)
        if faults:
            api.request("POST", "/_kubeemu/faults", faults)
        else:
            api.request("DELETE", "/_kubeemu/faults")

    def add_node(self, leaf: str, name: str, *, cpu: str = "4", memory: str = "8Gi", pods: str = "110",
                 labels: dict[str, str] | None = None, ready: bool = True, unschedulable: bool = False,
                 taints: list[Obj] | None = None) -> Obj:
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
                "spec": {"unschedulable": unschedulable, "taints": taints or []},
                "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": pods},
                           "capacity": {"cpu": cpu, "memory": memory, "pods": pods},
                           "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
        node: Obj = self.leaf(leaf).create("/api/v1/nodes", body)
        return node

    def patch_node(self, leaf: str, name: str, body: Obj, status: bool = False) -> None:
        self.leaf(leaf).patch(resource_path("v1", "nodes", name=name, sub="status" if status else None), body)

    def add_pod(self, leaf: str, name: str, *, node: str | None = None, cpu: str = "1", memory: str = "1Gi",
                labels: dict[str, str] | None = None, namespace: str = "default", **spec: Any) -> Obj:
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
                "spec": {"containers": [{"name": "c", "image": "busybox",
                                         "resources": {"requests": {"cpu": cpu, "memory": memory}}}], **spec}}
        if node:
            body["spec"]["nodeName"] = node
        pod: Obj = self.leaf(leaf).create(resource_path("v1", "pods", namespace), body)
        return pod

    # ------------------------------------------------------------------ root

    def add_cluster(self, name: str, leaf: str, *, enable: bool = True, **tree: Any) -> Obj:
        """A Cluster for ``leaf`` (its kubeconfig Secret made or updated first)."""
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-kubeconfig"},
                  "data": {"kubeconfig": base64.b64encode(
                      leaf_kubeconfig(self.leaf(leaf).host, leaf).encode()).decode()}}
        with contextlib.suppress(ApiError):
            self.root.create(resource_path("v1", "secrets", SECRET_NS), secret)
        opts = {"enable": enable, "kubeconfigSecretRef": {"namespace": SECRET_NS, "name": f"{name}-kubeconfig"},
                **tree}
        cluster: Obj = self.root.create(CLUSTERS, {"apiVersion": "kosmos.io/v1alpha1", "kind": "Cluster",
                                                   "metadata": {"name": name},
                                                   "spec": {"clusterTreeOptions": opts}})
        return cluster

    def patch_cluster(self, name: str, tree: Obj) -> None:
        self.root.patch(resource_path("kosmos.io/v1alpha1", "clusters", name=name),
                        {"spec": {"clusterTreeOptions": tree}})

    def delete_cluster(self, name: str) -> None:
        self.root.request("DELETE", resource_path("kosmos.io/v1alpha1", "clusters", name=name))

    def nodes(self) -> dict[str, Obj]:
        return {n["metadata"]["name"]: n for n in self.root.get("/api/v1/nodes")["items"]}

    def vnode(self, name: str) -> Obj | None:
        return self.nodes().get(name)

    def lease(self, name: str) -> Obj | None:
        try:
            lease: Obj = self.root.get(resource_path("coordination.k8s.io/v1", "leases", "kube-node-lease", name))
            return lease
        except ApiError:
            return None

    # ------------------------------------------------------------------ pods (tree.podsync)

    def add_root_pod(self, name: str, node: str, *, namespace: str = "default", image: str = "busybox",
                     labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
                     owners: list[Obj] | None = None, **spec: Any) -> Obj:
        """A root pod bound to ``node`` (a virtual node) at creation, as after the scheduler's binding."""
        self.ensure_namespace(self.root, namespace)
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
                "spec": {"containers": [{"name": "c", "image": image}], "nodeName": node, **spec}}
        if owners:
            body["metadata"]["ownerReferences"] = owners
        path = resource_path("v1", "pods", namespace)
        pod: Obj = wait_until(lambda: self._try_create(self.root, path, body), 10,
                              f"root pod {namespace}/{name} created (its namespace's default ServiceAccount)")
        return pod

    @staticmethod
    def _try_create(api: Api, path: str, body: Obj) -> Obj | None:
        try:
            created: Obj = api.create(path, body)
            return created
        except ApiError as e:
            if e.status == 403 and "serviceaccount" in str(e):
                return None  # the namespace's default ServiceAccount is not made yet
            raise

    @staticmethod
    def ensure_namespace(api: Api, name: str) -> None:
        with contextlib.suppress(ApiError):
            api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def root_pod(self, name: str, namespace: str = "default") -> Obj | None:
        try:
            pod: Obj = self.root.get(resource_path("v1", "pods", namespace, name))
            return pod
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def leaf_pods(self, leaf: str, selector: str, namespace: str | None = None) -> list[Obj]:
        """Leaf pods matching a label selector (a copy is found by its root UID label only)."""
        items: list[Obj] = self.leaf(leaf).get(resource_path("v1", "pods", namespace),
                                               labelSelector=selector)["items"]
        return items

    def bind_leaf(self, leaf: str, pod: Obj, node: str) -> None:
        """Play the leaf's scheduler: bind a leaf pod (a bound pod is deleted gracefully)."""
        meta = pod["metadata"]
        self.leaf(leaf).create(resource_path("v1", "pods", meta["namespace"], meta["name"], sub="binding"),
                               {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
                                "target": {"apiVersion": "v1", "kind": "Node", "name": node}})

    def set_leaf_status(self, leaf: str, pod: Obj, status: Obj) -> Obj:
        """Play the leaf's kubelet: write a leaf pod's status."""
        meta = pod["metadata"]
        api = self.leaf(leaf)
        path = resource_path("v1", "pods", meta["namespace"], meta["name"])
        current = api.get(path)
        current["status"] = status
        out: Obj = api.update(path + "/status", current)
        return out

    def start_manager(self, **kw: Any) -> TreeManager:
        opts = Options(root_id=ROOT_ID, leaf_timeout=0.5, unreachable_after=1.0, lease_period=0.2,
                       status_period=60.0, resync_period=1.0, root_timeout=5.0)
        kw.setdefault("leader_elect", False)
        m = TreeManager(Api(self.root.host), kw.pop("options", opts), **kw)
        m.start(sync_timeout=10)
        self.managers.append(m)
        return m

    def stop_manager(self, m: TreeManager) -> None:
        m.stop()
        self.managers.remove(m)


    # ------------------------------------------------------------------ dependencies

    def root_namespace(self, ns: str) -> None:
        """A root namespace as a real root has it: its ``default`` ServiceAccount (the emulator
        makes it, as the ServiceAccount controller does) and its ``kube-root-ca.crt``
        (root-ca-cert-publisher, not running here)."""
        self.root.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self.root.create(resource_path("v1", "configmaps", ns),
                         {"metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": ROOT_CA_PEM}})

    def storage_class(self, api: Api, name: str, *, expand: bool = True) -> None:
        api.create("/apis/storage.k8s.io/v1/storageclasses",
                   {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
                    "provisioner": "lab.kosmos.io/local", "allowVolumeExpansion": expand,
                    "volumeBindingMode": "WaitForFirstConsumer"})

    def start_deps(self, leaf: str, cluster: str, **kw: Any) -> Dependencies:
        """A started :class:`tree.deps.Dependencies` for ``leaf`` with short timings, its
        informers synced; stopped by :meth:`close` (or :meth:`stop_deps`)."""
        kw.setdefault("resync_period", 1.0)
        kw.setdefault("pin_seconds", 0.0)
        d = Dependencies(Api(self.root.host), self.leaf(leaf), root_id=ROOT_ID, cluster=cluster, timeout=5.0, **kw)
        d.start()
        self.deps.append(d)
        assert d.wait_synced(10), "the dependency informers listed"
        return d

    def stop_deps(self, d: Dependencies) -> None:
        d.stop()
        self.deps.remove(d)

    def start_controllers(self, api: Api, names: str, storage_root: Path | None = None) -> None:
        """The lab's controller-manager (``kubeemu.ctrl``, only ``names``) against ``api``, on a
        thread of its own; stopped by :meth:`close`."""
        c = Controllers(api.host, names, ctrl_manager.Options(storage_root=storage_root))
        self.controllers.append(c)

    def provision(self, leaf: str, ns: str, claim: str, *, node: str = "leaf-n1", reclaim: str = "Delete") -> Obj:
        """What a leaf's provisioner and PV binder do for a claim: a PV ``pvc-<claim uid>`` with
        ``claimRef`` and node affinity to ``node``, then the claim bound to it (``volumeName``,
        phase Bound, capacity). Returns the PV."""
        api = self.leaf(leaf)
        pvc = api.get(resource_path("v1", "persistentvolumeclaims", ns, claim))
        size = pvc["spec"]["resources"]["requests"]["storage"]
        pv: Obj = api.create("/api/v1/persistentvolumes", {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"pvc-{pvc['metadata']['uid']}",
                         "annotations": {"pv.kubernetes.io/provisioned-by": "lab.kosmos.io/local"}},
            "spec": {"capacity": {"storage": size}, "accessModes": pvc["spec"]["accessModes"],
                     "persistentVolumeReclaimPolicy": reclaim, "storageClassName": pvc["spec"].get("storageClassName"),
                     "local": {"path": f"/var/lib/volumes/{node}/pvc-{pvc['metadata']['uid']}"},
                     "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns,
                                  "name": claim, "uid": pvc["metadata"]["uid"]},
                     "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                         {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}})
        api.patch(resource_path("v1", "persistentvolumes", name=pv["metadata"]["name"], sub="status"),
                  {"status": {"phase": "Bound"}})
        path = resource_path("v1", "persistentvolumeclaims", ns, claim)
        api.patch(path, {"spec": {"volumeName": pv["metadata"]["name"]}})
        api.patch(path + "/status", {"status": {"phase": "Bound", "accessModes": pvc["spec"]["accessModes"],
                                                "capacity": {"storage": size}}})
        return pv


class Controllers:
    """:func:`kubeemu.ctrl.manager.run` on its own event loop thread."""

    def __init__(self, url: str, names: str, options: ctrl_manager.Options) -> None:
        known = ctrl_manager.registry(options)
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(ctrl_manager.run(url, ctrl_manager.select(names, known), known))
        self._thread = threading.Thread(target=self._run, name=f"controllers-{url}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)


#: A stand-in for the root API server's CA bundle (the content is never parsed).
ROOT_CA_PEM = "-----BEGIN CERTIFICATE-----\nroot-under-test\n-----END CERTIFICATE-----\n"


@contextlib.contextmanager
def tree_env(**kw: Any) -> Iterator[TreeEnv]:
    env = TreeEnv(**kw)
    try:
        yield env
    finally:
        env.close()


def ready(node: Obj | None) -> tuple[str, str] | None:
    """(status, reason) of the Ready condition."""
    for c in ((node or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return str(c.get("status")), str(c.get("reason"))
    return None


def resources(node: Obj | None) -> dict[str, str]:
    return dict(((node or {}).get("status") or {}).get("allocatable") or {})


def pod_gets(api: Api) -> list[str]:
    """The paths of the pod GETs ``api`` sends from now on (its ``request`` wrapped, for this
    test's ``api`` object only): how the tests see which reads the tree still makes."""
    gets: list[str] = []
    request = api.request

    def counting(method: str, path: str, *a: Any, **kw: Any) -> Any:
        if method == "GET" and "/pods/" in path:
            gets.append(path)
        return request(method, path, *a, **kw)

    api.request = counting  # type: ignore[method-assign]
    return gets
