"""The topology's per-cluster ``scheduler:`` and the lab's scheduler registry (issue 15 item 8,
issue 16 item 4): ``kosmos`` by default and started as ``python -m scheduler.main --master URL``,
``none`` starts nothing, an unknown one is refused before anything is built, a registered
scheduler is started, recorded, restarted with its API server and stopped by ``down``; the
scheduler's policy CRDs are installed into every cluster's API server (and skipped cleanly when
the tree has none).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fabric import topology
from kubeemu.runner import ServerThread
from tools import lab
from tools.lab import schedulers
from tools.lab.procs import ROOT_NETNS, start_process

TOPO = """\
kubernetes: true
clusters:
  - name: east
    podCIDRs: [10.10.0.0/16]
    scheduler: none
    nodes:
      - {name: e1}
  - name: west
    podCIDRs: [10.20.0.0/16]
    scheduler: kosmos
    nodes:
      - {name: w1}
"""


def _topo(tmp_path: Path, text: str = TOPO) -> topology.TopologyFile:
    p = tmp_path / "t.yaml"
    p.write_text(text)
    return topology.load(p)


@pytest.fixture
def lab_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "labs"
    monkeypatch.setattr(lab.state, "LAB_ROOT", root)
    return root


def test_topology_scheduler_key(tmp_path: Path) -> None:
    east, west = _topo(tmp_path).clusters
    assert east.scheduler == "none" and west.scheduler == "kosmos"
    default = _topo(tmp_path, TOPO.replace("    scheduler: kosmos\n", "")).clusters[1]
    assert default.scheduler == "kosmos" == topology.DEFAULT_SCHEDULER
    with pytest.raises(topology.TopologyError) as e:
        _topo(tmp_path, TOPO.replace("scheduler: kosmos", "scheduler: volcano"))
    assert "clusters[1].scheduler" in str(e.value) and "none, kosmos" in str(e.value)
    with pytest.raises(topology.TopologyError) as e:
        _topo(tmp_path, TOPO.replace("kubernetes: true", "kubernetes: false"))
    assert "clusters[1].scheduler: a scheduler runs only in a lab with 'kubernetes: true'" in str(e.value)
    # Without Kubernetes the default scheduler is never started (nothing to refuse either).
    plain = "clusters:\n  - name: east\n    podCIDRs: [10.10.0.0/16]\n    nodes:\n      - {name: e1}\n"
    st = lab.plan("ksch", _topo(tmp_path, plain))
    assert not st.kubernetes and st.clusters[0].scheduler_proc is None


def test_kosmos_is_built_and_planned(tmp_path: Path) -> None:
    """``kosmos`` is a STARTERS entry (no longer refused); an unknown scheduler still is, by name."""
    assert "kosmos" in schedulers.STARTERS and not schedulers.NOT_BUILT
    st = lab.plan("ksch", _topo(tmp_path))
    assert [c.scheduler for c in st.clusters] == ["none", "kosmos"]
    east = _topo(tmp_path).clusters[0]
    fake = dataclasses.replace(east, scheduler="volcano")
    assert schedulers.problems(fake, True) == [
        "cluster east: scheduler 'volcano': no such scheduler in this build; use 'scheduler: none' instead"]
    assert schedulers.problems(fake, False) == []


def test_kosmos_argv_talks_to_the_cluster_api_server() -> None:
    assert schedulers.scheduler_argv("http://127.0.0.1:43210") == [
        sys.executable, "-m", "scheduler.main", "--master", "http://127.0.0.1:43210", "--leader-elect=true",
        "--listen", "127.0.0.1:0"]


def test_registered_scheduler_starts_records_and_stops(lab_root: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """What the scheduler issue plugs in: one STARTERS entry; the lab does the rest."""
    seen: list[str] = []

    def start(state: lab.LabState, cluster: lab.ClusterRecord) -> lab.ProcRecord:
        assert cluster.api_url is not None  # started after its API server
        seen.append(cluster.name)
        argv = [sys.executable, "-c", "import time; time.sleep(120)"]
        return start_process(ROOT_NETNS, argv, state.state_dir / "logs" / f"scheduler-{cluster.name}.log")

    monkeypatch.setitem(schedulers.STARTERS, "kosmos", start)
    st = lab.plan("ksch", _topo(tmp_path))
    lab.save_state(st)
    recs: list[lab.ProcRecord] = []
    try:
        lab.start_kubernetes(st, [])
        east, west = st.clusters
        assert seen == ["west"] and east.scheduler_proc is None
        assert west.scheduler_proc is not None and west.scheduler_proc.running()
        recs = [west.scheduler_proc]
        saved = lab.load_state("ksch")
        assert saved is not None and saved.clusters[1].scheduler_proc == west.scheduler_proc
        assert saved.clusters[1].scheduler == "kosmos"
        lab.start_kubernetes(st, [])  # running: not started twice
        assert seen == ["west"]
    finally:
        lab.commands._down_locked("ksch", lab.load_state("ksch"), lambda _m: None)
    assert recs and not any(r.running() for r in recs)


# -- the policy CRDs -------------------------------------------------------------------------

CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: distributionpolicies.kosmos.io}
spec:
  group: kosmos.io
  scope: Namespaced
  names: {kind: DistributionPolicy, listKind: DistributionPolicyList, plural: distributionpolicies,
          singular: distributionpolicy, shortNames: [dp]}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
"""


def _crd_get(url: str, name: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"{url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}",
                                    timeout=5) as r:
            doc: dict[str, object] = json.loads(r.read())
            return doc
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def test_crds_installed_served_and_reinstalled(tmp_path: Path) -> None:
    """Every manifest of the CRD directory is created, Established and served; a second install
    (``lab up`` again, e.g. after a newer tree) updates in place instead of failing on 409."""
    crds = tmp_path / "crds"
    crds.mkdir()
    (crds / "distributionpolicy.yaml").write_text(CRD)
    (crds / "workloadpolicy.yaml").write_text(
        CRD.replace("distributionpolicies", "workloadpolicies").replace("DistributionPolicy", "WorkloadPolicy")
        .replace("distributionpolicy", "workloadpolicy").replace("[dp]", "[wp]"))
    seen: list[str] = []
    with ServerThread(name="crds") as emu:
        rec = lab.ClusterRecord(name="east", mode="p2p", pod_cidrs=["10.10.0.0/16"], service_cidrs=[],
                                gateways=[], global_cidrs={}, nodes=[])
        rec.api_url = emu.url
        names = schedulers.install_crds(rec, seen.append, crd_dir=crds)
        assert names == ["distributionpolicies.kosmos.io", "workloadpolicies.kosmos.io"]
        assert seen == ["cluster east: scheduler CRDs installed: distributionpolicies.kosmos.io, "
                        "workloadpolicies.kosmos.io"]
        # served: a DistributionPolicy can be created in a namespace
        body = {"apiVersion": "kosmos.io/v1alpha1", "kind": "DistributionPolicy",
                "metadata": {"name": "p", "namespace": "default"}, "spec": {"resourceSelectors": []}}
        req = urllib.request.Request(f"{emu.url}/apis/kosmos.io/v1alpha1/namespaces/default/distributionpolicies",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 201
        (crds / "distributionpolicy.yaml").write_text(CRD.replace("[dp]", "[dp, dpol]"))
        assert schedulers.install_crds(rec, seen.append, crd_dir=crds) == names
        cur = _crd_get(emu.url, "distributionpolicies.kosmos.io")
        assert cur is not None
        assert cur["spec"]["names"]["shortNames"] == ["dp", "dpol"]  # type: ignore[index]


def test_no_crd_directory_installs_nothing(tmp_path: Path) -> None:
    rec = lab.ClusterRecord(name="east", mode="p2p", pod_cidrs=[], service_cidrs=[], gateways=[],
                            global_cidrs={}, nodes=[])
    rec.api_url = "http://127.0.0.1:9"  # never asked: nothing to install
    assert schedulers.install_crds(rec, crd_dir=tmp_path / "missing") == []
    assert schedulers.crd_manifests(tmp_path / "missing") == []


def test_a_broken_crd_manifest_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: ConfigMap\napiVersion: v1\nmetadata: {name: x}\n")
    with pytest.raises(lab.LabError, match=r"bad.yaml document 0: expected a CustomResourceDefinition, got "
                                           r"'ConfigMap'"):
        schedulers.crd_manifests(tmp_path)
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(lab.LabError, match=r"bad.yaml: cannot read it"):
        schedulers.crd_manifests(tmp_path)
