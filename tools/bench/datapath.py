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
* **vxlan_rt** — the vxlan twin again, but with the remote pod CIDR routed the way the agent
  routed it with ``--table 200`` (a nexthop object, the route in table 200 behind an ip rule,
  protocol 75; the default before 2026-12; the default now is the main table, no rule).
  ``ours`` : ``vxlan_rt`` is everything else the fabric's path has (nothing else, when this
  benchmark was last examined: no tc/XDP program, no nftables table, no conntrack entry, no packet
  socket, identical sysctls, offloads and MTUs in every namespace); the ``routes_only_*`` rows are
  ``vxlan_rt`` : ``vxlan``, what the routing shape alone costs.
* **veth** — two namespaces joined by one veth pair: the floor no overlay can beat.

Rounds rotate the order of the paths, and every ratio is *paired*: the median over rounds of
that round's ratio (``tools.bench.common.paired_ratio``). On this shared 2-vCPU machine one
path's throughput drifts by tens of per cent from round to round, far more than the paths differ;
two paths measured seconds apart see the same drift, which the per-round ratio cancels.

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
from fabric.netlink.objects import DEFAULT_RULE_PRIORITY, DEFAULT_TABLE, RTPROT_FABRIC
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


HELP = ("pod-to-pod TCP throughput, ping p50/p99, TCP RR across clusters vs kernel vxlan (with and without a "
        "policy-routing rule) and veth")


def requires(opts: bc.Options) -> list[str]:
    return bc.need_root("the datapath benchmark") + bc.need_programs("ip", "bridge", "iperf3", "ping", "taskset")


def _sysctl(netns: str, values: dict[str, str]) -> None:
    def write() -> None:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
                fh.write(value)

    namespaces.run_in(netns, write)


@contextlib.contextmanager
def vxlan_path(*, rule: bool = False, nexthop: bool = False, name: str = "vxlan") -> Iterator[Path]:
    """The hand-built kernel-vxlan twin of the lab's P2P path (see the module docstring).

    With ``rule`` and ``nexthop`` the route to the other pod CIDR is programmed the way the agent
    programs it: in the fabric's own table selected by an ip rule (``rule``), through a nexthop
    object ``onlink`` via the other node's overlay address (``nexthop``), with the fabric's route
    protocol. That twin isolates what the fabric's routing shape costs from everything else on
    the path; each flag alone tells the two parts apart.
    """
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
                *_route(pod_cidrs[j], overlay[j], rule=rule, nexthop=nexthop),
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
        yield Path(name, pods[0], pods[1], pod_ips[1])
    finally:
        bc.delete_netns(all_ns)


def _route(cidr: str, via: str, *, rule: bool, nexthop: bool) -> list[str]:
    """``ip`` commands routing ``cidr`` over vx0 via ``via``: plainly in the main table, or with
    the parts of the agent's routing shape (fabric.netlink.objects: table and rule priority 200,
    route protocol 75, nexthop objects)."""
    proto = RTPROT_FABRIC
    table = f" table {DEFAULT_TABLE} protocol {proto}" if rule else ""
    cmds = [f"rule add priority {DEFAULT_RULE_PRIORITY} lookup {DEFAULT_TABLE} protocol {proto}"] if rule else []
    if nexthop:
        cmds += [f"nexthop add id 1 via {via} dev vx0 onlink protocol {proto}", f"route replace {cidr} nhid 1{table}"]
    else:
        cmds += [f"route replace {cidr} via {via} dev vx0 onlink{table}"]
    return cmds


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
            stack.enter_context(vxlan_path(rule=True, nexthop=True, name="vxlan_rt")),
            stack.enter_context(veth_path()),
        ]
        for path in paths:
            bc.check_reachable(path.name, path.src_ns, path.dst_ip)
        for rnd in range(repeat):
            # Rotate the order each round: no path always runs first (after another path's load).
            for path in paths[rnd % len(paths):] + paths[: rnd % len(paths)]:
                bc.progress(NAME, f"round {rnd + 1}/{repeat}: {path.name} path (iperf3 {s.iperf_s:g}s x2, "
                            f"{s.pings} pings, TCP RR {s.rr_s:g}s on vCPU {cpu})")  # fmt: skip
                for metric, value in _measure(procs, path, s, cpu).items():
                    samples.setdefault(metric, {}).setdefault(path.name, []).append(value)
    report.samples = samples
    for metric, by in samples.items():
        higher = HIGHER_IS_BETTER[metric]
        report.figures[metric] = bc.figure(
            by["ours"], {"": by["vxlan"], "vxlan_rt": by["vxlan_rt"], "veth": by["veth"]}, higher_is_better=higher,
            paired=True,
        )  # fmt: skip
        # What the fabric's routing shape alone costs: the hand-built path with it vs without it.
        report.figures[f"routes_only_{metric}"] = bc.figure(
            by["vxlan_rt"], {"": by["vxlan"]}, higher_is_better=higher, paired=True
        )
        report.units[f"routes_only_{metric}"] = UNITS[metric]
    report.notes.append(
        "baseline = the same pod/node shape over a hand-built kernel vxlan (static FDB/neighbour/route, no fabric); "
        "vxlan_rt = that path with its route in table 200 behind an ip rule through a nexthop object (the agent's "
        "--table 200; the default is main), routes_only_* = vxlan_rt vs baseline: what such a rule costs; "
        "veth = two namespaces on one veth pair. Paths run in a rotating order; every ratio is the median of "
        "per-round ratios (paired). TCP RR uses a Python 1-byte ping-pong with both ends on "
        f"vCPU {cpu}; its Python cost is the same on every path, so its ratios understate path differences."
    )
    return report
