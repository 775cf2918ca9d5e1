"""Active/active gateways (issue 21 section 2): the lab and the measurements ``bench gateway``
and ``bench failover`` share.

The lab (fresh, unique name, torn down by the caller's ``bc.lab_env``): a P2P cluster ``east``
with four nodes (e1-e4, one pod each: the flows come from different nodes) and two gateway-mode
clusters that differ only in ``activeGateways``: ``one`` (o1 the only candidate, 1 active; the
baseline) and ``two`` (t1, t2 candidates, 2 actives). The flows go to a pod on the clusters'
internal node (o2, t3), so every packet crosses a gateway both ways.

* :func:`parallel_gbps`: one iperf3 TCP stream per east pod, all at once, to its own iperf3
  server in the destination pod; the sum of the receivers' throughput.
* :func:`flow_gateways`: which of ``two``'s gateways carries each flow (one 50-packet ping per
  flow alone, counted on each gateway's vx-bridge): the split is part of the figure, since the
  kernel's hash decides it (4 flows: every split from 4-0 to 2-2 happens).
* :func:`cut_one`: continuous 10 ms pings on every flow to ``two``, one gateway cut off the
  underlay (as ``fabric-tool lab fail``), healed after the survivors' group shrank; per flow the
  lost packets and the longest gap between the cut and the heal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import subprocess
import tempfile
import time
from typing import IO, Any

from tools import lab, nsutil
from tools.bench import common as bc

SOURCES = ("east/e1", "east/e2", "east/e3", "east/e4")
#: cluster -> (destination node, its gateways)
DESTS = {"one": ("one/o2", ("o1",)), "two": ("two/t3", ("t1", "t2"))}
TOPOLOGY = {
    "clusters": [
        {"name": "east", "mode": "p2p", "podCIDRs": ["10.10.0.0/16"],
         "nodes": [{"name": f"e{i}", "pods": 1} for i in range(1, 5)]},
        {"name": "one", "mode": "gateway", "gateways": ["o1"], "podCIDRs": ["10.60.0.0/16"],
         "nodes": [{"name": "o1", "pods": 1}, {"name": "o2", "pods": 1}]},
        {"name": "two", "mode": "gateway", "gateways": ["t1", "t2"], "activeGateways": 2,
         "podCIDRs": ["10.70.0.0/16"],
         "nodes": [{"name": "t1", "pods": 1}, {"name": "t2", "pods": 1}, {"name": "t3", "pods": 1}]},
    ]
}  # fmt: skip
WHAT = "P2P east (4 nodes), gateway clusters 'one' (1 active) and 'two' (2 active gateways)"
CLASSIFY_COUNT = 50
INTERVAL_S = 0.01


def _pods(state: lab.LabState, cluster: str) -> tuple[list[lab.PodRecord], lab.PodRecord]:
    return [bc.first_pod(state, s) for s in SOURCES], bc.first_pod(state, DESTS[cluster][0])


def check(state: lab.LabState, bench: str) -> None:
    """Every flow of both clusters answers (a clear error before measuring anything)."""
    for cluster in DESTS:
        srcs, dst = _pods(state, cluster)
        for s in srcs:
            bc.check_reachable(f"{bench}: {s.netns} -> {cluster}", s.netns, dst.ip)


def parallel_gbps(state: lab.LabState, procs: bc.Procs, cluster: str, seconds: float) -> float:
    """Sum of the receivers' TCP throughput (Gb/s) of one stream per source pod, all at once."""
    srcs, dst = _pods(state, cluster)
    ports = [bc.IPERF_PORT + i for i in range(len(srcs))]
    servers = [procs.spawn(dst.netns, ["iperf3", "-s", "-1", "-B", dst.ip, "-p", str(p)]) for p in ports]
    clients: list[subprocess.Popen[bytes]] = []
    try:
        for server, port in zip(servers, ports, strict=True):
            nsutil.wait_listening(dst.netns, port, server)
        for s, port in zip(srcs, ports, strict=True):
            argv = ["iperf3", "-c", dst.ip, "-p", str(port), "-t", f"{seconds:g}", "-J", "--connect-timeout", "2000"]
            clients.append(procs.spawn(s.netns, argv, stdout=subprocess.PIPE))
        total = 0.0
        for c, s in zip(clients, srcs, strict=True):
            out, _ = c.communicate(timeout=seconds + 30)
            doc = json.loads(out or b"{}")
            got = doc.get("end", {}).get("sum_received", {}).get("bits_per_second")
            if got is None:
                raise RuntimeError(f"iperf3 {s.netns} -> {dst.ip} ({cluster}) failed: {doc.get('error', 'no JSON')}")
            total += float(got) / 1e9
        return total
    finally:
        for p in [*clients, *servers]:
            procs.stop(p)


def _bridge_rx(state: lab.LabState, gw: str) -> int:
    node = state.node(f"two/{gw}")
    assert node is not None
    out = subprocess.run(["ip", "-n", node.netns, "-j", "-s", "link", "show", "vx-bridge"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def flow_gateways(state: lab.LabState) -> dict[str, str]:
    """Source node -> the gateway of ``two`` its flow crosses (see the module docstring)."""
    srcs, dst = _pods(state, "two")
    gws = DESTS["two"][1]
    out = {}
    for key, s in zip(SOURCES, srcs, strict=True):
        before = {g: _bridge_rx(state, g) for g in gws}
        bc.run_in(s.netns, ["ping", "-n", "-q", "-i", f"{INTERVAL_S:g}", "-c", str(CLASSIFY_COUNT), dst.ip], 60)
        grew = {g: _bridge_rx(state, g) - before[g] for g in gws}
        out[key] = max(gws, key=lambda g: grew[g])
    return out


@dataclasses.dataclass
class CutResult:
    gateway: str
    #: Per source node: (gateway before the cut, lost packets, longest gap between cut and heal in
    #: ms, longest gap in the second before the cut in ms: the same flow's quiet baseline).
    flows: dict[str, tuple[str, int, float, float]]

    def on(self, survivor: bool) -> list[tuple[str, int, float, float]]:
        return [f for f in self.flows.values() if (f[0] != self.gateway) == survivor]


def cut_one(state: lab.LabState, procs: bc.Procs, gateway: str, run_after_s: float,
            progress: Any) -> CutResult:  # fmt: skip
    """Pings on every flow to ``two``; cut ``two/<gateway>``, heal it ``run_after_s`` after the
    remote group lost it; per flow the loss and the outage (see the module docstring)."""
    split = flow_gateways(state)
    srcs, dst = _pods(state, "two")
    with contextlib.ExitStack() as stack:
        logs: list[IO[bytes]] = [stack.enter_context(tempfile.TemporaryFile()) for _ in srcs]
        pings = [procs.spawn(s.netns, ["ping", "-n", "-D", "-i", f"{INTERVAL_S:g}", "-W", "1", dst.ip], stdout=log)
                 for s, log in zip(srcs, logs, strict=True)]  # fmt: skip
        time.sleep(1.5)
        cut_at = time.time()
        lab.set_failed(state.name, f"two/{gateway}", True, progress=progress)
        try:
            e1 = state.node(SOURCES[0])
            assert e1 is not None
            deadline = time.monotonic() + 15
            while _group_size(e1.netns, "10.70.0.0/16") != 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"two/{gateway} did not leave east/e1's nexthop group within 15 s")
                time.sleep(0.05)
            time.sleep(run_after_s)
            heal_at = time.time()
        finally:
            lab.set_failed(state.name, f"two/{gateway}", False, progress=progress)
        time.sleep(1.0)
        flows = {}
        for p in pings:
            p.send_signal(signal.SIGINT)  # ping prints its summary (sent, received) on SIGINT
        for key, p, log in zip(SOURCES, pings, logs, strict=True):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            procs.stop(p)
            log.seek(0)
            text = log.read().decode(errors="replace")
            replies = bc.ping_reply_times(text)
            sent, received = bc.ping_counts(text)
            lost = sent - received
            gap, quiet_gap = bc.largest_gap(replies, cut_at, heal_at), bc.largest_gap(replies, cut_at - 1, cut_at)
            flows[key] = (split[key], lost, gap * 1000, quiet_gap * 1000)
    return CutResult(gateway, flows)


def _group_size(netns: str, dst: str) -> int:
    """Members of the nexthop group the route to ``dst`` (main table) uses; 1 for a plain nexthop."""
    nhs = {nh["id"]: nh for nh in json.loads(subprocess.run(
        ["ip", "-n", netns, "-j", "nexthop", "show"], capture_output=True, text=True, check=True).stdout or "[]")}
    routes = json.loads(subprocess.run(["ip", "-n", netns, "-j", "route", "show", "table", "main"],
                                       capture_output=True, text=True, check=True).stdout or "[]")  # fmt: skip
    for r in routes:
        if r["dst"] == dst and r.get("nhid") in nhs:
            return len(nhs[r["nhid"]].get("group", [None]))
    return 0


def split_text(split: dict[str, str]) -> str:
    counts = {g: sum(1 for v in split.values() if v == g) for g in DESTS["two"][1]}
    return "-".join(str(c) for c in counts.values())


def describe(result: CutResult) -> dict[str, Any]:
    return {k: {"gateway": g, "lost": lost, "gap_ms": round(gap)} for k, (g, lost, gap, _) in result.flows.items()}
