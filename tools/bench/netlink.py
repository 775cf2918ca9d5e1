"""Netlink programming benchmark: our appliers against ``ip -batch`` / ``bridge -batch``.

Inside a throwaway network namespace (``kft-bench-<hex>``: a veth underlay holding
198.18.0.1/16 and ``vx-bridge`` created by our Reconciler) it adds and then removes N routes
(distinct gateways: the P2P case, so through nexthop objects), N FDB entries and N neighbour
entries, each through the Reconciler (``set_desired`` + ``apply``: the O(n) diff is inside the
timing, the kernel view is re-read before, outside it) and then with iproute2 in batch mode in
the same round. Routes are given to iproute2 in the same shape (``nexthop add`` + ``route add
... nhid``) and, as a second baseline, as classic ``route add ... via GW onlink``.

Result per operation: entries/s median/min/max over the rounds, the baseline medians and the
ratios ours/baseline (keys containing ``ratio``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fabric.netlink.dataplane import KernelDataplane
from fabric.netlink.objects import (
    RTPROT_FABRIC,
    Address,
    FdbEntry,
    KernelState,
    Neighbour,
    Route,
    Rule,
    VxlanLink,
)
from fabric.netlink.reconciler import Reconciler
from tools.bench import common as bench_common

_log = logging.getLogger(__name__)
TABLE = 200
LINK = "vx-bridge"


def _progress(msg: str) -> None:
    bench_common.progress("netlink", msg)


def _run(*args: str, stdin: str | None = None) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True, input=stdin)


def _timed_batch(netns: str, tool: str, lines: list[str]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as fh:
        fh.write("\n".join(lines) + "\n")
        path = fh.name
    try:
        start = time.perf_counter()
        proc = subprocess.run([tool, "-n", netns, "-batch", path], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    finally:
        Path(path).unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} -batch failed: {proc.stderr.strip()[:500]}")
    return elapsed


class _Bench:
    def __init__(self, netns: str, count: int) -> None:
        self.netns = netns
        self.count = count
        self.dp = KernelDataplane(netns=netns)
        ul = self.dp.underlay_link("198.18.0.1")
        self.link = VxlanLink(LINK, 54, 4876, "02:00:00:00:00:01", "198.18.0.1", ul.ifindex, ul.mtu - 50)
        self.base = KernelState(
            links=frozenset({self.link}),
            addresses=frozenset({Address(LINK, "100.64.0.1/10")}),
            rules=frozenset({Rule(socket.AF_INET, TABLE, 200)}),
        )
        self.rec = Reconciler(self.dp, table=TABLE, rule_priority=200, link_names=frozenset({LINK}))
        self.rec.set_desired(self.base)
        report = self.rec.apply()
        if report.failures:
            raise RuntimeError(f"setting up {LINK} failed: {report.first_error}")
        overlay = ipaddress.ip_address("100.64.0.10")
        underlay = ipaddress.ip_address("198.18.1.0")
        self.peers = [
            (
                str(overlay + i),
                f"02:01:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:00",
                str(underlay + i),
                f"10.{(i >> 8) & 255}.{i & 255}.0/24",
            )
            for i in range(count)
        ]

    def close(self) -> None:
        self.dp.close()

    def ours(self, state: KernelState, table: str) -> float:
        self.rec.resync()
        start = time.perf_counter()
        self.rec.set_desired(state)
        report = self.rec.apply()
        elapsed = time.perf_counter() - start
        if report.failures:
            raise RuntimeError(f"our apply failed ({table}): {report.first_error}")
        return elapsed

    # each returns seconds for ours_add/ours_del, base_add/base_del (and plain_add/plain_del for routes)

    def neighbours(self) -> dict[str, float]:
        state = dataclasses.replace(
            self.base, neighbours=frozenset(Neighbour(LINK, ip, mac) for ip, mac, _, _ in self.peers)
        )
        out = {"ours_add": self.ours(state, "neighbours"), "ours_del": self.ours(self.base, "neighbours")}
        out["base_add"] = _timed_batch(
            self.netns,
            "ip",
            [f"neigh replace {ip} lladdr {mac} dev {LINK} nud permanent" for ip, mac, _, _ in self.peers],
        )
        out["base_del"] = _timed_batch(self.netns, "ip", [f"neigh del {ip} dev {LINK}" for ip, _, _, _ in self.peers])
        return out

    def fdb(self) -> dict[str, float]:
        state = dataclasses.replace(self.base, fdb=frozenset(FdbEntry(LINK, mac, dst) for _, mac, dst, _ in self.peers))
        out = {"ours_add": self.ours(state, "fdb"), "ours_del": self.ours(self.base, "fdb")}
        out["base_add"] = _timed_batch(
            self.netns,
            "bridge",
            [f"fdb add {mac} dev {LINK} dst {dst} self permanent" for _, mac, dst, _ in self.peers],
        )
        out["base_del"] = _timed_batch(
            self.netns, "bridge", [f"fdb del {mac} dev {LINK} dst {dst} self" for _, mac, dst, _ in self.peers]
        )
        return out

    def routes(self) -> dict[str, float]:
        state = dataclasses.replace(
            self.base, routes=frozenset(Route(TABLE, dst, LINK, gw) for gw, _, _, dst in self.peers)
        )
        out = {"ours_add": self.ours(state, "routes"), "ours_del": self.ours(self.base, "routes")}
        first = 0x10000
        out["base_add"] = _timed_batch(
            self.netns,
            "ip",
            [
                f"nexthop add id {first + i} via {gw} dev {LINK} onlink proto {RTPROT_FABRIC}"
                for i, (gw, _, _, _) in enumerate(self.peers)
            ]
            + [
                f"route add {dst} nhid {first + i} table {TABLE} proto {RTPROT_FABRIC}"
                for i, (_, _, _, dst) in enumerate(self.peers)
            ],
        )
        out["base_del"] = _timed_batch(
            self.netns,
            "ip",
            [f"route del {dst} table {TABLE}" for _, _, _, dst in self.peers]
            + [f"nexthop del id {first + i}" for i in range(len(self.peers))],
        )
        out["plain_add"] = _timed_batch(
            self.netns,
            "ip",
            [
                f"route add {dst} via {gw} dev {LINK} onlink table {TABLE} proto {RTPROT_FABRIC}"
                for gw, _, _, dst in self.peers
            ],
        )
        out["plain_del"] = _timed_batch(
            self.netns, "ip", [f"route del {dst} table {TABLE}" for _, _, _, dst in self.peers]
        )
        return out


def run_rounds(repeat: int, *, count: int = 10_000) -> dict[str, dict[str, float]]:
    """Run ``repeat`` rounds; return ``{op: {median, min, max, baseline_median, ratio, ...}}``."""
    netns = f"kft-bench-{uuid.uuid4().hex[:8]}"
    _run("ip", "netns", "add", netns)
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ip", "-n", netns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
        _run("ip", "-n", netns, "addr", "add", "198.18.0.1/16", "dev", "ul0")
        _run("ip", "-n", netns, "link", "set", "ul0", "up")
        _run("ip", "-n", netns, "link", "set", "ul1", "up")
        bench = _Bench(netns, count)
        try:
            kinds: dict[str, Callable[[], dict[str, float]]] = {
                "route": bench.routes,
                "fdb": bench.fdb,
                "neigh": bench.neighbours,
            }
            for rnd in range(repeat):
                for kind, fn in kinds.items():
                    _progress(f"round {rnd + 1}/{repeat}: {count} {kind} entries")
                    for key, seconds in fn().items():
                        who, op = key.split("_")
                        samples.setdefault(f"{kind}_{op}", {}).setdefault(who, []).append(count / seconds)
        finally:
            bench.close()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    results: dict[str, dict[str, float]] = {}
    for op, by in samples.items():
        ours = by["ours"]
        entry = {"median": statistics.median(ours), "min": min(ours), "max": max(ours)}
        entry["baseline_median"] = statistics.median(by["base"])
        entry["baseline_min"], entry["baseline_max"] = min(by["base"]), max(by["base"])
        entry["ratio"] = entry["median"] / entry["baseline_median"]
        if "plain" in by:
            entry["plain_baseline_median"] = statistics.median(by["plain"])
            entry["plain_ratio"] = entry["median"] / entry["plain_baseline_median"]
        results[op] = entry
    return results


# -- the suite's interface (tools/bench.py) ---------------------------------------------------

NAME = "netlink"
HELP = "entries/s to apply and remove 10,000 routes/FDB/neighbours through our appliers vs ip/bridge -batch"


def requires(opts: bench_common.Options) -> list[str]:
    return bench_common.need_root("the netlink benchmark") + bench_common.need_programs("ip", "bridge")


def run(opts: bench_common.Options) -> bench_common.Report:
    """``repeat`` rounds of 10,000 entries (200 in the tiny configuration)."""
    count = 200 if opts.tiny else 10_000
    results = run_rounds(opts.repeat, count=count)
    report = bench_common.Report(figures=results, units={op: "entries/s" for op in results})
    report.notes.append(
        f"{count:,} entries per operation in one namespace; baseline = iproute2 in batch mode with routes through "
        "nexthop objects (the shape our appliers program); plain_* = classic `route add ... via GW onlink`."
    )
    return report
