"""The topology's per-cluster ``scheduler:`` and the lab's scheduler registry (item 8 of issue 15):
``none`` by default, ``kosmos`` refused before anything is built while it is not built, and a
registered scheduler started, recorded, restarted with its API server and stopped by ``down``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fabric import topology
from tools import lab
from tools.lab import schedulers
from tools.lab.procs import ROOT_NETNS, start_process

TOPO = """\
kubernetes: true
clusters:
  - name: east
    podCIDRs: [10.10.0.0/16]
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
    assert east.scheduler == "none" == topology.DEFAULT_SCHEDULER and west.scheduler == "kosmos"
    with pytest.raises(topology.TopologyError) as e:
        _topo(tmp_path, TOPO.replace("scheduler: kosmos", "scheduler: volcano"))
    assert "clusters[1].scheduler" in str(e.value) and "none, kosmos" in str(e.value)
    with pytest.raises(topology.TopologyError) as e:
        _topo(tmp_path, TOPO.replace("kubernetes: true", "kubernetes: false"))
    assert "clusters[1].scheduler: a scheduler runs only in a lab with 'kubernetes: true'" in str(e.value)


def test_unbuilt_scheduler_is_refused_while_planning(tmp_path: Path) -> None:
    with pytest.raises(lab.LabUsageError) as e:
        lab.plan("ksch", _topo(tmp_path))
    assert ("cluster west: scheduler 'kosmos': the Kosmos scheduler is not built yet (it arrives with the "
            "scheduler issue); use 'scheduler: none' for now") in str(e.value)
    st = lab.plan("ksch", _topo(tmp_path, TOPO.replace("scheduler: kosmos", "scheduler: none")))
    assert [c.scheduler for c in st.clusters] == ["none", "none"]


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
