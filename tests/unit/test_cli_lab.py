"""fabric-tool's argument handling and the lab's pure parts: planning, merging, state, status.

No root needed: nothing here creates a namespace (validation must fail before that anyway).
"""

from __future__ import annotations

import json
import sys
import types as pytypes
from pathlib import Path

import pytest
import yaml

from fabric import topology
from fabric.control import api
from tests.unit.conftest import load_topology
from tools import cli, lab

TOPO = """\
clusters:
  - name: east
    podCIDRs: [10.10.0.0/16]
    nodes:
      - {name: e1, pods: 2}
      - {name: e2, pods: 1}
  - name: west
    podCIDRs: [10.20.0.0/16]
    serviceCIDRs: [10.97.0.0/20]
    nodes:
      - {name: w1, pods: 1}
"""


# -- arguments and help --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["lab"],
        ["lab", "up"],
        ["lab", "down"],
        ["lab", "status"],
        ["lab", "exec"],
        ["lab", "stop-agent"],
        ["lab", "start-agent"],
        ["lab", "start-reflector"],
        ["lab", "add-node"],
        ["check"],
        ["status"],
    ],
)
def test_every_command_has_help_with_examples(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: fabric-tool" in out
    assert "example" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["lab", "up", "--timeout", "-1"], "'-1' must be a positive number of seconds"),
        (["lab", "up", "--timeout", "soon"], "'soon' is not a number of seconds"),
        (["lab", "down", "--name", "Bad-Name"], "invalid lab name 'Bad-Name'"),
        (["check", "--count", "0"], "'0' must be at least 1"),
        (["lab", "add-node", "east", "e3", "--pods", "99"], "'99' must be from 0 to 64"),
        (["lab", "frobnicate"], "invalid choice: 'frobnicate'"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_invalid_topology_is_refused_before_anything_else(
    tmp_path: Path, lab_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters:\n  - name: east\n    podCIDRs: [10.10.0.0/33]\n    nodes: [{name: e1, colour: red}]\n")
    assert cli.main(["lab", "up", str(bad), "--name", "kftunit"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "clusters[0].podCIDRs[0]" in err
    assert "clusters[0].nodes[0].colour" in err
    assert not lab_root.exists(), "validation must fail before any state is written"


def test_missing_topology_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["lab", "up", str(tmp_path / "absent.yaml"), "--name", "kftunit"]) == 2
    assert "cannot read file" in capsys.readouterr().err


def test_check_and_status_on_a_lab_that_is_not_up(lab_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--lab", "kftnone"]) == 1
    assert "lab kftnone is not up" in capsys.readouterr().err
    assert cli.main(["status", "--lab", "kftnone"]) == 2
    assert "--reflector" in capsys.readouterr().err


def test_bench_is_dispatched_with_the_rest_of_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = pytypes.ModuleType("tools.bench.suite")

    def bench_main(argv: list[str]) -> int:
        seen.append(list(argv))
        return 7

    fake.main = bench_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tools.bench.suite", fake)
    assert cli.main(["bench", "netlink", "--repeat", "3", "--json", "out.json"]) == 7
    assert seen == [["netlink", "--repeat", "3", "--json", "out.json"]]


def test_exec_requires_a_command(lab_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab.save_state(lab.plan("kftunit", load_topology(tmp_path, TOPO)))
    assert cli.main(["lab", "exec", "--name", "kftunit", "east/e1/p0", "--"]) == 2
    assert "no command given" in capsys.readouterr().err
    assert cli.main(["lab", "exec", "--name", "kftunit", "east/e7/p0", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "'east/e7/p0' is not a pod or node" in err and "east/e1/p1" in err


# -- planning ------------------------------------------------------------------------------


def test_plan_names_namespaces_interfaces_and_addresses(tmp_path: Path) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    assert st.ul_netns == "kfx-ul"
    assert st.gateway == "198.18.0.1"
    assert st.reflector_address == f"198.18.0.1:{api.DEFAULT_REFLECTOR_PORT}"
    e1 = st.node("east/e1")
    assert e1 is not None
    assert e1.netns == "kfx-east-e1"
    assert [(p.name, p.netns, p.ip, p.host_if) for p in e1.pods] == [
        ("p0", "kfx-east-e1-p0", "10.10.0.2", "veth-p0"),
        ("p1", "kfx-east-e1-p1", "10.10.0.3", "veth-p1"),
    ]
    assert e1.underlay_ip == "198.18.0.11"
    names = [n.ul_if for n in st.nodes()]
    assert len(set(names)) == 3 and all(len(n) <= 15 for n in names)
    assert st.namespaces()[-1] == "kfx-ul"  # deleted last
    assert st.namespaces()[:4] == ["kfx-east-e1-p0", "kfx-east-e1-p1", "kfx-east-e2-p0", "kfx-west-w1-p0"]


def test_plan_refuses_namespace_name_collisions(tmp_path: Path) -> None:
    text = """\
clusters:
  - name: a-b
    podCIDRs: [10.1.0.0/16]
    nodes: [{name: c}]
  - name: a
    podCIDRs: [10.2.0.0/16]
    nodes: [{name: b-c}]
"""
    with pytest.raises(
        lab.LabUsageError, match="node a/b-c and node a-b/c would both use network namespace 'kf-a-b-c'"
    ):
        lab.plan("kf", load_topology(tmp_path, text))


@pytest.mark.parametrize("name", ["", "kf-1", "KF", "a" * 13, "kf_1"])
def test_lab_names_cannot_contain_separators(name: str) -> None:
    with pytest.raises(lab.LabUsageError, match="invalid lab name"):
        lab.check_lab_name(name)


def test_merge_adds_nodes_and_keeps_running_records(tmp_path: Path) -> None:
    cur = lab.plan("kfx", load_topology(tmp_path, TOPO))
    for n in cur.nodes():
        n.built = True
        n.agent = lab.ProcRecord(pid=123, start=456, netns=n.netns, log="l", argv=["a"])
    bigger = TOPO.replace("      - {name: e2, pods: 1}\n", "      - {name: e2, pods: 1}\n      - {name: e3, pods: 1}\n")
    # A node added in the middle would shift the automatic addresses of the nodes after it:
    # merge_plan sees the shift and refuses...
    with pytest.raises(lab.LabUsageError, match=r"node west/w1: underlay_ip 198.18.0.13 -> 198.18.0.14"):
        lab.merge_plan(cur, lab.plan("kfx", load_topology(tmp_path, bigger, "big.yaml")))
    # ...so up() pins the running nodes' addresses into the document first.
    pinned = lab.pin_running(yaml.safe_load(bigger), cur)
    merged, added, clusters_changed = lab.merge_plan(cur, lab.plan("kfx", topology.parse(pinned, "big.yaml")))
    assert added == ["east/e3"]
    assert not clusters_changed
    e1 = merged.node("east/e1")
    e3 = merged.node("east/e3")
    assert e1 is not None and e1.built and e1.agent is not None and e1.agent.pid == 123
    assert e3 is not None and not e3.built and e3.agent is None
    assert e3.underlay_ip == "198.18.0.14"  # the first free address, w1 keeps .13
    assert merged.node("west/w1").underlay_ip == "198.18.0.13"  # type: ignore[union-attr]

    three = TOPO + "  - name: south\n    podCIDRs: [10.30.0.0/16]\n    nodes: [{name: s1, pods: 1}]\n"
    _, added, clusters_changed = lab.merge_plan(cur, lab.plan("kfx", topology.parse(yaml.safe_load(three))))
    assert added == ["south/s1"] and clusters_changed


def test_pinning_keeps_explicit_values_and_fills_absent_ones(tmp_path: Path) -> None:
    cur = lab.plan("kfx", load_topology(tmp_path, TOPO))
    doc = yaml.safe_load(TOPO.replace("{name: w1, pods: 1}", "{name: w1, pods: 1, underlay: 198.18.0.50}"))
    pinned = lab.pin_running(doc, cur)
    assert pinned["clusters"][0]["nodes"][0] == {
        "name": "e1", "pods": 2, "underlay": "198.18.0.11", "podCIDR": "10.10.0.0/24"
    }  # fmt: skip
    assert pinned["clusters"][1]["nodes"][0]["underlay"] == "198.18.0.50"
    assert "underlay" not in doc["clusters"][0]["nodes"][0], "the caller's document is not modified"


def test_merge_unchanged_is_a_no_op(tmp_path: Path) -> None:
    cur = lab.plan("kfx", load_topology(tmp_path, TOPO))
    merged, added, clusters_changed = lab.merge_plan(cur, lab.plan("kfx", load_topology(tmp_path, TOPO)))
    assert added == [] and not clusters_changed
    assert merged.to_json() == cur.to_json()


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("      - {name: e2, pods: 1}\n", "", "node east/e2 removed"),
        ("{name: e2, pods: 1}", "{name: e2, pods: 2}", "node east/e2: pods 1 -> 2"),
        ("{name: e2, pods: 1}", "{name: e2, pods: 1, underlay: 198.18.0.99}", "underlay_ip 198.18.0.12 -> 198.18.0.99"),
        ("serviceCIDRs: [10.97.0.0/20]", "serviceCIDRs: [10.98.0.0/20]", "cluster west: service_cidrs"),
    ],
)
def test_merge_refuses_changes_to_what_runs(tmp_path: Path, old: str, new: str, needle: str) -> None:
    cur = lab.plan("kfx", load_topology(tmp_path, TOPO))
    assert old in TOPO
    changed = lab.plan("kfx", load_topology(tmp_path, TOPO.replace(old, new), "changed.yaml"))
    with pytest.raises(lab.LabUsageError, match="only adds clusters and nodes") as e:
        lab.merge_plan(cur, changed)
    assert needle in str(e.value)
    assert "lab down --name kfx" in str(e.value)


# -- the state file ------------------------------------------------------------------------


def test_state_round_trips_through_the_file(lab_root: Path, tmp_path: Path) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    st.ul_built = True
    st.reflector = lab.ProcRecord(pid=10, start=20, netns="kfx-ul", log="/x.log", argv=["r"])
    st.resync_period_s = 4.0
    lab.save_state(st)
    assert (lab_root / "kfx" / "state.json").exists()
    assert not (lab_root / "kfx" / "state.json.tmp").exists()
    back = lab.load_state("kfx")
    assert back is not None
    assert back.to_json() == st.to_json()
    assert back.reflector == st.reflector


def test_absent_state_is_none_and_corrupt_state_names_the_file(lab_root: Path, tmp_path: Path) -> None:
    assert lab.load_state("kfx") is None
    path = lab_root / "kfx" / "state.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(lab.StateError, match=str(path) + ": not valid JSON"):
        lab.load_state("kfx")
    path.write_text(json.dumps({"version": 1, "name": "kfx"}))
    with pytest.raises(lab.StateError, match="malformed lab state: KeyError"):
        lab.load_state("kfx")
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(lab.StateError, match="state version 99"):
        lab.load_state("kfx")


# -- status --------------------------------------------------------------------------------


def _fabric_status(st: lab.LabState) -> api.FabricStatus:
    nodes = []
    for n in st.nodes():
        applied = 3 if n.key != "east/e2" else 2
        nodes.append(
            api.NodeStatus(
                cluster=n.cluster,
                name=n.name,
                underlay_ip=n.underlay_ip,
                pod_cidrs=(n.pod_cidr,),
                connected=n.key != "west/w1",
                planned_version=3,
                applied_version=applied,
                planned_entries=5,
                counters=api.SessionCounters(snapshots_sent=1, snapshot_entries_sent=5, deltas_sent=2),
            )
        )
    clusters = tuple(
        api.ClusterStatus(c.name, c.mode, tuple(c.pod_cidrs), (), tuple(x for x in nodes if x.cluster == c.name))
        for c in st.clusters
    )
    return api.FabricStatus(epoch="e1", generation=9, holding=False, clusters=clusters,
                            rejections=(api.Rejection("announcement east/e9", "unknown node"),))  # fmt: skip


def test_status_json_has_the_documented_shape(tmp_path: Path) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    doc = lab.status_doc(st, _fabric_status(st), None)
    assert set(doc["reflector"]) >= {"netns", "address", "pid"}
    assert doc["reflector"]["netns"] == "kfx-ul" and doc["reflector"]["address"] == "198.18.0.1:4880"
    assert [c["name"] for c in doc["clusters"]] == ["east", "west"]
    node = doc["clusters"][0]["nodes"][0]
    assert set(node) >= {"name", "netns", "underlay", "agent_pid", "in_sync", "pods"}
    assert node["pods"][0] == {"name": "p0", "netns": "kfx-east-e1-p0", "ip": "10.10.0.2", "global_ip": None,
                               "ip6": "", "global_ip6": None}  # dual stack (issue 5): the IPv6 address too
    in_sync = {f"{c['name']}/{n['name']}": n["in_sync"] for c in doc["clusters"] for n in c["nodes"]}
    assert in_sync == {"east/e1": True, "east/e2": False, "west/w1": False}
    assert node["counters"]["deltas_sent"] == 2
    assert doc["rejections"] == [{"source": "announcement east/e9", "reason": "unknown node"}]
    json.dumps(doc)  # serialisable as is
    text = lab.render_status(doc)
    assert "east     p2p   e2" in text and "2/3" in text and "NO" in text


def test_status_without_reflector_keeps_lab_facts_and_says_why(tmp_path: Path) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    doc = lab.status_doc(st, None, "connection refused")
    assert "connection refused" in doc["note"]
    nodes = [n for c in doc["clusters"] for n in c["nodes"]]
    assert len(nodes) == 3 and not any(n["in_sync"] for n in nodes)
    assert nodes[0]["pods"][1]["ip"] == "10.10.0.3"
    assert "reflector unreachable" in lab.render_status(doc)


def test_laggards_explain_each_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    for n in st.nodes():
        n.agent = lab.ProcRecord(pid=1, start=None, netns=n.netns, log="l", argv=[])
    monkeypatch.setattr(lab.ProcRecord, "running", lambda self: self.netns != "kfx-east-e1")
    lag = lab.laggards(st, _fabric_status(st))
    assert lag == {
        "east/e1": "agent not running",
        "east/e2": "applied version 2 of planned 3",
        "west/w1": "session not connected",
    }
    assert lab.laggards(st, None)["east/e2"] == "reflector unreachable"


def test_reflector_status_json_and_table(tmp_path: Path) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    fs = _fabric_status(st)
    doc = cli.status_json(fs)
    nodes = [n for c in doc["clusters"] for n in c["nodes"]]
    assert [n["key"] for n in nodes] == ["east/e1", "east/e2", "west/w1"]
    assert [n["in_sync"] for n in nodes] == [True, False, False]
    text = cli.render_fabric_status("unix:/x.sock", fs)
    assert "generation 9" in text and "rejected announcement east/e9: unknown node" in text
    assert "1 (5 entries)" in text
