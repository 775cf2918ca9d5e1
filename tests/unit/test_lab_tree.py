"""ClusterTree in the lab topology (issue 17 item 7): ``role: host`` and ``tree:`` per leaf,
checked while planning with errors naming the key and the cluster; ``examples/tree.yaml``
plans; the supervisor's back-off is the kubelet's; ``kosmos-tree``'s lab command line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric import topology
from tools.lab import planning, supervisor
from tools.lab import tree as labtree
from tools.lab.state import LabState, LabUsageError, ProcRecord

REPO = Path(__file__).resolve().parents[2]

BASE = """\
kubernetes: {k8s}
clusters:
  - name: root
    podCIDRs: [10.40.0.0/16]
{root}    nodes: [{{name: r1}}]
  - name: leaf
    podCIDRs: [10.41.0.0/16]
{leaf}    nodes: [{{name: l1}}]
"""


def _plan(tmp_path: Path, root: str = "    role: host\n", leaf: str = "    tree: cluster\n",
          k8s: str = "true") -> LabState:
    p = tmp_path / "t.yaml"
    p.write_text(BASE.format(root=root, leaf=leaf, k8s=k8s))
    return planning.plan("t", topology.load(p))


def _refused(tmp_path: Path, **kw: str) -> str:
    with pytest.raises(LabUsageError) as e:
        _plan(tmp_path, **kw)
    return str(e.value)


def test_the_keys_reach_the_plan(tmp_path: Path) -> None:
    state = _plan(tmp_path, leaf='    tree: "party=pool in (gpu,tpu),!spot"\n')
    assert [(c.name, c.role, c.tree) for c in state.clusters] == [
        ("root", "host", ""), ("leaf", "", "party=pool in (gpu,tpu),!spot")]
    assert state.host_cluster is not None and state.host_cluster.name == "root"
    for model in ("cluster", "node"):
        assert _plan(tmp_path, leaf=f"    tree: {model}\n").clusters[1].tree == model
    # No tree at all: no host, no leaf (every existing lab).
    plain = _plan(tmp_path, root="", leaf="")
    assert plain.host_cluster is None and all(not c.tree for c in plain.clusters)


def test_examples_tree_yaml_plans_a_host_and_three_leaves() -> None:
    state = planning.plan("t", topology.load(REPO / "examples" / "tree.yaml"))
    assert state.kubernetes
    assert state.host_cluster is not None and state.host_cluster.name == "root"
    assert {c.name: c.tree for c in state.clusters if c.tree} == {
        "leafa": "cluster", "leafb": "node", "leafc": "party=pool=gpu"}


@pytest.mark.parametrize(("kw", "expect"), [
    ({"root": "    role: root\n"}, "cluster root: role 'root': the only role is 'host'"),
    ({"leaf": "    role: host\n"}, "clusters root, leaf: role host: at most one cluster is the host"),
    ({"leaf": "    tree: cluster\n    role: host\n"}, "cluster leaf: tree 'cluster': the host is no leaf of itself"),
    ({"root": ""}, "cluster leaf: tree 'cluster': a leaf needs a cluster with 'role: host'"),
    ({"leaf": "    tree: nodes\n"}, "cluster leaf: tree 'nodes': expected one of cluster, node, party=SELECTOR"),
    ({"leaf": "    tree: party\n"}, "cluster leaf: tree 'party': expected one of"),
    ({"leaf": "    tree: node=pool=a\n"}, "cluster leaf: tree 'node=pool=a': expected one of"),
    ({"leaf": '    tree: "party=pool in (a"\n'}, "cluster leaf: tree 'party=pool in (a': unable to parse requirement"),
    ({"k8s": "false"}, "cluster root: role host: ClusterTree needs 'kubernetes: true'"),
    ({"k8s": "false", "root": ""}, "cluster leaf: tree 'cluster': ClusterTree needs 'kubernetes: true'"),
])
def test_bad_tree_keys_are_refused_naming_key_and_cluster(tmp_path: Path, kw: dict[str, str], expect: str) -> None:
    assert expect in _refused(tmp_path, **kw)


def test_a_non_string_key_is_refused_by_the_schema(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text(BASE.format(root="    role: [host]\n", leaf="    tree: 3\n", k8s="true"))
    with pytest.raises(topology.TopologyError) as e:
        topology.load(p)
    assert "clusters[0].role" in str(e.value) and "clusters[1].tree" in str(e.value)


def test_merge_keeps_the_host_and_takes_a_new_leaf_model(tmp_path: Path) -> None:
    cur = _plan(tmp_path)
    merged, _, _ = planning.merge_plan(cur, _plan(tmp_path, leaf="    tree: node\n"))
    assert merged.clusters[1].tree == "node"
    with pytest.raises(LabUsageError, match="cluster root: role host -> "):
        planning.merge_plan(cur, _plan(tmp_path, root="", leaf=""))


def test_tree_argv_names_the_host_and_the_lab_reflector(tmp_path: Path) -> None:
    state = _plan(tmp_path)
    state.clusters[0].api_url = "http://127.0.0.1:6001"
    argv = labtree.tree_argv(state)
    assert argv[1:-1] == ["-m", "tree.main", "--master", "http://127.0.0.1:6001", "--leader-elect=true",
                          "--listen", "127.0.0.1:0", "--reflector", f"unix:{state.reflector_socket}",
                          "--tls-dir", str(state.state_dir / "pki" / "tree"), "--fabric-cluster", "root",
                          "--kubelet-address", "127.0.0.1", "--kubelet-port"]
    assert 0 < int(argv[-1]) < 65536 and int(argv[-1]) != 10250


def test_tree_argv_keeps_the_kubelet_port_the_virtual_nodes_advertise(tmp_path: Path) -> None:
    """A restarted manager (new command line from the state) serves on the port of the last one."""
    state = _plan(tmp_path)
    state.clusters[0].api_url = "http://127.0.0.1:6001"
    state.tree_proc = ProcRecord(pid=1, start=None, netns="", log="", argv=[*labtree.tree_argv(state)[:-1], "41234"])
    assert labtree.tree_argv(state)[-2:] == ["--kubelet-port", "41234"]
    state.clusters[0].api_url = "http://127.0.0.1:6002"  # a new API server: same port still
    assert labtree.tree_argv(state)[-2:] == ["--kubelet-port", "41234"]


def test_backoff_is_the_kubelets() -> None:
    assert [supervisor.backoff(n) for n in range(8)] == [0, 10, 20, 40, 80, 160, 300, 300]


def test_the_supervisor_restarts_a_dead_process_with_backoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded process that died is restarted (at once the first time, then after the
    back-off), the restart counted in the state; one never started is left to ``lab up``."""
    from tools.lab import state as labstate
    from tools.lab.state import ProcRecord, save_state

    monkeypatch.setattr(labstate, "LAB_ROOT", tmp_path / "labs")
    st = _plan(tmp_path)
    st.clusters[0].scheduler = st.clusters[1].scheduler = "none"
    dead = ProcRecord(pid=2**22 + 7, start=1, netns="", log="", argv=["x"])
    st.tree_proc = dead
    save_state(st)
    labstate.lock_path("t").parent.mkdir(parents=True, exist_ok=True)
    labstate.lock_path("t").touch()
    starts: list[str] = []
    alive = {"yes": False}

    def fake_start(state: LabState, progress: object = None) -> ProcRecord:
        starts.append("tree")
        state.tree_proc = ProcRecord(pid=1, start=None, netns="", log="", argv=["x"])
        return state.tree_proc

    monkeypatch.setattr(labtree, "start_tree", fake_start)
    monkeypatch.setattr(ProcRecord, "running", lambda self: self.pid == 1 and alive["yes"])

    def record_tree(rec: ProcRecord | None) -> None:
        """The saved state's kosmos-tree record set to ``rec`` (a dead process, or none)."""
        got = labstate.load_state("t")
        assert got is not None
        got.tree_proc = rec
        save_state(got)

    # The API server of the host must run for the tree to be supervised.
    st.clusters[0].apiserver = ProcRecord(pid=1, start=None, netns="", log="", argv=[])
    st.clusters[0].api_url = "http://127.0.0.1:1"
    save_state(st)
    alive["yes"] = True  # the API server "runs"; the tree record (pid 2**22+7) does not
    now = [100.0]
    sup = supervisor.Supervisor("t", clock=lambda: now[0])
    assert sup.round() == ["tree"]  # first restart at once
    assert labstate.load_state("t").restarts == {"tree": 1}  # type: ignore[union-attr]
    # It dies again: the next restart waits 10 s.
    record_tree(dead)
    now[0] = 105.0
    assert sup.round() == []
    now[0] = 116.0
    assert sup.round() == ["tree"]
    assert labstate.load_state("t").restarts == {"tree": 2}  # type: ignore[union-attr]
    assert starts == ["tree", "tree"]
    # Never started (None): not the supervisor's business.
    record_tree(None)
    now[0] = 1000.0
    assert sup.round() == []


def test_up_restarts_a_running_scheduler_whose_command_line_changed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from tools.lab import schedulers
    from tools.lab import state as labstate
    from tools.lab.procs import ROOT_NETNS, start_process

    monkeypatch.setattr(labstate, "LAB_ROOT", tmp_path / "labs")
    st = _plan(tmp_path)
    c = st.clusters[0]
    c.api_url = "http://127.0.0.1:1"
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]

    def start(state: LabState, cluster: object) -> labstate.ProcRecord:
        return start_process(ROOT_NETNS, [*sleep, cluster.api_url], state.state_dir / "s.log")  # type: ignore[attr-defined]

    monkeypatch.setitem(schedulers.STARTERS, "kosmos", start)
    monkeypatch.setitem(schedulers.ARGVS, start, lambda _st, cl: [*sleep, cl.api_url or ""])
    first = schedulers.start_scheduler(st, c)
    try:
        assert first is not None and schedulers.start_scheduler(st, c) is first  # same command line: kept
        c.api_url = "http://127.0.0.1:2"  # a new API server
        second = schedulers.start_scheduler(st, c)
        assert second is not None and second.pid != first.pid and not first.running()
        assert second.argv[-1] == "http://127.0.0.1:2"
    finally:
        from tools import nsutil

        nsutil.terminate([(r.pid, r.start) for r in (c.scheduler_proc, first) if r is not None and r.running()])


def test_the_supervisor_backs_off_a_failing_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that raises counts as a failure: the next try waits the back-off, no busy loop."""
    from tools.lab import state as labstate
    from tools.lab.state import ProcRecord, save_state

    monkeypatch.setattr(labstate, "LAB_ROOT", tmp_path / "labs")
    st = _plan(tmp_path)
    st.clusters[0].scheduler = st.clusters[1].scheduler = "none"
    st.tree_proc = ProcRecord(pid=2**22 + 7, start=1, netns="", log="", argv=["x"])
    st.clusters[0].apiserver = ProcRecord(pid=1, start=None, netns="", log="", argv=[])
    st.clusters[0].api_url = "http://127.0.0.1:1"
    save_state(st)
    labstate.lock_path("t").touch()
    tries: list[float] = []
    now = [0.0]

    def failing(state: LabState, progress: object = None) -> None:
        tries.append(now[0])
        raise RuntimeError("no")

    monkeypatch.setattr(labtree, "start_tree", failing)
    monkeypatch.setattr(ProcRecord, "running", lambda self: self.pid == 1)
    sup = supervisor.Supervisor("t", clock=lambda: now[0])
    for t in range(0, 40):
        now[0] = float(t)
        sup.round()
    assert tries == [0.0, 10.0, 30.0]  # at once, then 10 s, then 20 s
    assert labstate.load_state("t").restarts == {}  # type: ignore[union-attr]


def test_lab_status_shows_the_tree_and_the_restarts() -> None:
    from tools.lab.report import render_status

    doc: dict[str, object] = {"name": "t", "topology": "x.yaml", "clusters": [], "kubeconfig": None,
           "reflector": {"address": "a", "netns": "n", "pid": None},
           "tree": {"host": "root", "leaves": {"leafa": "cluster", "leafc": "party=pool=gpu"}, "pid": 42,
                    "log": "l", "supervisor_pid": 43, "supervisor_log": "s"},
           "restarts": {"tree": 2, "scheduler/leafa": 1}}
    out = render_status(doc)
    assert ("tree: host root, leaves leafa (cluster), leafc (party=pool=gpu); kosmos-tree 42 (restarts 2), "
            "supervisor 43") in out
    assert "restarts of scheduler/leafa: 1" in out
