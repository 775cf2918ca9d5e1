"""Gateway benchmark: a non-gateway pod's cross-cluster traffic through both gateways.

One fresh lab (``tools.lab``, unique name, torn down afterwards) holds every path, so they are
measured side by side in every round:

* two gateway-mode clusters, ``west`` (nodes w1, w2; gateway w1 only) and ``north`` (n1, n2;
  gateway n1 only), one pod per node;
* two P2P clusters, ``east`` (e1) and ``south`` (s1), one pod each.

Paths (all towards a pod on a *non-gateway* node of the other cluster where gateways exist):

* **ours** - ``west/w2/p0`` -> ``north/n2/p0``: non-gateway node -> vx-local -> gateway w1 ->
  vx-bridge -> gateway n1 -> vx-local -> n2. This is what most pods of a gateway cluster see.
* **gateway-node pod** (the baseline) - ``west/w1/p0`` -> ``north/n2/p0``: the same path minus
  the first vx-local hop, i.e. a pod scheduled on the gateway itself. Submariner users measured
  non-gateway pods at 44-75 % of gateway-node pods' throughput; ``ratio`` is ours / this.
* **p2p** - ``east/e1/p0`` -> ``south/s1/p0``: one vxlan hop node to node; ``p2p_ratio`` and the
  ``added_latency_*`` figures say what the gateway path costs over P2P.

Active/active (issue 21 section 2), in a second fresh lab (:mod:`tools.bench.active_active`):
**throughput_4_streams_2_active** = the summed throughput of 4 parallel TCP flows from 4
different nodes of a P2P cluster to a pod on the internal node of a gateway cluster with
``activeGateways: 2``, against the same flows to a twin cluster with 1 active gateway, measured
alternately in every round (ratio = 2 active / 1 active). Which gateway each flow crosses is the
kernel's hash: the note gives the split.

Metrics per path and round: iperf3 TCP throughput with 1 and 4 streams (Gb/s, receiver side) and
its retransmits, ping p50/p99 (µs, 10 ms interval). Ratios: throughput ours / baseline, latency
and retransmits baseline / ours (higher is better).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from tools.bench import active_active as aa
from tools.bench import common as bc

_log = logging.getLogger(__name__)
NAME = "gateway"
HELP = ("non-gateway pod to a remote non-gateway pod through both gateways vs a gateway-node pod on the same "
        "path and vs the P2P path")  # fmt: skip

TOPOLOGY = {
    "clusters": [
        {"name": "west", "mode": "gateway", "gateways": ["w1"], "podCIDRs": ["10.20.0.0/16"],
         "nodes": [{"name": "w1", "pods": 1}, {"name": "w2", "pods": 1}]},
        {"name": "north", "mode": "gateway", "gateways": ["n1"], "podCIDRs": ["10.30.0.0/16"],
         "nodes": [{"name": "n1", "pods": 1}, {"name": "n2", "pods": 1}]},
        {"name": "east", "mode": "p2p", "podCIDRs": ["10.10.0.0/16"], "nodes": [{"name": "e1", "pods": 1}]},
        {"name": "south", "mode": "p2p", "podCIDRs": ["10.40.0.0/16"], "nodes": [{"name": "s1", "pods": 1}]},
    ]
}  # fmt: skip
#: path name -> (source node, destination node)
PATHS = {"ours": ("west/w2", "north/n2"), "gwnode": ("west/w1", "north/n2"), "p2p": ("east/e1", "south/s1")}


@dataclasses.dataclass(frozen=True)
class Settings:
    iperf_s: float = 8.0
    pings: int = 500


def requires(opts: bc.Options) -> list[str]:
    return bc.need_root("the gateway benchmark") + bc.need_programs("ip", "iperf3", "ping")


def run(opts: bc.Options) -> bc.Report:
    s = Settings(iperf_s=1.0, pings=20) if opts.tiny else Settings()
    samples: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        procs = stack.enter_context(bc.procs())
        state = stack.enter_context(bc.lab_env(NAME, TOPOLOGY, "2 gateway clusters of 2 nodes, 2 P2P clusters"))
        ends = {p: (bc.first_pod(state, a), bc.first_pod(state, b)) for p, (a, b) in PATHS.items()}
        for path, (src, dst) in ends.items():
            bc.check_reachable(path, src.netns, dst.ip)
        for rnd in range(opts.repeat):
            for path, (src, dst) in ends.items():
                bc.progress(NAME, f"round {rnd + 1}/{opts.repeat}: {path} path {PATHS[path][0]} -> {PATHS[path][1]} "
                            f"(iperf3 {s.iperf_s:g}s x2, {s.pings} pings)")  # fmt: skip
                got = bc.path_metrics(procs, path, src.netns, dst.netns, dst.ip, iperf_s=s.iperf_s, pings=s.pings)
                for metric, value in got.items():
                    samples.setdefault(metric, {}).setdefault(path, []).append(value)
    aa_one, aa_two, split = _active_active(opts, s)
    report = bc.Report(units=dict(bc.PATH_UNITS))
    report.figures["throughput_4_streams_2_active"] = bc.figure(aa_two, {"": aa_one}, higher_is_better=True)
    report.units["throughput_4_streams_2_active"] = "Gb/s"
    report.notes.append(
        f"throughput_4_streams_2_active = summed iperf3 throughput of {len(aa.SOURCES)} parallel TCP flows (one per "
        "node of a 4-node P2P cluster) to a pod on the internal node of a gateway cluster with 2 active gateways; "
        "baseline = the same flows to a twin cluster with 1 active gateway, alternately in every round. Flows per "
        f"gateway (the kernel's multipath hash): {split}. One machine's cores carry every namespace, so the "
        "figure shows what a second gateway adds when the gateways share the CPUs."
    )
    for metric, by in samples.items():
        report.figures[metric] = bc.figure(by["ours"], {"": by["gwnode"], "p2p": by["p2p"]},
                                           higher_is_better=bc.PATH_HIGHER_IS_BETTER[metric])  # fmt: skip
    for pct in ("p50", "p99"):
        by = samples[f"ping_{pct}"]
        added = [ours - p2p for ours, p2p in zip(by["ours"], by["p2p"], strict=True)]
        fig = bc.spread(added)
        fig["ratio"] = report.figures[f"ping_{pct}"]["p2p_ratio"]
        report.figures[f"added_latency_{pct}"] = fig
        report.units[f"added_latency_{pct}"] = "µs"
    report.notes.append(
        "ours = pod on a non-gateway node (west/w2) to a pod on a non-gateway node of another gateway cluster "
        "(north/n2), through both gateways; baseline = a pod on the gateway node (west/w1) to the same "
        "destination (Submariner users measured non-gateway pods at 44-75 % of it); p2p = pod to pod across "
        "two P2P clusters in the same lab. added_latency = ours minus p2p per round (its ratio is the ping's "
        "p2p_ratio). Retransmit ratios are NaN (n/a) when a side had none."
    )
    return report


def _active_active(opts: bc.Options, s: Settings) -> tuple[list[float], list[float], str]:
    """Per round the summed throughput to the 1-active and the 2-active cluster, and the flow split."""
    one: list[float] = []
    two: list[float] = []
    with contextlib.ExitStack() as stack:
        procs = stack.enter_context(bc.procs())
        state = stack.enter_context(bc.lab_env(NAME, aa.TOPOLOGY, aa.WHAT))
        aa.check(state, NAME)
        split = aa.split_text(aa.flow_gateways(state))
        for rnd in range(opts.repeat):
            for cluster, out in (("one", one), ("two", two)) if rnd % 2 == 0 else (("two", two), ("one", one)):
                bc.progress(NAME, f"round {rnd + 1}/{opts.repeat}: {len(aa.SOURCES)} parallel flows to cluster "
                            f"{cluster} (iperf3 {s.iperf_s:g}s)")  # fmt: skip
                out.append(aa.parallel_gbps(state, procs, cluster, s.iperf_s))
    return one, two, split
