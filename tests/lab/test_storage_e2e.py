"""End to end, through fabric-tool and a real kubectl: storage in a ``kubernetes: true`` lab.

A one-cluster lab (two nodes) gets the default StorageClass ``lab-local`` from ``lab up``; the
storage controllers of ``python -m kubeemu.ctrl`` run against its API server with the lab's
storage root (``<state dir>/volumes/<cluster>``). A claim waits for its first consumer; a pod
pinned to a node makes it provisioned there (a directory under the state directory) and bound;
deleting pod and claim removes the directory and the PV; ``lab down`` leaves nothing behind (the
state directory, volumes included, goes; the fixture checks).

The lab's own controller-manager runs the storage controllers; it must be started with
``--storage-root`` = ``tools.lab.kube.storage_root``, which this test checks through the
volume's path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import KubeLab, kube_lab_running, needs_kubectl, new_lab_name
from tests.waiting import wait_until

pytestmark = needs_kubectl

TOPOLOGY = """underlay: 198.18.0.0/16
kubernetes: true
clusters:
  - name: store
    mode: p2p
    podCIDRs: [10.46.0.0/16]
    serviceCIDRs: [10.96.0.0/20]
    nodes:
      - {name: s1, pods: 1}
      - {name: s2, pods: 1}
"""


#: The lab's one cluster, and so its kubectl context.
CLUSTER = "store"


class StorageLab(KubeLab):
    state_dir: Path
    cm_log: Path

    def diagnose(self) -> str:
        """What to show when a wait fails: events, claims, volumes, the controller-manager's log."""
        cols = "custom-columns=NS:.metadata.namespace,KIND:.involvedObject.kind,NAME:.involvedObject.name,R:.reason"
        events = self.kubectl(CLUSTER, "get", "events", "-A", "-o", cols, check=False).stdout
        objs = self.kubectl(CLUSTER, "get", "pvc,pv", "-A", check=False).stdout
        log = self.cm_log.read_text()[-3000:] if self.cm_log.exists() else "(no log)"
        return f"\nevents:\n{events}\nclaims/volumes:\n{objs}\ncontroller-manager log:\n{log}"


@pytest.fixture(scope="module")
def slab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageLab]:
    topo = tmp_path_factory.mktemp("storage") / "lab.yaml"
    topo.write_text(TOPOLOGY)
    with kube_lab_running(StorageLab(new_lab_name(), topo), "--grace-period", "30", "--timeout", "90") as lab:
        lab.state_dir = lab.kubeconfig.parent
        kube = lab.kube(CLUSTER)
        assert kube["controller_manager_pid"], "the lab runs no controller-manager"
        lab.cm_log = Path(kube["controller_manager_log"])
        yield lab


def _find(slab: StorageLab, *args: str) -> Any:
    """The object ``kubectl get ARGS`` shows, None when there is none (so a wait can see it go)."""
    return slab.get(CLUSTER, *args, check=False)


def _apply(slab: StorageLab, doc: dict[str, Any]) -> None:
    slab.apply(CLUSTER, json.dumps(doc))


def _claim(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "default"},
            "spec": {"storageClassName": "lab-local", "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}}


def test_default_class_provision_on_the_pods_node_and_delete(slab: StorageLab) -> None:
    sc = slab.kubectl(CLUSTER, "get", "storageclass", "--no-headers").stdout.split()
    assert sc[:6] == ["lab-local", "(default)", "lab.kosmos.io/local", "Delete", "WaitForFirstConsumer", "true"], sc
    _apply(slab, _claim("data"))
    try:
        wait_until(lambda: "waiting for first consumer to be created before binding"
                   in slab.kubectl(CLUSTER, "describe", "pvc", "data").stdout, 20, "WaitForFirstConsumer event",
                   interval=0.3)
    except AssertionError as e:
        raise AssertionError(f"{e}{slab.diagnose()}") from None
    _apply(slab, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "writer", "namespace": "default"},
                  "spec": {"nodeName": "s2", "containers": [{"name": "c", "image": "busybox",
                                                             "command": ["sleep", "3600"],
                                                             "volumeMounts": [{"name": "d", "mountPath": "/data"}]}],
                           "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}})
    pvc = wait_until(lambda: (p := _find(slab, "pvc", "data")) and p["status"].get("phase") == "Bound" and p, 20,
                     "claim Bound", interval=0.3)
    pv = _find(slab, "pv", pvc["spec"]["volumeName"])
    path = Path(pv["spec"]["local"]["path"])
    assert path == slab.state_dir / "volumes" / "store" / "s2" / pvc["spec"]["volumeName"]
    assert path.is_dir()
    (path / "file").write_text("kept across pods\n")
    slab.kubectl(CLUSTER, "delete", "pod", "writer", "--wait=false")
    slab.kubectl(CLUSTER, "delete", "pvc", "data", "--wait=false")
    wait_until(lambda: _find(slab, "pv", pv["metadata"]["name"]) is None and _find(slab, "pvc", "data") is None, 30,
               "claim and volume deleted", interval=0.3)
    assert not path.exists()
    # one more, left bound: lab down must take its directory with the state directory
    _apply(slab, _claim("left"))
    _apply(slab, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stays", "namespace": "default"},
                  "spec": {"nodeName": "s1", "containers": [{"name": "c", "image": "busybox"}],
                           "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "left"}}]}})
    wait_until(lambda: (p := _find(slab, "pvc", "left")) and p["status"].get("phase") == "Bound", 20, "left Bound",
               interval=0.3)
