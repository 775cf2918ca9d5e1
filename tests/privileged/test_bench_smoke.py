"""Every benchmark of the suite, run end to end in its tiny configuration (``--tiny``: one round,
short measurements, small N) so the suite cannot rot. No timing is asserted: only that each
step ran, produced every figure with its baseline and ratio, and left nothing behind (no
namespace, lab state or process of ours).

``control`` needs no root, but lives here with the others: its processes take a few seconds to
start, which the unit tier's budget does not have.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from fabric import netns as namespaces
from tools import lab, nsutil
from tools.bench import common as bc
from tools.bench import suite as bench


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rpartition(")")[2].split()[1] == me and nsutil.alive(int(entry)):
                out.add(int(entry))
    return out


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> dict[str, Any]:
    # Other suites may build their own kft* namespaces meanwhile: check only the names we made.
    made: list[str] = []
    real_unique = bc.unique

    def recording_unique(prefix: str = "kft", digits: int = 6) -> str:
        made.append(real_unique(prefix, digits))
        return made[-1]

    monkeypatch.setattr(bc, "unique", recording_unique)
    out = tmp_path / "bench.json"
    assert bench.main([*args, "--tiny", "--repeat", "1", "--json", str(out)]) == 0
    left = [ns for ns in namespaces.list_all() if ns.startswith("kft-bench-") or ns.split("-")[0] in made]
    assert not left, f"namespaces left behind: {left}"
    labs = [name for name in made if lab.state_dir(name).exists()]
    assert not labs, f"lab state left behind: {labs}"
    assert not _children(), "processes left behind"
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def _figures(doc: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in doc[name].items() if k not in ("notes", "samples")}


def test_datapath_measures_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _run(tmp_path, monkeypatch, "datapath")
    figs = _figures(doc, "datapath")
    metrics = {"throughput_1_stream", "throughput_4_streams", "ping_p50", "ping_p99", "tcp_rr"}
    assert set(figs) == metrics | {f"routes_only_{m}" for m in metrics}
    # Every round of every path, for recomputing the paired ratios from the file.
    samples = doc["datapath"]["samples"]
    assert set(samples) == metrics
    assert all(set(by) == {"ours", "vxlan", "vxlan_rt", "veth"} and len({len(v) for v in by.values()}) == 1
               for by in samples.values()), samples  # fmt: skip
    for metric, fig in figs.items():
        keys = ["median", "baseline_median", "ratio"]
        if not metric.startswith("routes_only_"):
            keys += ["veth_baseline_median", "veth_ratio", "vxlan_rt_baseline_median", "vxlan_rt_ratio"]
        for key in keys:
            assert fig[key] is not None and math.isfinite(fig[key]) and fig[key] > 0, (metric, key)


def test_restart_counts_pings_and_restarts_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figs = _figures(_run(tmp_path, monkeypatch, "restart"), "restart")
    assert figs["packets_lost"]["median"] >= 0 and figs["packets_lost"]["baseline_median"] >= 0
    assert figs["packets_lost"]["ratio"] > 0
    assert figs["restart_s"]["median"] > 0


def test_netlink_in_its_tiny_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figs = _figures(_run(tmp_path, monkeypatch, "netlink"), "netlink")
    assert {"route_add", "route_del", "fdb_add", "fdb_del", "neigh_add", "neigh_del"} <= set(figs)
    for metric, fig in figs.items():
        assert fig["median"] > 0 and fig["baseline_median"] > 0 and fig["ratio"] > 0, metric
        assert fig["unit"] == "entries/s"


def test_control_with_three_simulated_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figs = _figures(_run(tmp_path, monkeypatch, "control", "--n", "3"), "control")
    for metric in ("join_fanout_p50_n3", "join_fanout_p99_n3", "leave_fanout_p50_n3", "leave_fanout_p99_n3",
                   "server_cpu_per_change_n3", "server_rss_per_agent_n3", "bringup_n3"):  # fmt: skip
        assert {"median", "min", "max", "baseline_median", "ratio", "unit"} <= figs[metric].keys(), metric
    for metric in ("join_fanout_p50_n3", "leave_fanout_p50_n3", "bringup_n3"):
        assert figs[metric]["median"] > 0 and figs[metric]["baseline_median"] > 0, metric


@pytest.mark.parametrize(("name", "missing"), [("datapath", "iperf3"), ("gateway", "iperf3"), ("failover", "ping"),
                                              ("translate", "nft")])  # fmt: skip
def test_a_missing_program_is_refused_before_anything_is_built(
    name: str, missing: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda p: None if p == missing else real(p))
    before = set(namespaces.list_all())
    assert bench.main([name, "--tiny"]) == 2
    assert f"program {missing!r} is not installed" in capsys.readouterr().err
    assert set(namespaces.list_all()) == before


def test_gateway_measures_the_gateway_path_against_gateway_node_and_p2p(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figs = _figures(_run(tmp_path, monkeypatch, "gateway"), "gateway")
    for metric in ("throughput_1_stream", "throughput_4_streams", "ping_p50", "ping_p99"):
        for key in ("median", "baseline_median", "p2p_baseline_median", "ratio", "p2p_ratio"):
            assert figs[metric][key] is not None and figs[metric][key] > 0, (metric, key)
    for metric in ("retransmits_1_stream", "retransmits_4_streams"):
        assert figs[metric]["median"] >= 0 and figs[metric]["baseline_median"] >= 0, metric
    assert {"median", "ratio"} <= figs["added_latency_p50"].keys()
    aa = figs["throughput_4_streams_2_active"]  # active/active: 2 active gateways vs 1
    assert aa["median"] > 0 and aa["baseline_median"] > 0 and aa["ratio"] > 0


def test_failover_cuts_and_heals_the_active_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figs = _figures(_run(tmp_path, monkeypatch, "failover"), "failover")
    assert figs["outage_ms"]["median"] > 0 and figs["outage_ms"]["ratio"] > 0
    assert figs["heal_gap_ms"]["median"] > 0 and figs["heal_gap_ms"]["baseline_median"] > 0
    assert figs["role_move_ms"]["median"] > 0
    # active/active: one gateway of two cut; the flows on the other are counted (goal: 0 lost)
    assert figs["active_active_survivor_lost"]["median"] >= 0
    assert figs["active_active_outage_ms"]["baseline_median"] > 0


def test_translate_measures_lab_handbuilt_nft_and_program_cost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _run(tmp_path, monkeypatch, "translate")
    figs = _figures(doc, "translate")
    for metric in ("throughput_1_stream", "ping_p50", "vxlan_throughput_4_streams", "vxlan_ping_p99"):
        assert figs[metric]["median"] > 0 and figs[metric]["baseline_median"] > 0 and figs[metric]["ratio"] > 0
    for metric in ("vxlan_throughput_1_stream", "vxlan_ping_p50"):
        assert figs[metric]["nft_baseline_median"] > 0 and figs[metric]["nft_ratio"] > 0, metric
    prog = {m for m in figs if m.startswith("prog_ns_")}
    assert prog == {f"prog_ns_{p}{f}_{d}" for p in ("tcp", "udp", "icmperr") for f in "46" for d in ("in", "out")}
    for metric in prog:
        assert figs[metric]["median"] > 0 and figs[metric]["baseline_median"] > 0, metric
    assert not list(Path("/run/kosmos-fabric/bench").glob("bpf-*")), "a private bpffs was left behind"


def test_tree_reflects_pods_through_a_clustertree_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.bench import tree as bench_tree

    if not bench_tree.supported():
        pytest.skip("this build has no tree manager")
    doc = _run(tmp_path, monkeypatch, "tree", "--tree-pods", "8")
    figs = _figures(doc, "tree")
    assert set(figs) == set(bench_tree.UNITS)
    for metric in ("create_to_running_p50", "create_to_running_p99", "create_to_leaf_running_p99", "pods_per_s"):
        assert figs[metric]["median"] > 0 and figs[metric]["baseline_median"] > 0 and figs[metric]["ratio"] > 0, metric
    assert figs["leaf_running_to_root_running_p99"]["median"] >= 0
    assert figs["tree_cpu_per_1000_pods"]["median"] > 0
    assert any(n.startswith("round 1: tree p50/p99") for n in doc["tree"]["notes"])
