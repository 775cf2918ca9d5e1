"""Dual stack end to end (issue 5), through the CLI as a user would.

Lab ``examples/dualstack.yaml``: a dual-stack P2P cluster (dsp2p), a dual-stack gateway cluster
with IPv6 primary (dsgw), an IPv6-only cluster (v6only) and an IPv4-only cluster (v4only).
``check`` must pass every pair that shares a family, in each family, and list the others as
not expected; ``status`` must say that v4only and v6only cannot talk. The gateway failover test
PRINTS the measured IPv6 outage (pytest -s) and fails above 3 s.

A second lab: two dual-stack clusters with the *same* IPv6 pod CIDR, each mapped to its own
IPv6 global CIDR, reach each other by global IPv6 address, TCP both ways, and the receiver sees
the sender's global address.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.conftest import REPO, Lab, Ping, lab_running, largest_gap, new_lab_name
from tests.waiting import wait_until

TOPOLOGY = REPO / "examples" / "dualstack.yaml"
MAX_OUTAGE_S = 3.0

GLOBAL_TOPOLOGY = """
clusters:
  - name: gone
    ipFamilies: [IPv4, IPv6]
    podCIDRs: [10.71.0.0/16, fd00:10:70::/48]
    globalCIDRs: {"fd00:10:70::/48": "fd00:e0:1::/48"}
    nodes: [{name: n1, pods: 1}, {name: n2, pods: 1}]
  - name: gtwo
    mode: gateway
    ipFamilies: [IPv6, IPv4]
    podCIDRs: [fd00:10:70::/48, 10.72.0.0/16]
    globalCIDRs: {"fd00:10:70::/48": "fd00:e0:2::/48"}
    nodes: [{name: m1, pods: 1}, {name: m2, pods: 1}]
"""

# Accepts one IPv6 connection and answers the peer address it saw (then exits).
PEER_SERVER6 = (
    "import socket,sys;s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
    "s.bind(('::',int(sys.argv[1])));s.listen(1);print('ready',flush=True);"
    "c,p=s.accept();c.sendall(p[0].encode());c.close()"
)
PEER_CLIENT = (
    "import socket,sys;c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5);"
    "print(c.recv(100).decode())"
)


UP_ARGS = ("--grace-period", "30", "--timeout", "150")


@pytest.fixture(scope="module")
def dslab() -> Iterator[Lab]:
    with lab_running(Lab(new_lab_name(), TOPOLOGY), *UP_ARGS) as lab:
        yield lab


@pytest.fixture(scope="module")
def dsglab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    path = tmp_path_factory.mktemp("dsg") / "dualstack-global.yaml"
    path.write_text(GLOBAL_TOPOLOGY)
    with lab_running(Lab(new_lab_name(), path), *UP_ARGS) as lab:
        yield lab


def cl(label: str) -> str:
    """The cluster of a ``cluster/node/pod`` label."""
    return label.split("/", 1)[0]


def _clusters(lab: Lab) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in lab.status()["clusters"]}


def test_check_passes_every_pair_sharing_a_family_and_reports_the_others(dslab: Lab) -> None:
    p = dslab.tool("check", "--lab", dslab.name, "--services", "--json", "--timeout", "3", check=False)
    doc = json.loads(p.stdout)
    failed = [f"IPv{x['family']} {x['src']} -> {x['dst']}: {x['error']}" for x in doc["pairs"] if not x["ok"]]
    assert p.returncode == 0 and not failed, "\n".join(failed)
    by_family = {f: {(x["src"], x["dst"]) for x in doc["pairs"] if x["family"] == f} for f in (4, 6)}
    # Every probed pair is between clusters that run the family; v4only/v6only never probed together.
    assert {cl(d) for _s, d in by_family[4]} | {cl(s) for s, _d in by_family[4]} == {"dsp2p", "dsgw", "v4only"}
    assert {cl(d) for _s, d in by_family[6]} | {cl(s) for s, _d in by_family[6]} == {"dsp2p", "dsgw", "v6only"}
    # 7 pods per family: 42 pod pairs, plus each pod -> the 2 services of the other clusters of its family.
    assert len(by_family[4]) == len(by_family[6]) == 42 + 7 * 2
    # Nothing silently missing: every ordered pod pair is probed or not expected, in each family.
    pods = list(dslab.pods())
    ne = {(n["src"], n["dst"], n["family"]): n["reason"] for n in doc["not_expected"]}
    for f in (4, 6):
        for s, d in itertools.permutations(pods, 2):
            runs = {"dsp2p", "dsgw", "v4only" if f == 4 else "v6only"}
            if cl(s) in runs and cl(d) in runs:
                assert (s, d) in by_family[f]
            elif cl(s) in runs or cl(d) in runs:
                assert (s, d, f) in ne, (s, d, f)
    assert ne[("v6only/c1/p0", "v4only/d1/p0", 4)] == "v6only and v4only share no address family"
    assert ne[("dsgw/b1/p0", "v6only/c2/p0", 4)] == "v6only does not run IPv4"
    text = dslab.tool("check", "--lab", dslab.name, "--family", "6").stdout
    assert "IPv6" in text and "not expected" in text and "FAILED" not in text
    status = dslab.tool("status", "--lab", dslab.name).stdout
    assert "clusters v6only and v4only cannot talk: no common address family" in status


def test_per_family_devices_and_mtu(dslab: Lab) -> None:
    links = {ln["ifname"]: ln for ln in dslab.ipj(dslab.nodes()["dsgw/b1"]["netns"], "-d", "link", "show")}
    assert links["vx-bridge-6"]["linkinfo"]["info_data"]["id"] == 64
    assert links["vx-bridge-6"]["linkinfo"]["info_data"]["port"] == 4866
    assert links["vx-local-6"]["linkinfo"]["info_data"]["id"] == 65
    assert links["vx-bridge-6"]["mtu"] == 1500 - 70 and links["vx-bridge"]["mtu"] == 1500 - 50
    v6only = {ln["ifname"] for ln in dslab.ipj(dslab.nodes()["v6only/c1"]["netns"], "link", "show")}
    v4only = {ln["ifname"] for ln in dslab.ipj(dslab.nodes()["v4only/d1"]["netns"], "link", "show")}
    assert "vx-bridge-6" in v6only and "vx-bridge" not in v6only
    assert "vx-bridge" in v4only and "vx-bridge-6" not in v4only


def test_gateway_failover_for_ipv6_traffic(dslab: Lab) -> None:
    # IPv6-only P2P pod -> pod on an internal node of the dual-stack gateway cluster: the traffic
    # crosses dsgw's active gateway over vx-bridge-6 and vx-local-6; v6only's nodes probe dsgw's
    # gateways over IPv6.
    src, dst = "v6only/c1/p0", "dsgw/b3/p0"
    dsgw = _clusters(dslab)["dsgw"]
    active, standby = dsgw["active_gateway"], dsgw["standby_gateway"]
    ping = Ping(dslab, src, dst, duration_s=25, family=6)
    time.sleep(1.5)
    cut_at = time.time()
    dslab.lab("fail", f"dsgw/{active}")
    try:
        wait_until(lambda: _clusters(dslab)["dsgw"]["active_gateway"] == standby, 10, "the role to move to the standby")
        time.sleep(3.0)
        heal_at = time.time()
    finally:
        dslab.lab("heal", f"dsgw/{active}")
    time.sleep(2.0)
    replies = ping.stop()
    outage = largest_gap(replies, cut_at, heal_at)
    print(f"\nIPv6 failover of dsgw/{active} -> dsgw/{standby}: outage {outage * 1000:.0f} ms "
          "(largest gap in a 10 ms ping -6)")  # fmt: skip
    assert replies and replies[-1] > heal_at, "IPv6 traffic did not resume"
    assert outage < MAX_OUTAGE_S, f"IPv6 outage {outage:.3f} s exceeds {MAX_OUTAGE_S} s"
    wait_until(dslab.all_in_sync, 30, "every node in sync after heal")


def test_global_ipv6_tcp_both_ways_with_identical_pod_cidrs(dsglab: Lab) -> None:
    pods = dsglab.pods()
    one, two = pods["gone/n1/p0"], pods["gtwo/m1/p0"]  # first node of each: the same real pod CIDR
    assert one["ip6"] == two["ip6"] == "fd00:10:70::2"  # identical real addresses on both sides
    assert one["global_ip6"].startswith("fd00:e0:1:") and two["global_ip6"].startswith("fd00:e0:2:")
    for server, client, port in ((one, two, 5401), (two, one, 5402)):
        srv = subprocess.Popen(["ip", "netns", "exec", server["netns"], sys.executable, "-c", PEER_SERVER6, str(port)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
            out = dsglab.nsrun(client["netns"], sys.executable, "-c", PEER_CLIENT, server["global_ip6"], str(port))
            assert out.stdout.strip() == client["global_ip6"], "the receiver must see the sender's global address"
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                srv.wait(timeout=5)
            if srv.poll() is None:
                srv.kill()
                srv.wait()
    p = dsglab.tool("check", "--lab", dsglab.name, "--family", "6", "--json", check=False)
    doc = json.loads(p.stdout)
    failed = [f"{x['src']} -> {x['dst']}: {x['error']}" for x in doc["pairs"] if not x["ok"]]
    assert p.returncode == 0 and not failed, "\n".join(failed)
    assert any(x["dst_ip"].startswith("fd00:e0:") for x in doc["pairs"])
