"""The lab's storage provisioner ``lab.kosmos.io/local``: directory-backed PersistentVolumes on
the node a claim's consumer runs on, after rancher's local-path-provisioner, driven the way
sig-storage-lib-external-provisioner drives an external provisioner, plus the external-resizer's
and the kubelet's parts of volume expansion for these volumes.

Provisioning (a claim the binder annotated ``volume.kubernetes.io/storage-provisioner:
lab.kosmos.io/local``; for WaitForFirstConsumer classes only once
``volume.kubernetes.io/selected-node`` is set):

1. The PV name is ``pvc-<claim uid>``; if that PV exists (this or an earlier run made it) there
   is nothing to do, which is what makes a controller-manager restart safe.
2. Checks as local-path: no ``selector``, access modes ReadWriteOnce/ReadWriteOncePod only
   (a node-local directory), a node is required. A failure is a ``ProvisioningFailed`` event;
   a selected node that no longer exists drops the annotation so the node is chosen again. A
   selected node outside ``--storage-node-selector`` is left alone, without an event: the
   provisioner runs only there, as an external-provisioner in node-deployment mode runs as a
   DaemonSet with that nodeSelector, and a claim for another node (a ClusterTree virtual node,
   whose leaf provisions the volume) is someone else's.
3. ``mkdir <storage-root>/<node>/<pv-name>`` (mode 0777, as local-path, so any container user
   can write), then the PV: ``spec.local.path`` = that directory, ``nodeAffinity.required`` =
   ``kubernetes.io/hostname In [node]``, capacity = the claim's request, reclaim policy and
   mount options from the class, ``spec.claimRef`` to the claim and annotation
   ``pv.kubernetes.io/provisioned-by``. The binder completes the binding.

Deletion: a ``Released`` PV of ours with reclaim policy Delete: the directory is removed (only if
it is exactly ``<storage-root>/<node>/<pv-name>``, so a hand-edited path can never make this
delete anything else), then the PV object. Retain leaves both.

Expansion (the claim's request grew; the API server admitted it only for classes with
``allowVolumeExpansion``): condition ``Resizing`` and ``status.allocatedResources`` (+
``allocatedResourceStatuses: ControllerResizeInProgress``), the PV's capacity raised, then
``FileSystemResizePending`` (``NodeResizePending``) until a Pod using the claim runs on its node,
when the claim's ``status.capacity`` takes the new size and the condition goes (upstream the
kubelet does this last step; a directory has no file system of its own to grow, so nothing
changes on disk and the capacity is not enforced: the lab records sizes, it does not limit them).

Files land in ``--storage-root``: the lab passes ``<state dir>/volumes/<cluster>``, removed by
``lab down``; elsewhere it defaults to ``$TMPDIR/kubeemu-volumes``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from kubeemu.client import ApiStatusError, Client, Obj, object_key, resource_path
from kubeemu.ctrl.base import Informers
from kubeemu.ctrl.volume import (
    ANN_BETA_STORAGE_PROVISIONER,
    ANN_DYNAMICALLY_PROVISIONED,
    ANN_SELECTED_NODE,
    ANN_STORAGE_PROVISIONER,
    HOSTNAME_LABEL,
    WAIT_FOR_FIRST_CONSUMER,
    EventRecorder,
    VolumeControllerBase,
    annotations_of,
    binding_mode,
    claim_class,
    phase,
    pod_terminated,
    resize_requested,
    storage_of,
)
from kubeemu.objects import now_rfc3339
from kubeemu.selectors import labels_match, parse_labels

_log = logging.getLogger(__name__)

PROVISIONER = "lab.kosmos.io/local"
_SUPPORTED_MODES = ("ReadWriteOnce", "ReadWriteOncePod")
_FS_RESIZE_MESSAGE = "Waiting for user to (re-)start a pod to finish file system resize of volume on node."

def default_storage_root() -> Path:
    """Where volumes go without ``--storage-root``: ``$TMPDIR/kubeemu-volumes``."""
    return Path(tempfile.gettempdir()) / "kubeemu-volumes"


def volume_dir(root: Path, node: str, pv_name: str) -> Path:
    """Where a volume's data lives: ``<root>/<node>/<pv-name>``."""
    for what, part in (("node", node), ("volume", pv_name)):
        if not part or "/" in part or part in (".", ".."):
            raise ValueError(f"{what} name {part!r} cannot name a directory under {root}")
    return root / node / pv_name


class LocalProvisioner(VolumeControllerBase):
    """Provisioner, deleter and resizer of ``lab.kosmos.io/local`` volumes."""

    name = "lab-local-provisioner"

    def __init__(self, client: Client, informers: Informers, storage_root: Path | None = None,
                 node_selector: str | None = None) -> None:
        """``storage_root``: the controller-manager's ``--storage-root`` (None:
        :func:`default_storage_root`); ``node_selector``: its ``--storage-node-selector``, a
        label selector of the nodes this provisioner serves (None or empty: every node)."""
        super().__init__(client, informers)
        self.root = (storage_root or default_storage_root()).resolve()
        self.node_selector = parse_labels(node_selector)
        self.recorder = EventRecorder(client, f"{PROVISIONER}_{socket.gethostname()}")
        self.pvcs.add_handler(self.on_claim_event)
        self.pvs.add_handler(self.on_volume_event)
        self.pods.add_handler(self._on_pod)

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        if new is not None and etype != "DELETED":
            self.enqueue_pod_claims(new)  # a pending node expansion may finish once it runs

    async def run(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        _log.info("%s: volumes under %s", PROVISIONER, self.root)
        await super().run()

    # ------------------------------------------------------------------ claims

    async def sync_claim(self, pvc: Obj) -> None:
        if self.should_provision(pvc):
            await self.provision(pvc)
        elif resize_requested(pvc) is not None or _condition(pvc, "FileSystemResizePending"):
            await self.resize(pvc)

    def should_provision(self, pvc: Obj) -> bool:
        """sig-storage-lib-external-provisioner's ``shouldProvision``."""
        if (pvc.get("spec") or {}).get("volumeName") or pvc["metadata"].get("deletionTimestamp"):
            return False
        ann = annotations_of(pvc)
        if (ann.get(ANN_STORAGE_PROVISIONER) or ann.get(ANN_BETA_STORAGE_PROVISIONER)) != PROVISIONER:
            return False
        sc = self.storage_class(claim_class(pvc))
        if sc is None or sc.get("provisioner") != PROVISIONER:
            return False
        if binding_mode(sc) == WAIT_FOR_FIRST_CONSUMER:
            return bool(ann.get(ANN_SELECTED_NODE))
        return True

    async def provision(self, pvc: Obj) -> None:
        pv_name = f"pvc-{pvc['metadata']['uid']}"
        if self.volume(pv_name) is not None:
            return  # already provisioned (by this or an earlier run)
        try:
            await self.client.get(resource_path("v1", "persistentvolumes", None, pv_name))
            return
        except ApiStatusError as e:
            if not e.not_found:
                raise
        key = object_key(pvc)
        sc = self.storage_class(claim_class(pvc))
        assert sc is not None  # should_provision checked it
        spec = pvc.get("spec") or {}
        problem = ""
        if spec.get("selector") is not None:
            problem = "claim.Spec.Selector is not supported"
        elif any(m not in _SUPPORTED_MODES for m in spec.get("accessModes") or []):
            problem = (f"{PROVISIONER} only supports ReadWriteOnce and ReadWriteOncePod access modes "
                       f"(a directory on one node), not {', '.join(spec.get('accessModes') or [])}")
        elif (spec.get("volumeMode") or "Filesystem") != "Filesystem":
            problem = f"{PROVISIONER} only supports volumeMode Filesystem, not {spec.get('volumeMode')}"
        node = annotations_of(pvc).get(ANN_SELECTED_NODE, "")
        if not problem and not node:
            problem = "configuration error, no node was specified"
        if problem:
            await self.recorder.event(pvc, "Warning", "ProvisioningFailed",
                                      f'failed to provision volume with StorageClass "{sc["metadata"]["name"]}": '
                                      f"{problem}")
            return
        node_obj = self.nodes.get(node)
        if node_obj is None:
            try:
                node_obj = await self.client.get(resource_path("v1", "nodes", None, node))
            except ApiStatusError as e:
                if not e.not_found:
                    raise
                await self.recorder.event(pvc, "Warning", "ProvisioningFailed",
                                          f'failed to get target node: nodes "{node}" not found')
                meta = dict(pvc["metadata"])
                meta["annotations"] = {k: v for k, v in annotations_of(pvc).items() if k != ANN_SELECTED_NODE}
                await self.put_claim(dict(pvc, metadata=meta))  # reschedule: choose a node again
                return
        if not labels_match(self.node_selector, node_obj):
            _log.debug("claim %s: node %s is not one this provisioner serves; left alone", key, node)
            return
        request = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
        if storage_of({"storage": request}) is None:
            await self.recorder.event(pvc, "Warning", "ProvisioningFailed",
                                      f"failed to provision volume: spec.resources.requests.storage {request!r} "
                                      "is not a quantity")
            return
        await self.recorder.event(pvc, "Normal", "Provisioning",
                                  f'External provisioner is provisioning volume for claim "{key}"')
        path = volume_dir(self.root, node, pv_name)
        await asyncio.to_thread(_make_dir, path)
        meta = pvc["metadata"]
        pv: Obj = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": {ANN_DYNAMICALLY_PROVISIONED: PROVISIONER}},
            "spec": {
                "capacity": {"storage": request},
                "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
                "volumeMode": "Filesystem",
                "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy") or "Delete",
                "storageClassName": claim_class(pvc),
                "local": {"path": str(path)},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]}]}},
                "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": meta["namespace"],
                             "name": meta["name"], "uid": meta["uid"], "resourceVersion": meta["resourceVersion"]},
            },
        }
        if sc.get("mountOptions"):
            pv["spec"]["mountOptions"] = list(sc["mountOptions"])
        try:
            created = await self.client.create(resource_path("v1", "persistentvolumes"), pv)
        except ApiStatusError as e:
            if not e.conflict:
                await self.recorder.event(pvc, "Warning", "ProvisioningFailed",
                                          f"Error creating provisioned PV object for claim {key}: {e.message}")
                raise
            _log.info("volume %s for claim %s already exists, reusing", pv_name, key)
            return
        self._assume("volume", created, created=True)
        _log.info("volume %s provisioned for claim %s at %s", pv_name, key, path)
        await self.recorder.event(pvc, "Normal", "ProvisioningSucceeded", f"Successfully provisioned volume {pv_name}")

    # ------------------------------------------------------------------ volumes (delete)

    def should_delete(self, pv: Obj) -> bool:
        """``shouldDelete``: ours, Released, policy Delete, not already being deleted."""
        if pv["metadata"].get("deletionTimestamp") or phase(pv) != "Released":
            return False
        if (pv.get("spec") or {}).get("persistentVolumeReclaimPolicy") != "Delete":
            return False
        return annotations_of(pv).get(ANN_DYNAMICALLY_PROVISIONED) == PROVISIONER

    async def sync_volume(self, pv: Obj) -> None:
        if not self.should_delete(pv):
            return
        name = pv["metadata"]["name"]
        try:  # re-read: the binder may have changed its mind since the cache saw it
            pv = await self.client.get(resource_path("v1", "persistentvolumes", None, name))
        except ApiStatusError as e:
            if e.not_found:
                return
            raise
        if not self.should_delete(pv):
            return
        try:
            path = self._owned_path(pv)
            await asyncio.to_thread(_remove_dir, path)
        except (OSError, ValueError) as e:
            await self.recorder.event(pv, "Warning", "VolumeFailedDelete", str(e))
            _log.warning("volume %s: %s", name, e)
            return
        _log.info("volume %s: directory %s removed", name, path)
        try:
            await self.client.delete(resource_path("v1", "persistentvolumes", None, name))
        except ApiStatusError as e:
            if not e.not_found:
                raise

    def _owned_path(self, pv: Obj) -> Path:
        """The directory to remove, refusing any path this provisioner would not have made."""
        name = pv["metadata"]["name"]
        spec = pv.get("spec") or {}
        path = str((spec.get("local") or {}).get("path") or "")
        nodes = [v for t in (((spec.get("nodeAffinity") or {}).get("required") or {}).get("nodeSelectorTerms") or [])
                 for e in t.get("matchExpressions") or [] if e.get("key") == HOSTNAME_LABEL
                 for v in e.get("values") or []]
        if len(nodes) != 1:
            raise ValueError(f"persistentvolume {name}: expected one {HOSTNAME_LABEL} node in its nodeAffinity, "
                             f"found {nodes}; not deleting {path!r}")
        want = volume_dir(self.root, nodes[0], name)
        if Path(path) != want:
            raise ValueError(f"persistentvolume {name}: spec.local.path {path!r} is not {want} (this "
                             f"provisioner's directory for it under --storage-root); not deleting it")
        return want

    # ------------------------------------------------------------------ expansion

    async def resize(self, pvc: Obj) -> None:
        """external-resizer, then the kubelet's node expansion (see the module docstring)."""
        pv = self.volume(str((pvc.get("spec") or {}).get("volumeName") or ""))
        if pv is None or annotations_of(pv).get(ANN_DYNAMICALLY_PROVISIONED) != PROVISIONER:
            return  # not ours to resize
        want = resize_requested(pvc)
        request = (((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
        if want is not None:
            st = dict(pvc.get("status") or {})
            st["conditions"] = _resize_conditions(st, "Resizing", "")
            st["allocatedResources"] = dict(st.get("allocatedResources") or {}, storage=request)
            st["allocatedResourceStatuses"] = dict(st.get("allocatedResourceStatuses") or {},
                                                   storage="ControllerResizeInProgress")
            pvc = await self.put_claim(dict(pvc, status=st), status=True)
            await self.recorder.event(pvc, "Normal", "Resizing",
                                      f"External resizer is resizing volume {pv['metadata']['name']}")
            # controller expansion: a directory has nothing to grow; the PV records the size
            pv_spec = dict(pv.get("spec") or {})
            pv_spec["capacity"] = dict(pv_spec.get("capacity") or {}, storage=request)
            await self.put_volume(dict(pv, spec=pv_spec))
            st = dict(pvc.get("status") or {})
            st["conditions"] = _resize_conditions(st, "FileSystemResizePending", _FS_RESIZE_MESSAGE)
            st["allocatedResourceStatuses"] = dict(st.get("allocatedResourceStatuses") or {},
                                                   storage="NodeResizePending")
            pvc = await self.put_claim(dict(pvc, status=st), status=True)
            await self.recorder.event(pvc, "Normal", "FileSystemResizeRequired",
                                      "Require file system resize of volume on node")
        if not _condition(pvc, "FileSystemResizePending"):
            return
        pod = next((p for p in self.pods_using(pvc) if (p.get("spec") or {}).get("nodeName")
                    and phase(p) == "Running" and not pod_terminated(p) and not p["metadata"].get("deletionTimestamp")),
                   None)
        if pod is None:
            return  # offline: finished when a pod using it runs (as the kubelet does at mount)
        st = dict(pvc.get("status") or {})
        new_size = (st.get("allocatedResources") or {}).get("storage") or request
        st["capacity"] = dict(st.get("capacity") or {}, storage=new_size)
        st["conditions"] = _resize_conditions(st, "", "")
        rs = {k: v for k, v in (st.get("allocatedResourceStatuses") or {}).items() if k != "storage"}
        if rs:
            st["allocatedResourceStatuses"] = rs
        else:
            st.pop("allocatedResourceStatuses", None)
        if not st["conditions"]:
            st.pop("conditions")
        pvc = await self.put_claim(dict(pvc, status=st), status=True)
        await self.recorder.event(pod, "Normal", "FileSystemResizeSuccessful",
                                  f'MountVolume.NodeExpandVolume succeeded for volume "{pv["metadata"]["name"]}" '
                                  f'{pod["spec"]["nodeName"]}')


def _condition(pvc: Obj, ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True"
               for c in (pvc.get("status") or {}).get("conditions") or [])


def _resize_conditions(status: dict[str, object], ctype: str, message: str) -> list[dict[str, str]]:
    """``MergeResizeConditionOnPVC``: the resize conditions are replaced by ``ctype`` (none when
    empty); other conditions stay."""
    resize = ("Resizing", "FileSystemResizePending", "ControllerResizeError", "NodeResizeError")
    raw = status.get("conditions")
    keep = [c for c in raw if isinstance(c, dict) and c.get("type") not in resize] if isinstance(raw, list) else []
    if ctype:
        cond = {"type": ctype, "status": "True", "lastTransitionTime": now_rfc3339()}
        if message:
            cond["message"] = message
        keep.append(cond)
    return keep


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o777)  # local-path's "mkdir -m 0777": containers may run as any user


def _remove_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
