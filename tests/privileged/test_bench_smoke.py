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
from pathlib import Path
from typing import Any

import pytest

from tools import bench, lab, nsutil
from tools import bench_common as bc


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
    left = [ns for ns in nsutil.list_netns() if ns.startswith("kft-bench-") or ns.split("-")[0] in made]
    assert not left, f"namespaces left behind: {left}"
    labs = [name for name in made if lab.state_dir(name).exists()]
    assert not labs, f"lab state left behind: {labs}"
    assert not _children(), "processes left behind"
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def _figures(doc: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in doc[name].items() if k != "notes"}


def test_datapath_measures_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figs = _figures(_run(tmp_path, monkeypatch, "datapath"), "datapath")
    assert set(figs) == {"throughput_1_stream", "throughput_4_streams", "ping_p50", "ping_p99", "tcp_rr"}
    for metric, fig in figs.items():
        for key in ("median", "baseline_median", "veth_baseline_median", "ratio", "veth_ratio"):
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


@pytest.mark.parametrize("missing", ["iperf3"])
def test_a_missing_program_is_refused_before_anything_is_built(
    missing: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = bench.bc.shutil.which
    monkeypatch.setattr(bench.bc.shutil, "which", lambda p: None if p == missing else real(p))
    before = set(nsutil.list_netns())
    assert bench.main(["datapath", "--tiny"]) == 2
    assert f"program {missing!r} is not installed" in capsys.readouterr().err
    assert set(nsutil.list_netns()) == before
