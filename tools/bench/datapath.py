"""Datapath benchmark: cross-cluster pod-to-pod TCP throughput and latency in P2P mode.

Three paths, measured round-robin in every round (so machine noise hits them alike):

* **ours** — a fresh lab (``tools.lab``; two P2P clusters, one node and one pod each, unique
  name, torn down afterwards): pod ``east/e1/p0`` to pod ``west/w1/p0`` through the fabric's
  ``vx-bridge`` devices, routes, FDB and neighbours, exactly as the agents programmed them.
* **vxlan** (the baseline) — the same shape built by hand in its own namespaces ``kft<hex>-*``
  with the kernel's own vxlan and no fabric: an underlay bridge namespace, two node namespaces
  (eth0 on the bridge, ip_forward, a ``vx0`` vxlan device VNI 54 / UDP 4876 with learning off,
  MTU 1450, static neighbour + FDB entry for the other node, a route to the other pod CIDR via
  its overlay address), and one pod per node behind a veth with the lab's Calico-style plumbing
  (pod /32, 169.254.1.1 default gateway answered by proxy ARP on the node side).
* **veth** — two namespaces joined by one veth pair: the floor no overlay can beat.

Metrics: iperf3 TCP throughput with 1 and 4 streams (Gb/s, receiver side), ping round trip p50
and p99 (µs, 10 ms interval) and TCP request/response rate (``tools.bench.rr``, both ends pinned
to one vCPU with ``taskset`` as reference/perf-baseline.md advises). Ratios: throughput and rate
ours / baseline, latency baseline / ours; ``ratio`` is against vxlan, ``veth_ratio`` against veth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

from fabric import netns as namespaces
from tools.bench import common as bc

_log = logging.getLogger(__name__)
NAME = "datapath"

UNITS = {
    "throughput_1_stream": "Gb/s",
    "throughput_4_streams": "Gb/s",
    "ping_p50": "µs",
    "ping_p99": "µs",
    "tcp_rr": "transactions/s",
}
HIGHER_IS_BETTER = {"throughput_1_stream": True, "throughput_4_streams": True, "ping_p50": False, "ping_p99": False,
                    "tcp_rr": True}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long each measurement runs (the tiny configuration shrinks all of them)."""

    iperf_s: float = 10.0
    pings: int = 500
    rr_s: float = 5.0


@dataclasses.dataclass(frozen=True)
class Path:
    name: str
    src_ns: str
    dst_ns: str
    dst_ip: str


HELP = "pod-to-pod TCP throughput, ping p50/p99, TCP RR across clusters vs kernel vxlan and veth"


def requires(opts: bc.Options) -> list[str]:
    return bc.need_root("the datapath benchmark") + bc.need_programs("ip", "bridge", "iperf3", "ping", "taskset")


def _sysctl(netns: str, values: dict[str, str]) -> None:
    def write() -> None:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
                fh.write(value)

    namespaces.run_in(netns, write)


@contextlib.contextmanager
def vxlan_path() -> Iterator[Path]:
    """The hand-built kernel-vxlan twin of the lab's P2P path (see the module docstring)."""
    p = bc.unique()
    ul, nodes, pods = f"{p}-ul", [f"{p}-a", f"{p}-b"], [f"{p}-pa", f"{p}-pb"]
    all_ns = [*pods, *nodes, ul]
    underlay = ["198.18.0.11", "198.18.0.12"]
    overlay = ["100.64.0.11", "100.64.0.12"]
    macs = ["02:6b:66:00:00:0b", "02:6b:66:00:00:0c"]
    pod_ips = ["10.10.1.2", "10.20.1.2"]
    pod_cidrs = ["10.10.1.0/24", "10.20.1.0/24"]
    try:
        for ns in all_ns:
            bc.ip_batch(None, [f"netns add {ns}"])
        bc.ip_batch(ul, ["link set lo up", "link add br0 type bridge", "addr add 198.18.0.1/16 dev br0",
                         "link set br0 up"])  # fmt: skip
        for i, node in enumerate(nodes):
            j = 1 - i
            bc.ip_batch(ul, [f"link add u{i} type veth peer name eth0 netns {node}", f"link set u{i} master br0",
                             f"link set u{i} up"])  # fmt: skip
            _sysctl(node, {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
                           "net.ipv4.conf.default.rp_filter": "0"})  # fmt: skip
            bc.ip_batch(node, [
                "link set lo up",
                f"addr add {underlay[i]}/16 dev eth0",
                "link set eth0 up",
                "route replace default via 198.18.0.1 dev eth0",
                f"link add vx0 address {macs[i]} mtu 1450 type vxlan id 54 dstport 4876 local {underlay[i]} dev eth0"
                " nolearning",
                f"addr add {overlay[i]}/10 dev vx0",
                "link set vx0 up",
                f"neigh replace {overlay[j]} lladdr {macs[j]} dev vx0 nud permanent",
                f"route replace {pod_cidrs[j]} via {overlay[j]} dev vx0 onlink",
                f"link add veth-p0 type veth peer name eth0 netns {pods[i]}",
                "link set veth-p0 up",
                f"route replace {pod_ips[i]}/32 dev veth-p0",
            ])  # fmt: skip
            bc.run_cmd(["bridge", "-n", node, "fdb", "append", macs[j], "dev", "vx0", "dst", underlay[j], "self",
                        "permanent"])  # fmt: skip
            _sysctl(node, {"net.ipv4.conf.veth-p0.proxy_arp": "1"})
            bc.ip_batch(pods[i], [
                "link set lo up",
                f"addr add {pod_ips[i]}/32 dev eth0",
                "link set eth0 up",
                "route replace 169.254.1.1 dev eth0 scope link",
                "route replace default via 169.254.1.1 dev eth0",
            ])  # fmt: skip
        yield Path("vxlan", pods[0], pods[1], pod_ips[1])
    finally:
        bc.delete_netns(all_ns)


@contextlib.contextmanager
def veth_path() -> Iterator[Path]:
    """Two namespaces joined by one veth pair."""
    p = bc.unique()
    a, b = f"{p}-va", f"{p}-vb"
    try:
        bc.ip_batch(None, [f"netns add {a}", f"netns add {b}"])
        bc.ip_batch(a, ["link set lo up", f"link add eth0 type veth peer name eth0 netns {b}",
                        "addr add 192.168.77.1/24 dev eth0", "link set eth0 up"])  # fmt: skip
        bc.ip_batch(b, ["link set lo up", "addr add 192.168.77.2/24 dev eth0", "link set eth0 up"])
        yield Path("veth", a, b, "192.168.77.2")
    finally:
        bc.delete_netns([a, b])


def _measure(procs: bc.Procs, path: Path, s: Settings, cpu: int) -> dict[str, float]:
    out: dict[str, float] = {}
    out["throughput_1_stream"] = bc.iperf_gbps(procs, path.src_ns, path.dst_ns, path.dst_ip, 1, s.iperf_s)
    out["throughput_4_streams"] = bc.iperf_gbps(procs, path.src_ns, path.dst_ns, path.dst_ip, 4, s.iperf_s)
    rtts = bc.ping_rtts_us(path.src_ns, path.dst_ip, s.pings)
    if len(rtts) < s.pings * 0.9:
        raise RuntimeError(f"{path.name} path lost {s.pings - len(rtts)} of {s.pings} pings")
    out["ping_p50"] = bc.percentile(rtts, 50)
    out["ping_p99"] = bc.percentile(rtts, 99)
    out["tcp_rr"] = bc.rr_rate(procs, path.src_ns, path.dst_ns, path.dst_ip, s.rr_s, cpu)
    return out


def run(opts: bc.Options) -> bc.Report:
    s = Settings(iperf_s=1.0, pings=20, rr_s=0.5) if opts.tiny else Settings()
    repeat = opts.repeat
    cpu = max(os.sched_getaffinity(0))
    report = bc.Report(units=dict(UNITS))
    samples: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        procs = stack.enter_context(bc.procs())
        pods = stack.enter_context(bc.p2p_lab(NAME))
        bc.progress(NAME, "building the plain kernel-vxlan and veth baselines")
        paths = [
            Path("ours", pods.src_ns, pods.dst_ns, pods.dst_ip),
            stack.enter_context(vxlan_path()),
            stack.enter_context(veth_path()),
        ]
        for path in paths:
            bc.check_reachable(path.name, path.src_ns, path.dst_ip)
        for rnd in range(repeat):
            for path in paths:
                bc.progress(NAME, f"round {rnd + 1}/{repeat}: {path.name} path (iperf3 {s.iperf_s:g}s x2, "
                            f"{s.pings} pings, TCP RR {s.rr_s:g}s on vCPU {cpu})")  # fmt: skip
                for metric, value in _measure(procs, path, s, cpu).items():
                    samples.setdefault(metric, {}).setdefault(path.name, []).append(value)
    for metric, by in samples.items():
        report.figures[metric] = bc.figure(
            by["ours"], {"": by["vxlan"], "veth": by["veth"]}, higher_is_better=HIGHER_IS_BETTER[metric]
        )
    report.notes.append(
        "baseline = the same pod/node shape over a hand-built kernel vxlan (static FDB/neighbour/route, no fabric); "
        "veth = two namespaces on one veth pair. TCP RR uses a Python 1-byte ping-pong with both ends on "
        f"vCPU {cpu}; its Python cost is the same on every path, so its ratios understate path differences."
    )
    return report
