"""The benchmark suite's registry, figures, rendering and refusals. The tiny-configuration runs of
the benchmarks that need root are in tests/privileged/test_bench_smoke.py; control (no root) runs
here over both of its shapes."""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tools.bench import common as bc
from tools.bench import suite as bench


def test_every_registered_benchmark_has_the_suite_interface() -> None:
    for name, entry in bench.BENCHMARKS.items():
        module = entry.load()
        assert name == module.NAME
        assert isinstance(module.HELP, str) and module.HELP
        assert callable(module.requires) and callable(module.run)
        assert isinstance(module.requires(bc.Options()), list)


def test_ratios_are_oriented_so_that_higher_is_better() -> None:
    thr = bc.figure([8.0, 10.0, 9.0], {"": [10.0, 10.0, 10.0], "veth": [20.0]}, higher_is_better=True)
    assert (thr["median"], thr["min"], thr["max"]) == (9.0, 8.0, 10.0)
    assert thr["ratio"] == pytest.approx(0.9) and thr["veth_ratio"] == pytest.approx(0.45)
    lat = bc.figure([200.0], {"": [100.0]}, higher_is_better=False)
    assert lat["ratio"] == pytest.approx(0.5)
    assert math.isnan(bc.figure([1.0], {"": [0.0]}, higher_is_better=True)["ratio"])
    assert bc.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert bc.percentile([5.0, 1.0, 3.0], 99) == 5.0


def _doc() -> dict[str, Any]:
    return {
        "meta": {
            "date": "2030-01-01 00:00 UTC",
            "machine": {"cpu": "Test CPU", "cores": "2", "kernel": "Linux 6.1", "memory": "1.0 GiB", "python": "3.11"},
            "repeat": 3,
            "command": "fabric-tool bench",
            "skipped": {"datapath": "needs root"},
        },
        "netlink": {
            "route_add": {
                "median": 5000.0,
                "min": 4000.0,
                "max": 6000.0,
                "baseline_median": 5100.0,
                "ratio": 0.98,
                "unit": "entries/s",
            },
            "notes": ["a note"],
        },
    }


def test_paired_ratios_cancel_drift_between_rounds() -> None:
    """Round 2 ran at half speed for both paths: the paired ratio sees ours 10 % below the
    baseline in every round. The ratio of the medians compares samples of different rounds."""
    ours, base = [9.0, 4.5, 9.0], [10.0, 5.0, 10.0]
    assert bc.paired_ratio(ours, base, True) == pytest.approx(0.9)
    assert bc.paired_ratio([110.0, 55.0], [100.0, 50.0], False) == pytest.approx(100 / 110)
    # Per round 0.9, 1.2, 0.8; the medians (6 vs 5) come from different rounds.
    ours, base = [9.0, 6.0, 4.0], [10.0, 5.0, 5.0]
    assert bc.figure(ours, {"": base}, higher_is_better=True, paired=True)["ratio"] == pytest.approx(0.9)
    assert bc.figure(ours, {"": base}, higher_is_better=True)["ratio"] == pytest.approx(1.2)
    with pytest.raises(ValueError, match="different lengths"):
        bc.paired_ratio([1.0], [1.0, 2.0], True)
    assert math.isnan(bc.paired_ratio([1.0], [0.0], True))


def test_raw_samples_reach_the_json_and_recompute_the_paired_ratio_but_not_the_tables(tmp_path: Path) -> None:
    report = bc.Report()
    by = {"ours": [9.0, 6.0, 4.0], "vxlan": [10.0, 5.0, 5.0]}
    report.figures["throughput"] = bc.figure(by["ours"], {"": by["vxlan"]}, higher_is_better=True, paired=True)
    report.samples["throughput"] = by
    doc = {"meta": _doc()["meta"], "datapath": json.loads(json.dumps(bench._to_json(report)))}
    raw = doc["datapath"]["samples"]["throughput"]
    assert bc.paired_ratio(raw["ours"], raw["vxlan"], True) == pytest.approx(doc["datapath"]["throughput"]["ratio"])
    src, out = tmp_path / "run.json", tmp_path / "BENCHMARKS.md"
    src.write_text(json.dumps(doc))
    assert bench.main(["--from-json", str(src), "--markdown", str(out)]) == 0
    md = out.read_text()
    assert "| throughput |" in md and "samples" not in md


def test_markdown_has_the_machine_the_date_every_figure_and_the_notes(tmp_path: Path) -> None:
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_doc()))
    out = tmp_path / "BENCHMARKS.md"
    assert bench.main(["--from-json", str(src), "--markdown", str(out)]) == 0
    md = out.read_text()
    for text in ("Test CPU", "2 cores", "Linux 6.1", "2030-01-01", "## netlink", "| route_add | entries/s | 5,000 |",
                 "0.98", "- a note", "`datapath` was not run: needs root", "higher is better"):  # fmt: skip
        assert text in md, text


def test_unknown_and_unrunnable_benchmarks_are_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        bench.main(["nosuch"])
    assert e.value.code == 2
    assert "nosuch" in capsys.readouterr().err
    module = bench.BENCHMARKS["control"].load()
    monkeypatch.setattr(module, "requires", lambda opts: ["the widget is missing"])
    assert bench.main(["control"]) == 2
    assert "cannot run control: the widget is missing" in capsys.readouterr().err


def test_two_runs_merge_into_one_document(tmp_path: Path) -> None:
    later = {"meta": {"date": "2030-01-02 00:00 UTC", "command": "fabric-tool bench control", "skipped": {}},
             "control": {"bringup_n3": {"median": 1.0, "baseline_median": 0.5, "ratio": 0.5, "unit": "s"}}}  # fmt: skip
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_doc()))
    b.write_text(json.dumps(later))
    out = tmp_path / "BENCHMARKS.md"
    assert bench.main(["--from-json", str(a), str(b), "--markdown", str(out)]) == 0
    md = out.read_text()
    assert "## netlink" in md and "## control" in md and "| bringup_n3 | s |" in md
    assert "2030-01-01" in md and "2030-01-02" in md


def test_control_runs_the_shapes_in_a_tiny_configuration(tmp_path: Path) -> None:
    """``--tiny`` control over the p2p, gateway and interleaved shapes (20 agents; gateway: 2
    clusters of 10): every figure of each shape is there with numbers, and the changes reach only
    the agents the planner says they affect (a worker fails the run otherwise)."""
    out = tmp_path / "control.json"
    argv = ["control", "--tiny", "--repeat", "1", "--n", "20", "--shape", "p2p,gateway,interleaved",
            "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    control = json.loads(out.read_text())["control"]
    for sfx in ("_n20", "_gateway_n20", "_interleaved_n20"):
        for metric in ("join_fanout_p50", "join_fanout_p99", "leave_fanout_p50", "leave_fanout_p99", "bringup",
                       "server_cpu_per_change", "server_cpu_per_agent_per_change", "server_rss_per_agent"):  # fmt: skip
            fig = control[metric + sfx]
            assert {"median", "min", "max", "baseline_median", "ratio", "unit"} <= fig.keys(), metric + sfx
        for metric in ("join_fanout_p50", "leave_fanout_p50", "bringup"):
            fig = control[metric + sfx]
            assert fig["median"] > 0 and fig["baseline_median"] > 0, metric + sfx
    notes = "\n".join(control["notes"])
    # Gateway: the join lands inside its cluster's vx-local prefix; only its hot gateways change.
    assert "gateway N=20: 2 gateway-mode clusters of up to 10 nodes; a join or leave changes the plans of 2 " in notes
    # Interleaved: it moves vx-local routes, so at least every node outside its cluster changes.
    affected = re.search(r"interleaved N=20: .*? a join or leave changes the plans of (\d+) ", notes)
    assert affected is not None and int(affected.group(1)) >= 10, notes
    assert "p2p N=20: 2 P2P clusters; a join or leave changes the plans of 20 " in notes


def test_control_shapes_place_agents_in_disjoint_clusters_and_cidrs() -> None:
    from fabric.control import admission
    from tools.bench.control import shapes as bench_shapes

    shape = bench_shapes.Shape("gateway", 250)
    assert shape.clusters == 3 and shape.suffix == "_gateway_n250"
    assert bench_shapes.Shape("p2p", 250).suffix == "_n250"
    config = shape.fabric_config()
    assert not admission.config_problems(config)
    anns = [shape.announcement(i) for i in (*range(shape.n), bench_shapes.JOINER)]
    assert len({a.underlay_ip for a in anns}) == len({a.key for a in anns}) == len(anns)
    cidrs = [a.pod_cidrs[0] for a in anns]
    assert len(set(cidrs)) == len(cidrs)
    for a in anns:
        cluster = config.cluster(a.cluster)
        assert cluster is not None and cluster.mode == "gateway" and len(cluster.gateways) == 3
        assert ipaddress.ip_network(a.pod_cidrs[0]).subnet_of(ipaddress.ip_network(cluster.pod_cidrs[0]))
    # Interleaved: the same clusters, every address's neighbours in other clusters.
    inter = bench_shapes.Shape("interleaved", 250)
    placed = sorted((ipaddress.ip_address(a.underlay_ip), a.cluster)
                    for a in (inter.announcement(i) for i in (*range(inter.n), bench_shapes.JOINER)))  # fmt: skip
    assert len({ip for ip, _ in placed}) == len(placed) == 251
    assert all(x[1] != y[1] for x, y in itertools.pairwise(placed)), "neighbours share a cluster"
    assert bench_shapes.shapes_for(bc.Options(), 1000) == ("p2p", "gateway", "subnets", "interleaved")
    assert bench_shapes.shapes_for(bc.Options(), 10_000) == ("gateway", "subnets")
    assert bench_shapes.shapes_for(bc.Options(shapes=("p2p",)), 10_000) == ("p2p",)
    with pytest.raises(SystemExit):
        bench.main(["control", "--shape", "mesh"])


def test_the_suite_registers_every_benchmark_of_the_issue() -> None:
    assert set(bench.BENCHMARKS) == {"datapath", "restart", "netlink", "control", "gateway", "failover", "translate",
                                     "k8s", "scheduler", "tree", "control-tls", "leafview",
                                     "frag", "placement", "mcs"}


def test_failover_outage_is_the_longest_time_without_a_reply() -> None:

    replies = [10.00, 10.01, 10.02, 10.50, 10.51]
    assert bc.largest_gap(replies, 10.0, 10.6) == pytest.approx(0.48)
    # No reply at all inside the window: the whole window is the outage.
    assert bc.largest_gap([9.0, 11.0], 10.0, 10.3) == pytest.approx(0.3)


def test_the_nftables_twin_maps_the_same_prefixes_both_ways() -> None:
    from tools.bench import translate as bench_translate

    rules = bench_translate.nft_ruleset("10.10.0.0/16", "172.20.0.0/16")
    assert 'iifname "vx0" dnat ip prefix to ip daddr map { 172.20.0.0/16 : 10.10.0.0/16 }' in rules
    assert 'oifname "vx0" snat ip prefix to ip saddr map { 10.10.0.0/16 : 172.20.0.0/16 }' in rules


def test_sigterm_unwinds_only_the_benchmarking_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked helper (a library's) inherits the handler: it must exit, not run our cleanup."""
    import signal

    monkeypatch.setattr(bench, "_MAIN_PID", os.getpid())
    raised = False
    try:  # (pytest.raises would let pytest treat the KeyboardInterrupt as the user's Ctrl-C)
        bench._sigterm(signal.SIGTERM, None)
    except KeyboardInterrupt:
        raised = True
    assert raised
    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(bench, "_MAIN_PID", -1)
    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as e:
        bench._sigterm(signal.SIGTERM, None)
    assert e.value.code == 128 + signal.SIGTERM


def test_control_changes_are_spaced_beyond_the_longest_coalescing_window() -> None:
    """A fan-out timed inside the window would measure the coalescing delay, not the fan-out."""
    from fabric.control import reflector
    from tools.bench.control import params as bench_params

    assert bench_params.QUIET_S > reflector.DEFAULT_MAX_COALESCE_WINDOW_S


def test_control_agents_count_each_retry_by_the_status_that_failed_it() -> None:
    """A stream failed before admission is retried, and the note names why gRPC failed it (a
    refusal of a full backlog and a 30 s cancellation call for different cures)."""
    import asyncio

    from tools.bench.control import agents, driver
    from tools.bench.control import shapes as bench_shapes

    worker = agents._Worker(bench_shapes.Shape("p2p", 2), "unix:/nonexistent", "fabric", 0, 1)
    failures = ["RESOURCE_EXHAUSTED: Too many pending requests for this server"] * 2 + ["CANCELLED: Cancelled"]

    async def agent(i: int, channel: object) -> None:
        if failures:
            cause = failures.pop(0)
            raise agents.NotAdmitted(f"agent {i}: {cause}", cause)

    worker.agent = agent  # type: ignore[method-assign]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fabric.backoff.Backoff.next", lambda self: 0.0)
        asyncio.run(worker.agent_with_retries(0, None))
    assert worker.retries == 3
    assert worker.retry_causes == {"RESOURCE_EXHAUSTED: Too many pending requests for this server": 2,
                                   "CANCELLED: Cancelled": 1}  # fmt: skip
    assert driver._causes(dict(worker.retry_causes)) == (
        "2 'RESOURCE_EXHAUSTED: Too many pending requests for this server'; 1 'CANCELLED: Cancelled'")
