"""Shared pieces of the benchmark suite: figures, pre-flight checks, processes, the lab, probes.

Every benchmark reports *figures*: one dict per metric with our ``median``/``min``/``max`` over
the rounds, the same for each baseline measured in the same run (``baseline_median`` ...,
``veth_baseline_median`` ...) and ratios under keys containing ``ratio``, oriented so that
higher is always better (throughput-like: ours / baseline; latency-like: baseline / ours).

Processes a benchmark starts (iperf3, ping, the request/response tool, reflectors, simulated
agents) are tracked by a :class:`Procs` owner and stopped by PID in a ``finally``, so Ctrl-C
(KeyboardInterrupt) or a failure leaves nothing behind. Namespaces are removed the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from fabric import netns as namespaces
from tools import lab, nsutil

_log = logging.getLogger(__name__)

Figure = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``fabric-tool bench`` was asked for; each benchmark reads the fields it knows.

    ``tiny`` is the smoke-test configuration (tests): every step runs, briefly and small.
    """

    repeat: int = 3
    tiny: bool = False
    #: control: numbers of simulated agents.
    n: tuple[int, ...] = (100, 1000, 10_000)
    #: control: seconds allowed to bring up the agents of one N before it is reported infeasible.
    budget_s: float = 300.0
    #: control: agent shapes (of :data:`CONTROL_SHAPES`) to run at every N; empty = the default
    #: (P2P for N up to 1,000, where its O(N^2) state still fits, and the gateway-mode shapes for every N).
    shapes: tuple[str, ...] = ()
    #: control: also run every N with the agents behind K fabric-relay processes, one phase per K.
    relays: tuple[int, ...] = ()
    #: scheduler: node counts (empty: 1,000 and 5,000; 40 with ``tiny``) and pods per run (0: 10,000;
    #: 200 with ``tiny``).
    sched_nodes: tuple[int, ...] = ()
    sched_pods: int = 0
    #: tree: pods per phase (0: 1,000; 20 with ``tiny``).
    tree_pods: int = 0
    #: placement: seeded fleets (0: 10; 2 with ``tiny``).
    seeds: int = 0


#: The fabric shapes ``bench control`` simulates: two P2P clusters (every agent holds every other
#: node: the worst case) or gateway-mode clusters of 100 nodes (internal nodes hold O(1) peers),
#: each in its own underlay block (``gateway``: a join inside the block moves no route outside its
#: cluster), declaring the blocks as ``nodeCIDRs`` (``subnets``), or with every cluster's nodes
#: interleaved in one underlay range (``interleaved``: the worst case of gateway mode, where no
#: two neighbouring addresses share a cluster and a join changes the routes of every node outside
#: its cluster).
CONTROL_SHAPES = ("p2p", "gateway", "subnets", "interleaved")


@dataclasses.dataclass
class Report:
    """What one benchmark run produced: ``figures[metric]`` plus units and free-text notes."""

    figures: dict[str, Figure] = dataclasses.field(default_factory=dict)
    units: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: Raw per-round samples (``samples[metric][series]``, round i at index i of every series),
    #: kept in the JSON so a paired ratio can be recomputed from it; the tables do not show them.
    samples: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)


def progress(bench: str, msg: str) -> None:
    print(f"[bench {bench}] {msg}", file=sys.stderr, flush=True)


# -- figures ---------------------------------------------------------------------------------


def spread(values: Sequence[float], prefix: str = "") -> Figure:
    """``{prefix}median/min/max`` of ``values`` (NaN for an empty list: nothing was measured)."""
    if not values:
        nan = float("nan")
        return {f"{prefix}median": nan, f"{prefix}min": nan, f"{prefix}max": nan}
    return {f"{prefix}median": statistics.median(values), f"{prefix}min": min(values), f"{prefix}max": max(values)}


def ratio(ours: float, base: float, higher_is_better: bool) -> float:
    """Oriented so that higher is better; NaN when either side is missing or zero."""
    num, den = (ours, base) if higher_is_better else (base, ours)
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return float("nan")
    return num / den


def figure(
    ours: Sequence[float], baselines: dict[str, Sequence[float]], *, higher_is_better: bool, paired: bool = False
) -> Figure:
    """Our spread, each baseline's spread and the ratios of the medians.

    ``baselines`` maps a name to samples; the name ``""`` is *the* baseline (keys
    ``baseline_median`` ..., ``ratio``), others get prefixed keys (``veth_baseline_median``,
    ``veth_ratio``).

    ``paired``: sample *i* of every list was measured in the same round, next to each other, so
    the ratio is the median of the per-round ratios (see :func:`paired_ratio`) instead of the
    ratio of the medians.
    """
    out = spread(ours)
    for name, samples in baselines.items():
        pre = f"{name}_" if name else ""
        out.update(spread(samples, f"{pre}baseline_"))
        if paired:
            out[f"{pre}ratio"] = paired_ratio(ours, samples, higher_is_better)
        else:
            out[f"{pre}ratio"] = ratio(out["median"], out[f"{pre}baseline_median"], higher_is_better)
    return out


def paired_ratio(ours: Sequence[float], base: Sequence[float], higher_is_better: bool) -> float:
    """The median of the round-by-round ratios ``ours[i]`` : ``base[i]``.

    On a shared machine throughput drifts by tens of per cent between rounds (other work, CPU
    frequency), far more than two paths differ; two measurements taken seconds apart see the same
    drift, so their ratio cancels it where the ratio of the medians does not.
    """
    if len(ours) != len(base):
        raise ValueError(f"paired samples of different lengths: {len(ours)} vs {len(base)}")
    rounds = (ratio(a, b, higher_is_better) for a, b in zip(ours, base, strict=True))
    per_round = [r for r in rounds if math.isfinite(r)]
    return statistics.median(per_round) if per_round else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of ``values``; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


# -- pre-flight ------------------------------------------------------------------------------


def need_root(what: str) -> list[str]:
    return [] if os.geteuid() == 0 else [f"{what} creates network namespaces and needs root (run it with sudo)"]


def need_programs(*programs: str) -> list[str]:
    return [
        f"program {p!r} is not installed (./dev.sh setup installs it: apt-get install {_PACKAGES.get(p, p)})"
        for p in programs
        if shutil.which(p) is None
    ]


_PACKAGES = {"ip": "iproute2", "bridge": "iproute2", "ping": "iputils-ping", "taskset": "util-linux"}


def need_control_stubs() -> list[str]:
    try:
        import fabric.control.generated.fabric_pb2  # noqa: F401
    except ImportError as e:
        return [f"the gRPC stubs are missing ({e}): run `python -m fabric.control.protogen`"]
    return []


# -- processes -------------------------------------------------------------------------------


class Procs:
    """Processes started by one benchmark; :meth:`stop_all` stops each by PID (never by name)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        netns: str | None,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        if netns is None:
            proc = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True)
        else:
            proc = nsutil.spawn_in_netns(netns, argv, stdin=stdin, stdout=stdout, stderr=stderr)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self._procs)):
            self.stop(proc)


@contextlib.contextmanager
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop_all()


def run_in(netns: str, argv: Sequence[str], timeout_s: float) -> str:
    """Run ``argv`` inside ``netns`` to completion; returns stdout, raises with stderr on failure."""
    proc = nsutil.spawn_in_netns(netns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        why = err.decode(errors="replace")[:400]
        raise RuntimeError(f"{' '.join(argv)} in {netns} failed ({proc.returncode}): {why}")
    return out.decode(errors="replace")


def run_cmd(argv: Sequence[str]) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")


def ip_batch(netns: str | None, cmds: Sequence[str]) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    res = subprocess.run(argv, input="\n".join(cmds) + "\n", capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")


def delete_netns(names: Sequence[str]) -> None:
    for ns in names:
        if namespaces.exists(ns):
            # Processes still inside would keep nothing alive (the name goes), but stop ours first.
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def unique(prefix: str = "kft", digits: int = 6) -> str:
    """A fresh name for throwaway namespaces (``kft`` + hex, the prefix of every test namespace)."""
    return f"{prefix}{uuid.uuid4().hex[:digits]}"


# -- the lab ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabPods:
    """The two pods a lab benchmark measures between (different clusters, P2P)."""

    name: str
    src_ns: str
    src_ip: str
    dst_ns: str
    dst_ip: str
    src_node: str  # cluster/node of the source pod


@contextlib.contextmanager
def lab_env(bench: str, doc: dict[str, Any], what: str, timeout_s: float = 120.0) -> Iterator[lab.LabState]:
    """A fresh lab of topology ``doc`` under a unique name; always torn down (even on Ctrl-C).

    Built and removed through :mod:`tools.lab`'s public functions, exactly as ``fabric-tool lab
    up``/``down`` do. ``what`` describes it in the progress line.
    """
    name = unique("kft", 8)
    with tempfile.TemporaryDirectory(prefix="kft-bench-") as tmp:
        topo = Path(tmp) / "lab.yaml"
        topo.write_text(yaml.safe_dump(doc, sort_keys=False))
        try:
            progress(bench, f"building lab {name} ({what})")
            yield lab.up(topo, name, timeout_s=timeout_s, progress=lambda m: progress(bench, m))
        finally:
            progress(bench, f"removing lab {name}")
            lab.down(name, progress=lambda m: progress(bench, m))


def first_pod(state: lab.LabState, node_key: str) -> lab.PodRecord:
    """The first pod of node ``cluster/node`` of a lab this benchmark built."""
    node = state.node(node_key)
    if node is None or not node.pods:
        raise RuntimeError(f"lab {state.name} has no pod on node {node_key!r}")
    return node.pods[0]


@contextlib.contextmanager
def p2p_lab(bench: str) -> Iterator[LabPods]:
    """A fresh two-cluster P2P lab (one node, one pod each) under a unique name; always torn down."""
    doc = {
        "clusters": [
            {"name": "east", "mode": "p2p", "podCIDRs": ["10.10.0.0/16"], "nodes": [{"name": "e1", "pods": 1}]},
            {"name": "west", "mode": "p2p", "podCIDRs": ["10.20.0.0/16"], "nodes": [{"name": "w1", "pods": 1}]},
        ]
    }
    with lab_env(bench, doc, "2 P2P clusters, 1 node and 1 pod each", timeout_s=lab.DEFAULT_UP_TIMEOUT_S) as state:
        src, dst = first_pod(state, "east/e1"), first_pod(state, "west/w1")
        yield LabPods(state.name, src.netns, src.ip, dst.netns, dst.ip, "east/e1")


# -- probes ----------------------------------------------------------------------------------

_TIME = re.compile(r"time=([0-9.]+) ms")
_SENT = re.compile(r"(\d+) packets transmitted, (\d+) received")


def ping_rtts_us(netns: str, dst: str, count: int, interval_s: float = 0.01) -> list[float]:
    """Per-packet round-trip times in µs of ``count`` pings from ``netns`` to ``dst``."""
    argv = ["ping", "-n", "-c", str(count), "-i", f"{interval_s:g}", "-W", "1", dst]
    out = run_in(netns, argv, count * interval_s + 30)
    return [float(m) * 1000.0 for m in _TIME.findall(out)]


#: A reply line of ``ping -D``: its receive time (seconds since the epoch).
_REPLY = re.compile(r"^\[(\d+\.\d+)\].*icmp_seq=", re.M)


def ping_reply_times(output: str) -> list[float]:
    """The receive time of every reply in ``ping -D`` output (epoch seconds)."""
    return [float(t) for t in _REPLY.findall(output)]


def largest_gap(replies: list[float], start: float, end: float) -> float:
    """Longest time in seconds without a reply inside [start, end] (the whole window if none)."""
    points = [start, *(t for t in replies if start <= t <= end), end]
    return max(b - a for a, b in itertools.pairwise(points))


def ping_counts(output: str) -> tuple[int, int]:
    """``(transmitted, received)`` from ping's summary line."""
    m = _SENT.search(output)
    if m is None:
        raise RuntimeError(f"no summary in ping output: {output[-300:]!r}")
    return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class IperfResult:
    """One iperf3 run: receiver-side throughput and the sender's TCP retransmissions."""

    gbps: float
    retransmits: int


#: The port iperf3 servers of the benchmarks listen on (iperf3's default).
IPERF_PORT = 5201


def iperf(
    procs: Procs, src_ns: str, dst_ns: str, dst_ip: str, streams: int, seconds: float, bind_ip: str | None = None
) -> IperfResult:
    """TCP throughput (receiver side) and retransmits from ``src_ns`` to an iperf3 server in ``dst_ns``.

    The server binds ``bind_ip`` (default ``dst_ip``): behind address translation the client
    dials an address the server's namespace does not have.

    A run iperf3 itself reports as failed (its JSON has ``error`` and no ``sum_received``; seen
    now and then with very short runs) is repeated once, then raised with iperf3's reason.
    """
    problem = ""
    for _attempt in range(2):
        server = procs.spawn(dst_ns, ["iperf3", "-s", "-1", "-B", bind_ip or dst_ip, "-p", str(IPERF_PORT)])
        try:
            nsutil.wait_listening(dst_ns, IPERF_PORT, server)  # else: 'connection refused'
            argv = ["iperf3", "-c", dst_ip, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-P", str(streams), "-J"]
            out = run_in(src_ns, [*argv, "--connect-timeout", "2000"], seconds + 30)
        finally:
            procs.stop(server)
        doc = json.loads(out)
        end = doc.get("end", {})
        received = end.get("sum_received", {}).get("bits_per_second")
        if received is not None:
            return IperfResult(float(received) / 1e9, int(end.get("sum_sent", {}).get("retransmits", 0)))
        problem = str(doc.get("error", "no sum_received in its JSON"))
        _log.warning("iperf3 %s -> %s failed (%s); retrying once", src_ns, dst_ip, problem)
    raise RuntimeError(f"iperf3 from {src_ns} to {dst_ip} failed twice: {problem}")


def iperf_gbps(procs: Procs, src_ns: str, dst_ns: str, dst_ip: str, streams: int, seconds: float) -> float:
    """TCP throughput in Gb/s (receiver side); see :func:`iperf`."""
    return iperf(procs, src_ns, dst_ns, dst_ip, streams, seconds).gbps


def rr_rate(procs: Procs, src_ns: str, dst_ns: str, dst_ip: str, seconds: float, cpu: int) -> float:
    """TCP request/response transactions per second, both ends pinned to vCPU ``cpu``."""
    port = "5299"
    pin = ["taskset", "-c", str(cpu)]
    server = procs.spawn(dst_ns, [*pin, sys.executable, "-m", "tools.bench.rr", "server", dst_ip, port])
    try:
        out = run_in(
            src_ns, [*pin, sys.executable, "-m", "tools.bench.rr", "client", dst_ip, port, f"{seconds:g}"], seconds + 30
        )
        return float(out.strip().splitlines()[-1])
    finally:
        procs.stop(server)


# -- one path, the usual figures -------------------------------------------------------------

#: Units and orientation of the figures :func:`path_metrics` measures.
PATH_UNITS = {
    "throughput_1_stream": "Gb/s",
    "throughput_4_streams": "Gb/s",
    "retransmits_1_stream": "segments",
    "retransmits_4_streams": "segments",
    "ping_p50": "µs",
    "ping_p99": "µs",
}
PATH_HIGHER_IS_BETTER = {
    "throughput_1_stream": True,
    "throughput_4_streams": True,
    "retransmits_1_stream": False,
    "retransmits_4_streams": False,
    "ping_p50": False,
    "ping_p99": False,
}


def check_reachable(what: str, src_ns: str, dst_ip: str, timeout_s: float = 15.0) -> None:
    """Wait until a path carries a ping, and refuse to measure it when it never does (a broken
    setup, not a slow one). A lab reports "in sync" once every agent applied its plan; the first
    packets may still wait for neighbour resolution along the path, hence the grace period."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(RuntimeError):  # ping exits 1 when nothing answered
            if ping_rtts_us(src_ns, dst_ip, 1, 0.2):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} path: {dst_ip} does not answer ping from {src_ns} within {timeout_s:g} s")
        time.sleep(0.2)


def path_metrics(
    procs: Procs,
    what: str,
    src_ns: str,
    dst_ns: str,
    dst_ip: str,
    *,
    iperf_s: float,
    pings: int,
    bind_ip: str | None = None,
) -> dict[str, float]:
    """iperf3 with 1 and 4 streams (throughput and retransmits), then ``pings`` 10 ms pings (p50/p99)."""
    out: dict[str, float] = {}
    for streams, suffix in ((1, "1_stream"), (4, "4_streams")):
        res = iperf(procs, src_ns, dst_ns, dst_ip, streams, iperf_s, bind_ip)
        out[f"throughput_{suffix}"] = res.gbps
        out[f"retransmits_{suffix}"] = float(res.retransmits)
    rtts = ping_rtts_us(src_ns, dst_ip, pings)
    if len(rtts) < pings * 0.9:
        raise RuntimeError(f"{what} path lost {pings - len(rtts)} of {pings} pings")
    out["ping_p50"] = percentile(rtts, 50)
    out["ping_p99"] = percentile(rtts, 99)
    return out
