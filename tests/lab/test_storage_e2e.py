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
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import Lab, lab_running, new_lab_name, run
from tests.waiting import wait_until

KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary on PATH (install one to run this test)")

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


class StorageLab(Lab):
    kubeconfig: Path
    state_dir: Path
    api_url: str
    cm_log: Path

    def diagnose(self) -> str:
        """What to show when a wait fails: events, claims, volumes, the controller-manager's log."""
        cols = "custom-columns=NS:.metadata.namespace,KIND:.involvedObject.kind,NAME:.involvedObject.name,R:.reason"
        events = self.kubectl("get", "events", "-A", "-o", cols, check=False).stdout
        objs = self.kubectl("get", "pvc,pv", "-A", check=False).stdout
        log = self.cm_log.read_text()[-3000:] if self.cm_log.exists() else "(no log)"
        return f"\nevents:\n{events}\nclaims/volumes:\n{objs}\ncontroller-manager log:\n{log}"

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> Any:
        assert KUBECTL is not None
        p = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), "--context", "store", *args],
                           input=stdin, capture_output=True, text=True, timeout=30)
        if check:
            assert p.returncode == 0, f"kubectl {' '.join(args)}: {p.stderr}"
        return p

    def get(self, *args: str) -> Any:
        p = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(p.stdout) if p.returncode == 0 else None


@pytest.fixture(scope="module")
def slab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageLab]:
    topo = tmp_path_factory.mktemp("storage") / "lab.yaml"
    topo.write_text(TOPOLOGY)
    with lab_running(StorageLab(new_lab_name(), topo), "--grace-period", "30", "--timeout", "90") as lab:
        lab.kubeconfig = Path(lab.lab("kubeconfig").stdout.strip())
        lab.state_dir = lab.kubeconfig.parent
        lab.api_url = json.loads(run(KUBECTL or "kubectl", "--kubeconfig", str(lab.kubeconfig), "config", "view",
                                     "-o", "json").stdout)["clusters"][0]["cluster"]["server"]
        kube = lab.status()["clusters"][0]["kubernetes"]
        assert kube["controller_manager_pid"], "the lab runs no controller-manager"
        lab.cm_log = Path(kube["controller_manager_log"])
        yield lab

def _apply(slab: StorageLab, doc: dict[str, Any]) -> None:
    slab.kubectl("apply", "-f", "-", stdin=json.dumps(doc))


def _claim(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "default"},
            "spec": {"storageClassName": "lab-local", "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}}


def test_default_class_provision_on_the_pods_node_and_delete(slab: StorageLab) -> None:
    sc = slab.kubectl("get", "storageclass", "--no-headers").stdout.split()
    assert sc[:6] == ["lab-local", "(default)", "lab.kosmos.io/local", "Delete", "WaitForFirstConsumer", "true"], sc
    _apply(slab, _claim("data"))
    try:
        wait_until(lambda: "waiting for first consumer to be created before binding"
                   in slab.kubectl("describe", "pvc", "data").stdout, 20, "WaitForFirstConsumer event", interval=0.3)
    except AssertionError as e:
        raise AssertionError(f"{e}{slab.diagnose()}") from None
    _apply(slab, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "writer", "namespace": "default"},
                  "spec": {"nodeName": "s2", "containers": [{"name": "c", "image": "busybox",
                                                             "command": ["sleep", "3600"],
                                                             "volumeMounts": [{"name": "d", "mountPath": "/data"}]}],
                           "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}})
    pvc = wait_until(lambda: (p := slab.get("pvc", "data")) and p["status"].get("phase") == "Bound" and p, 20,
                     "claim Bound", interval=0.3)
    pv = slab.get("pv", pvc["spec"]["volumeName"])
    path = Path(pv["spec"]["local"]["path"])
    assert path == slab.state_dir / "volumes" / "store" / "s2" / pvc["spec"]["volumeName"]
    assert path.is_dir()
    (path / "file").write_text("kept across pods\n")
    slab.kubectl("delete", "pod", "writer", "--wait=false")
    slab.kubectl("delete", "pvc", "data", "--wait=false")
    wait_until(lambda: slab.get("pv", pv["metadata"]["name"]) is None and slab.get("pvc", "data") is None, 30,
               "claim and volume deleted", interval=0.3)
    assert not path.exists()
    # one more, left bound: lab down must take its directory with the state directory
    _apply(slab, _claim("left"))
    _apply(slab, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stays", "namespace": "default"},
                  "spec": {"nodeName": "s1", "containers": [{"name": "c", "image": "busybox"}],
                           "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "left"}}]}})
    wait_until(lambda: (p := slab.get("pvc", "left")) and p["status"].get("phase") == "Bound", 20, "left Bound",
               interval=0.3)
