"""Translate benchmark: what global-IP translation costs, end to end and per packet.

Issue 4's aim: translation costs under 3 % throughput and is not slower than iptables. Paths,
measured round-robin in every round (so machine noise hits them alike):

* **lab** - one fresh lab (``tools.lab``, unique name, torn down afterwards) of four P2P
  clusters with one node and one pod each: ``east`` and ``west`` both use 10.10.0.0/16 (the
  overlapping common case) mapped to 172.20.0.0/16 and 172.22.0.0/16; ``north`` (10.30.0.0/16)
  and ``south`` (10.40.0.0/16) have no mapping. *ours* = ``east/e1/p0`` -> west's pod by its
  global IP, translated by the agents' BPF programs on both ``vx-bridge`` devices; *baseline* =
  ``north/n1/p0`` -> ``south/s1/p0``, the same shape untranslated.
* **vxlan_** - three copies of the datapath benchmark's hand-built kernel-vxlan path (no
  fabric; pods 10.10.1.2 and 10.20.1.2, node overlay addresses 100.64.0.11/.12), each with
  routes to the other side's global CIDR (172.20.0.0/16 <-> 10.10.0.0/16 on node a,
  172.22.0.0/16 <-> 10.20.0.0/16 on node b) and the pod addressed by its global IP:
  *ours* = our translator (``fabric.bpf.translate``, the agent's programs and loader) attached
  to both ``vx0`` devices; *baseline* = the same path untranslated (pod addressed by its real
  IP); *nft* = the same mapping done by netfilter. This machine has no ``iptables`` binary, so
  the NETMAP + SNAT pair is written in nftables with the same semantics: ``dnat ip prefix to ip
  daddr map {global : local}`` on prerouting from ``vx0`` (iptables' NETMAP in PREROUTING) and
  ``snat ip prefix to ip saddr map {local : global}`` on postrouting to ``vx0`` (NETMAP in
  POSTROUTING), both stateful through conntrack, as iptables NAT is.
* **prog_ns_** - per-packet cost of the programs themselves, ``BPF_PROG_TEST_RUN`` on TCP, UDP
  and ICMP-error packets (v4 and v6), tunnel ingress (destination global -> local) and egress
  (source local -> global). See :func:`_prog_costs` for why a large repeat count alone measures
  the *untranslated* path, and how the translating run is measured.

Metrics per path and round: iperf3 TCP throughput with 1 and 4 streams (Gb/s, receiver side),
the sender's TCP retransmits of those runs (does translation cause retransmits?), ping p50/p99
(µs, 10 ms interval). Ratios: throughput ours / baseline; latency, retransmits and ns per packet
baseline / ours (higher is better).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tools.bench import common as bc
from tools.bench import datapath as bench_datapath

_log = logging.getLogger(__name__)
NAME = "translate"
HELP = ("cross-cluster pod-to-pod TCP throughput, retransmits and ping with global-IP translation vs untranslated "
        "and vs an nftables NETMAP/SNAT pair; per-packet BPF program cost")  # fmt: skip

LAB_TOPOLOGY = {
    "clusters": [
        {"name": "east", "mode": "p2p", "podCIDRs": ["10.10.0.0/16"], "globalCIDRs": {"10.10.0.0/16": "172.20.0.0/16"},
         "nodes": [{"name": "e1", "pods": 1}]},
        {"name": "west", "mode": "p2p", "podCIDRs": ["10.10.0.0/16"], "globalCIDRs": {"10.10.0.0/16": "172.22.0.0/16"},
         "nodes": [{"name": "w1", "pods": 1}]},
        {"name": "north", "mode": "p2p", "podCIDRs": ["10.30.0.0/16"], "nodes": [{"name": "n1", "pods": 1}]},
        {"name": "south", "mode": "p2p", "podCIDRs": ["10.40.0.0/16"], "nodes": [{"name": "s1", "pods": 1}]},
    ]
}  # fmt: skip

# The hand-built path's two sides (bench_datapath.vxlan_path): node namespace suffix, local
# CIDR, global CIDR, overlay address, pod IP; each side maps its own CIDR and routes the other's
# global CIDR over vx0.
SIDES = (
    ("a", "10.10.0.0/16", "172.20.0.0/16", "100.64.0.11", "10.10.1.2"),
    ("b", "10.20.0.0/16", "172.22.0.0/16", "100.64.0.12", "10.20.1.2"),
)
GLOBAL_DST = "172.22.1.2"  # pod b by its global IP
# IPv6 mapping loaded next to side a's for the per-packet cost of the v6 programs.
V6_LOCAL, V6_GLOBAL = "fd00:10::/64", "fd00:20::/64"
NFT_TABLE = "kftxlate"
BENCH_RUN_DIR = Path("/run/kosmos-fabric/bench")


@dataclasses.dataclass(frozen=True)
class Settings:
    iperf_s: float = 8.0
    pings: int = 500
    #: BPF_PROG_TEST_RUN: repeat count of the one-call run, number of single-run calls.
    prog_repeat: int = 1_000_000
    prog_singles: int = 20_000


def requires(opts: bc.Options) -> list[str]:
    out = bc.need_root("the translate benchmark") + bc.need_programs("ip", "bridge", "iperf3", "ping", "nft", "mount")
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        out.append(f"bcc (python3-bpfcc) is not importable ({e}): the translator's programs cannot be compiled")
    try:
        import scapy  # noqa: F401
    except ImportError as e:
        out.append(f"scapy is not importable ({e}): it builds the packets of the per-packet cost")
    return out


# -- the hand-built paths --------------------------------------------------------------------


def _node_ns(path: bench_datapath.Path, side: str) -> str:
    """Node namespace of ``side`` (a/b) of a path built by :func:`bench_datapath.vxlan_path`
    (its pods are ``<prefix>-pa``/``-pb``, its nodes ``<prefix>-a``/``-b``)."""
    return path.src_ns.rsplit("-", 1)[0] + f"-{side}"


def _route_globals(path: bench_datapath.Path) -> None:
    for (side, *_rest), (_s, _l, other_global, other_overlay, _p) in zip(SIDES, reversed(SIDES), strict=True):
        bc.ip_batch(_node_ns(path, side), [f"route replace {other_global} via {other_overlay} dev vx0 onlink"])


def nft_ruleset(local: str, global_: str) -> str:
    """NETMAP + SNAT of one node in nftables: 1:1 by prefix, inbound and outbound on vx0."""
    return (
        f"table ip {NFT_TABLE} {{\n"
        f"  chain pre {{ type nat hook prerouting priority dstnat; "
        f'iifname "vx0" dnat ip prefix to ip daddr map {{ {global_} : {local} }}; }}\n'
        f"  chain post {{ type nat hook postrouting priority srcnat; "
        f'oifname "vx0" snat ip prefix to ip saddr map {{ {local} : {global_} }}; }}\n'
        f"}}\n"
    )


@contextlib.contextmanager
def nft_path() -> Iterator[bench_datapath.Path]:
    with bench_datapath.vxlan_path() as path:
        _route_globals(path)
        for side, local, global_, _o, _p in SIDES:
            ns = _node_ns(path, side)
            res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=nft_ruleset(local, global_),
                                 capture_output=True, text=True, check=False)  # fmt: skip
            if res.returncode != 0:
                raise RuntimeError(f"nft in {ns} failed: {res.stderr.strip()}")
        yield dataclasses.replace(path, name="nft", dst_ip=GLOBAL_DST)


@contextlib.contextmanager
def bpffs() -> Iterator[Path]:
    """A private bpf filesystem instance under /run/kosmos-fabric/bench: nothing is pinned in the
    machine's /sys/fs/bpf, and the mount point is unmounted and removed afterwards."""
    BENCH_RUN_DIR.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="bpf-", dir=BENCH_RUN_DIR))
    bc.run_cmd(["mount", "-t", "bpf", "bpf", str(d)])
    try:
        yield d
    finally:
        res = subprocess.run(["umount", str(d)], check=False, capture_output=True, text=True)
        if res.returncode != 0:
            _log.warning("cannot unmount %s: %s", d, res.stderr.strip())
        else:
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()


@contextlib.contextmanager
def bpf_path(pin_root: Path) -> Iterator[tuple[bench_datapath.Path, Any]]:
    """The hand-built path with our translator on both vx0; yields it and side a's Translator."""
    from fabric.bpf import translate

    with bench_datapath.vxlan_path() as path, contextlib.ExitStack() as stack:
        _route_globals(path)
        translators = []
        for side, local, global_, _o, _p in SIDES:
            t = translate.Translator(f"bench-{side}", pin_root=pin_root, netns=_node_ns(path, side))
            stack.callback(t.cleanup, ["vx0"])
            t.load()
            table = {local: global_, **({V6_LOCAL: V6_GLOBAL} if side == "a" else {})}
            delta = t.set_mappings(translate.parse_mappings(table, f"translate benchmark, node {side}"))
            if delta.failed:
                raise RuntimeError(f"translator of hand-built node {side}: mappings failed: {delta.failed}")
            t.attach_tunnel("vx0")
            translators.append(t)
        yield dataclasses.replace(path, name="bpf", dst_ip=GLOBAL_DST), translators[0]


# -- per-packet program cost -----------------------------------------------------------------


def _packets() -> dict[str, tuple[str, bytes, bytes]]:
    """metric -> (attach point name, translated packet, untranslated twin) as side a sees them.

    The twin differs only in the address the program looks up (outside every mapping), so it
    takes the same parse and the LPM lookup, and misses.
    """
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Packet, Raw

    def frame(pkt: Packet) -> bytes:
        return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt)

    pay = Raw(b"x" * 64)
    us4_l, us4_g, us4_none, them4 = "10.10.1.2", "172.20.1.2", "172.30.1.2", "172.22.1.2"
    src4_none = "10.99.1.2"
    us6_l, us6_g, us6_none, them6 = "fd00:10::1:2", "fd00:20::1:2", "fd00:30::1:2", "fd00:22::1:2"
    src6_none = "fd00:99::1:2"
    out: dict[str, tuple[str, bytes, bytes]] = {}
    for fam, ip_, us_l, us_g, none_in, none_out, them in (
        ("4", IP, us4_l, us4_g, us4_none, src4_none, them4),
        ("6", IPv6, us6_l, us6_g, us6_none, src6_none, them6),
    ):
        l4s = (("tcp", TCP(sport=40000, dport=5201, flags="PA", seq=7)), ("udp", UDP(sport=40000, dport=53)))
        for proto, l4 in l4s:
            out[f"prog_ns_{proto}{fam}_in"] = ("TUNNEL_INGRESS", frame(ip_(src=them, dst=us_g) / l4 / pay),
                                               frame(ip_(src=them, dst=none_in) / l4 / pay))  # fmt: skip
            out[f"prog_ns_{proto}{fam}_out"] = ("TUNNEL_EGRESS", frame(ip_(src=us_l, dst=them) / l4 / pay),
                                                frame(ip_(src=none_out, dst=them) / l4 / pay))  # fmt: skip
        # ICMP errors quoting a whole packet: inbound "fragmentation needed" / "packet too big"
        # about a TCP segment we sent (outer destination and quoted source translated);
        # outbound "port unreachable" about a UDP datagram we got (outer source and quoted
        # destination translated).
        seg = TCP(sport=33000, dport=443, flags="PA") / pay
        dgram = UDP(sport=5000, dport=6000) / pay
        if fam == "4":
            err_in = ICMP(type=3, code=4, nexthopmtu=1400)
            err_out = ICMP(type=3, code=3)
        else:
            err_in, err_out = ICMPv6PacketTooBig(mtu=1280), ICMPv6DestUnreach(code=4)
        router = "172.22.0.1" if fam == "4" else "fd00:22::1"
        out[f"prog_ns_icmperr{fam}_in"] = (
            "TUNNEL_INGRESS",
            frame(ip_(src=router, dst=us_g) / err_in / Raw(bytes(ip_(src=us_g, dst=them) / seg))),
            frame(ip_(src=router, dst=none_in) / err_in / Raw(bytes(ip_(src=none_in, dst=them) / seg))),
        )
        out[f"prog_ns_icmperr{fam}_out"] = (
            "TUNNEL_EGRESS",
            frame(ip_(src=us_l, dst=them) / err_out / Raw(bytes(ip_(src=them, dst=us_l) / dgram))),
            frame(ip_(src=none_out, dst=them) / err_out / Raw(bytes(ip_(src=them, dst=none_out) / dgram))),
        )
    return out


def _translated_packets(t: Any) -> int:
    return sum(c.in_packets + c.out_packets for c in t.counters().values())


def _prog_costs(t: Any, s: Settings) -> tuple[dict[str, dict[str, float]], int]:
    """ns per packet of each program run, translating (ours) and not (baseline).

    ``BPF_PROG_TEST_RUN`` with ``repeat`` N runs the program N times on the *same* skb, so from
    the second run on the packet is already translated and takes the miss path (the mapping's
    packet counter grows by 1 per call, not by N: checked here, returned as the count). The
    repeat-N average is therefore exactly the untranslated run (the baseline). The translating
    run is measured as single-run calls (``repeat`` 1, fresh packet each time), which also time
    the kernel's timer overhead; the same single-run calls on the untranslated twin time that
    overhead plus the miss path, so ours = baseline + (median single translating run - median
    single untranslated run).
    """
    from fabric.bpf import libbpf
    from fabric.bpf.translate import AttachPoint

    out: dict[str, dict[str, float]] = {}
    counted = 0
    for metric, (point, hit, miss) in _packets().items():
        fd = t.prog_fd(AttachPoint[point])
        before = _translated_packets(t)
        repeat_hit = libbpf.prog_test_run(fd, hit, repeat=s.prog_repeat)
        counted = max(counted, _translated_packets(t) - before)
        if repeat_hit.retval != 0:
            raise RuntimeError(f"{metric}: the program returned verdict {repeat_hit.retval} (expected TC_ACT_OK)")
        base = float(libbpf.prog_test_run(fd, miss, repeat=s.prog_repeat).duration_ns)
        hit_single = statistics.median(libbpf.prog_test_run(fd, hit).duration_ns for _ in range(s.prog_singles))
        miss_single = statistics.median(libbpf.prog_test_run(fd, miss).duration_ns for _ in range(s.prog_singles))
        out[metric] = {"ours": base + (hit_single - miss_single), "base": base, "hit_single_run_ns": hit_single,
                       "miss_single_run_ns": miss_single}  # fmt: skip
    return out, counted


# -- the benchmark ---------------------------------------------------------------------------


def run(opts: bc.Options) -> bc.Report:
    s = Settings(iperf_s=1.0, pings=20, prog_repeat=1000, prog_singles=200) if opts.tiny else Settings()
    samples: dict[str, dict[str, list[float]]] = {}
    prog: dict[str, dict[str, list[float]]] = {}
    counted = 0
    with contextlib.ExitStack() as stack:
        procs = stack.enter_context(bc.procs())
        state = stack.enter_context(bc.lab_env(NAME, LAB_TOPOLOGY, "4 P2P clusters: east and west overlap, mapped "
                                               "to global CIDRs; north and south untranslated"))  # fmt: skip
        west = next(c for c in state.clusters if c.name == "west")
        e1, w1 = bc.first_pod(state, "east/e1"), bc.first_pod(state, "west/w1")
        n1, s1 = bc.first_pod(state, "north/n1"), bc.first_pod(state, "south/s1")
        west_global = west.global_ip(w1.ip)
        assert west_global is not None, "west has globalCIDRs in LAB_TOPOLOGY"
        bc.progress(NAME, "building the hand-built kernel-vxlan paths: plain, our translator, nftables NETMAP/SNAT")
        pin_root = stack.enter_context(bpffs()) / "kosmos-fabric"
        plain = stack.enter_context(bench_datapath.vxlan_path())
        bpf, translator = stack.enter_context(bpf_path(pin_root))
        nft = stack.enter_context(nft_path())
        paths = {
            # name: (source namespace, destination namespace, address dialled, address the server binds)
            "lab": (e1.netns, w1.netns, west_global, w1.ip),
            "lab_plain": (n1.netns, s1.netns, s1.ip, s1.ip),
            "vxlan_bpf": (bpf.src_ns, bpf.dst_ns, bpf.dst_ip, SIDES[1][4]),
            "vxlan_plain": (plain.src_ns, plain.dst_ns, plain.dst_ip, plain.dst_ip),
            "vxlan_nft": (nft.src_ns, nft.dst_ns, nft.dst_ip, SIDES[1][4]),
        }
        for path, (src_ns, _dst_ns, dst_ip, _bind) in paths.items():
            bc.check_reachable(path, src_ns, dst_ip)
        for rnd in range(opts.repeat):
            for path, (src_ns, dst_ns, dst_ip, bind_ip) in paths.items():
                bc.progress(NAME, f"round {rnd + 1}/{opts.repeat}: {path} path -> {dst_ip} (iperf3 {s.iperf_s:g}s x2, "
                            f"{s.pings} pings)")  # fmt: skip
                got = bc.path_metrics(procs, path, src_ns, dst_ns, dst_ip, iperf_s=s.iperf_s, pings=s.pings,
                                      bind_ip=bind_ip)  # fmt: skip
                for metric, value in got.items():
                    samples.setdefault(metric, {}).setdefault(path, []).append(value)
            bc.progress(NAME, f"round {rnd + 1}/{opts.repeat}: per-packet program cost (BPF_PROG_TEST_RUN, repeat "
                        f"{s.prog_repeat:,} + {s.prog_singles:,} single runs per packet)")  # fmt: skip
            costs, counted = _prog_costs(translator, s)
            for metric, values in costs.items():
                for key, value in values.items():
                    prog.setdefault(metric, {}).setdefault(key, []).append(value)
    report = bc.Report(units=dict(bc.PATH_UNITS))
    for metric, by in samples.items():
        hib = bc.PATH_HIGHER_IS_BETTER[metric]
        report.figures[metric] = bc.figure(by["lab"], {"": by["lab_plain"]}, higher_is_better=hib)
        fig = bc.figure(by["vxlan_bpf"], {"": by["vxlan_plain"], "nft": by["vxlan_nft"]}, higher_is_better=hib)
        # nftables' own cost against the same untranslated path (the table shows ours vs each).
        fig["nft_vs_plain_ratio"] = bc.ratio(fig["nft_baseline_median"], fig["baseline_median"], hib)
        report.figures[f"vxlan_{metric}"] = fig
        report.units[f"vxlan_{metric}"] = bc.PATH_UNITS[metric]
    for metric, by in prog.items():
        fig = bc.figure(by["ours"], {"": by["base"]}, higher_is_better=False)
        for key in ("hit_single_run_ns", "miss_single_run_ns"):
            fig[key] = statistics.median(by[key])
        report.figures[metric] = fig
        report.units[metric] = "ns/packet"
    nft_costs = ", ".join(
        f"{m} {report.figures[f'vxlan_{m}']['nft_vs_plain_ratio']:.2f}"
        for m in ("throughput_1_stream", "throughput_4_streams", "ping_p50", "ping_p99")
    )
    report.notes += [
        "rows without a prefix: the lab, east/e1/p0 -> west/w1/p0 by its global IP (east and west both use "
        "10.10.0.0/16; the agents' BPF programs translate on both vx-bridge devices) vs north/n1/p0 -> "
        "south/s1/p0 untranslated (baseline), same lab, same shape.",
        "vxlan_ rows: the datapath benchmark's hand-built kernel-vxlan path (no fabric) with our translator on "
        "both vx0 vs the same path untranslated (baseline) vs the same mapping in nftables (nft): this machine has "
        "no iptables binary, so NETMAP+SNAT is written as nft `dnat ip prefix to ip daddr map {global : local}` "
        "(prerouting, from vx0) and `snat ip prefix to ip saddr map {local : global}` (postrouting, to vx0), 1:1 "
        "by prefix and stateful through conntrack like iptables NAT. nft_ratio >= 1 means ours is not slower "
        f"than nftables. nftables' own ratio vs the untranslated path: {nft_costs}.",
        "retransmits = TCP segments the iperf3 sender retransmitted in one run (sum over streams); ratio n/a "
        "when a side had none.",
        f"prog_ns_ rows: ns per run of the tunnel programs on TCP, UDP and ICMP-error packets (v4, v6; in = "
        f"ingress, destination global -> local; out = egress, source local -> global). baseline = the same "
        f"program on the same packet with the looked-up address outside every mapping (parse + LPM miss), the "
        f"average of one BPF_PROG_TEST_RUN with repeat {s.prog_repeat:,}. The kernel reruns the program on the "
        f"same skb, so only the first repeat translates (the mapping counter grew by {counted} per "
        f"repeat-{s.prog_repeat:,} call); ours = baseline + (median translating single run - median "
        f"untranslated single run) over {s.prog_singles:,} single-run calls each (both include the same timer "
        "overhead, which cancels).",
    ]
    return report
