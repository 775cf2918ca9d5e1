"""End to end on examples/active-active.yaml (issue 21 section 2): west runs two active gateways
(w1, w2, ``activeGateways: 2``), east (P2P, 4 pods on 2 nodes) reaches west's internal node w3
(2 pods) through both.

Steps run in file order against one lab (module fixture):

1. every remote node routes west through one resilient nexthop group of both gateways, and the
   internal node routes east through one group too; the 8 pod flows east -> w3 spread over both
   gateways (found by counting packets on each gateway's vx-bridge while one flow runs alone;
   once more after the groups' idle timer when they did not: :func:`classify_spread`),
   and each flow's replies leave through the gateway its requests came in by (the kernel's
   multipath hash is symmetric, the groups list the gateways in the same order);
2. cutting one gateway (``lab fail``) loses no packet of the flows on the other and leaves them
   no gap (``MAX_SURVIVOR_GAP_S``), and the flows of the cut one resume (their outage is
   PRINTED; run with -s), and healing it moves nothing back (its flows stay where they are:
   busy buckets wait for the idle timer).

A second lab (``AA3_TOPOLOGY``, written by its fixture): dual stack, west with three active
gateways (w1-w3) and an internal node w4.

3. the fabric's multipath hash (fabric.agent.multipath) is set where groups are (e1, e2, w4: one
   non-zero seed, IPv6 hashed by addresses) and nowhere else (the gateways keep the kernel's);
4. per family, every one of the three gateways carries some of the 24 flows and each flow's
   replies cross the gateway of its requests: IPv4 by the kernel's picks (``ip route get ...
   iif`` on both ends) checked against the packets of one flow per gateway alone, IPv6 by
   measuring every flow alone (see :func:`measure6`); then all flows at once, counted on each
   gateway's tunnel, match;
5. cutting one of the three loses no packet of the others' flows and leaves them no gap, IPv4 or
   IPv6; only the cut one's flows move (every other flow is still picked to its gateway during
   the cut), and they resume.

The pings whose gaps are measured write to files, not pipes (:func:`tests.lab.conftest.spool`: a full pipe stalls
ping, which once passed for an IPv6 pause of the surviving gateways).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest

from fabric.netlink import dataplane
from tests.lab.conftest import REPO, Lab, lab_running, largest_gap, new_lab_name, spool
from tests.waiting import wait_until

TOPOLOGY = REPO / "examples" / "active-active.yaml"
GATEWAYS = ("w1", "w2")
#: Packets of one classification ping; the gateways' own probes add ~10/s of noise to each.
CLASSIFY_COUNT = 50
#: Fail above this outage for the flows of the cut gateway (the issue's target is < 1 s).
MAX_OUTAGE_S = 3.0
#: Fail above this largest gap for a flow of a gateway that was *not* cut (the issue: "the rest
#: see no gap"; measured 20-220 ms on the loaded 2-core lab machine, both families). Tighter
#: than MAX_OUTAGE_S on purpose: a survivor must do better than the moved flows' own target.
MAX_SURVIVOR_GAP_S = 1.0


@pytest.fixture(scope="module")
def aalab() -> Iterator[Lab]:
    with lab_running(Lab(new_lab_name(), TOPOLOGY), "--grace-period", "30", "--timeout", "120") as lab:
        yield lab


def _flows(lab: Lab) -> list[tuple[str, str]]:
    pods = lab.pods()
    return [(s, d) for s in sorted(pods) if s.startswith("east/") for d in sorted(pods) if d.startswith("west/w3/")]


def _bridge_packets(lab: Lab, gw: str) -> tuple[int, int]:
    (link,) = lab.ipj(f"{lab.name}-west-{gw}", "-s", "link", "show", "vx-bridge")
    return link["stats64"]["rx"]["packets"], link["stats64"]["tx"]["packets"]


def _group(lab: Lab, netns: str, dst: str) -> list[str]:
    """The gateways of the resilient group the route to ``dst`` (main table) uses."""
    nhs = {nh["id"]: nh for nh in lab.ipj(netns, "nexthop", "show")}
    family = "-6" if ":" in dst else "-4"
    (route,) = [r for r in lab.ipj(netns, family, "route", "show", "table", "main") if r["dst"] == dst]
    grp = nhs[route["nhid"]]
    assert grp.get("type") == "resilient", grp
    return [nhs[m["id"]]["gateway"] for m in grp["group"]]


def _ping(pods: dict[str, dict[str, Any]], src: str, dst: str, *args: str,
          out: IO[str] | int = subprocess.PIPE) -> subprocess.Popen[str]:  # fmt: skip
    return subprocess.Popen(["ip", "netns", "exec", pods[src]["netns"], "ping", "-n", "-i", "0.01", "-W", "1",
                             *args, pods[dst]["ip"]],
                            stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def classify(lab: Lab) -> dict[tuple[str, str], str]:
    """Per flow, the gateway that carries it both ways (one flow at a time, by packet counts)."""
    out: dict[tuple[str, str], str] = {}
    pods = lab.pods()
    for flow in _flows(lab):
        before = {g: _bridge_packets(lab, g) for g in GATEWAYS}
        p = _ping(pods, *flow, "-q", "-c", str(CLASSIFY_COUNT))
        p.communicate(timeout=60)
        after = {g: _bridge_packets(lab, g) for g in GATEWAYS}
        rx = {g: after[g][0] - before[g][0] for g in GATEWAYS}
        tx = {g: after[g][1] - before[g][1] for g in GATEWAYS}
        on = max(GATEWAYS, key=lambda g: rx[g])
        other = next(g for g in GATEWAYS if g != on)
        assert rx[on] - rx[other] >= CLASSIFY_COUNT * 0.6, f"flow {flow}: no clear gateway (rx {rx})"
        assert tx[on] - tx[other] >= CLASSIFY_COUNT * 0.6, f"flow {flow}: replies not via {on} (tx {tx}, rx {rx})"
        out[flow] = on
    return out


def classify_spread(lab: Lab) -> dict[tuple[str, str], str]:
    """:func:`classify`, once more after the groups' idle timer when every flow was on one
    gateway. A group that grew (the second gateway elected a flush after the first, as agents
    connect at different times) moves a bucket to the new member only once it was idle
    ``idle_timer_s``; the lab's readiness check has just sent a flow through each of them, and
    each flow classified keeps its own busy (a CI run found all 8 flows on w1 twice in a row)."""
    flows = classify(lab)
    if len(set(flows.values())) < len(GATEWAYS):
        idle = dataplane.NexthopGroup(id=0, members=()).idle_timer_s + 5
        print(f"\nevery flow on one gateway {flows}: again after {idle:g}s without traffic (idle buckets move)")
        time.sleep(idle)
        flows = classify(lab)
    return flows


def test_two_active_gateways_both_carry_flows(aalab: Lab) -> None:
    west = next(c for c in aalab.status()["clusters"] if c["name"] == "west")
    assert sorted([west["active_gateway"], *west["also_active_gateways"]]) == sorted(GATEWAYS), west
    bridge = {g: aalab.nodes()[f"west/{g}"]["underlay"].split(".")[-1] for g in GATEWAYS}
    for node in ("east-e1", "east-e2"):
        members = _group(aalab, f"{aalab.name}-{node}", "10.20.0.0/16")
        assert sorted(m.split(".")[-1] for m in members) == sorted(bridge.values()), members
    assert len(_group(aalab, f"{aalab.name}-west-w3", "10.10.0.0/16")) == 2
    flows = classify_spread(aalab)
    print(f"\nflows per gateway: { {g: sum(1 for v in flows.values() if v == g) for g in GATEWAYS} }")
    assert set(flows.values()) == set(GATEWAYS), f"every flow on one gateway: {flows}"


def _loss(p: subprocess.Popen[str], written: IO[str]) -> tuple[int, int, list[float]]:
    """(sent, received, reply times) of a ping that writes to ``written`` (a :func:`spool`)."""
    p.wait(timeout=120)
    written.seek(0)
    out = written.read()
    written.close()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out[-2000:]
    replies = [float(x) for x in re.findall(r"^\[(\d+\.\d+)\].*icmp_seq=", out, re.M)]
    return int(m.group(1)), int(m.group(2)), replies


def test_cutting_one_active_gateway_loses_nothing_on_the_other(aalab: Lab) -> None:
    flows = classify_spread(aalab)
    cut = "w1"
    survivors = [f for f, g in flows.items() if g != cut]
    moved = [f for f, g in flows.items() if g == cut]
    assert survivors and moved, f"need flows on both gateways: {flows}"
    count = 1200  # 12 s at 10 ms
    pods = aalab.pods()
    spools = {f: spool() for f in flows}
    pings = {f: _ping(pods, *f, "-D", "-c", str(count), out=spools[f]) for f in flows}
    time.sleep(1.5)
    cut_at = time.time()
    aalab.lab("fail", f"west/{cut}")
    try:
        wait_until(lambda: len(_group(aalab, f"{aalab.name}-east-e1", "10.20.0.0/16")) == 1, 10,
                   "the cut gateway to leave east/e1's group")  # fmt: skip
        time.sleep(2.0)
    finally:
        aalab.lab("heal", f"west/{cut}")
    heal_at = time.time()
    results = {f: _loss(p, spools[f]) for f, p in pings.items()}
    report: dict[str, Any] = {}
    for f in flows:
        sent, got, replies = results[f]
        gap = largest_gap(replies, cut_at, heal_at)
        report[f"{f[0]} -> {f[1]} via {flows[f]}"] = {"lost": sent - got, "largest_gap_ms": round(gap * 1000)}
    print("\n" + json.dumps(report, indent=1))
    for f in survivors:
        sent, got, _ = results[f]
        assert sent == got, f"flow {f} on the surviving gateway lost {sent - got} of {sent} packets"
        gap = report[f"{f[0]} -> {f[1]} via {flows[f]}"]["largest_gap_ms"] / 1000
        assert gap < MAX_SURVIVOR_GAP_S, f"flow {f} on the surviving gateway paused {gap:.3f} s"
    for f in moved:
        sent, got, replies = results[f]
        assert replies and replies[-1] > cut_at + 1, f"flow {f} of the cut gateway did not resume"
        gap = report[f"{f[0]} -> {f[1]} via {cut}"]["largest_gap_ms"] / 1000
        assert gap < MAX_OUTAGE_S, f"flow {f}: outage {gap:.3f} s"
    wait_until(lambda: len(_group(aalab, f"{aalab.name}-east-e1", "10.20.0.0/16")) == 2, 30,
               "the healed gateway to rejoin the group")  # fmt: skip
    wait_until(aalab.all_in_sync, 30, "every node in sync after heal")


# --- Three active gateways, IPv4 and IPv6 (dual stack), and the fabric's multipath hash ---------

#: West runs three active gateways (no standby) for a dual-stack fabric; 6 east pods x 4 pods on
#: the internal node w4 = 24 flows per family, so every gateway gets flows whatever the seed
#: (the chance that one of three gets none of 24 is 3 * (2/3)^24, 2e-4).
AA3_TOPOLOGY = """\
underlay: 198.18.0.0/16
underlay6: fd00:198:18::/64
clusters:
  - name: east
    mode: p2p
    ipFamilies: [IPv4, IPv6]
    podCIDRs: [10.10.0.0/16, fd00:10:10::/48]
    nodes:
      - {name: e1, pods: 3}
      - {name: e2, pods: 3}
  - name: west
    mode: gateway
    ipFamilies: [IPv4, IPv6]
    gateways: [w1, w2, w3]
    activeGateways: 3
    podCIDRs: [10.20.0.0/16, fd00:10:20::/48]
    nodes:
      - {name: w1}
      - {name: w2}
      - {name: w3}
      - {name: w4, pods: 4}
"""
GW3 = ("w1", "w2", "w3")
WEST_CIDR = {4: "10.20.0.0/16", 6: "fd00:10:20::/48"}
EAST_CIDR = {4: "10.10.0.0/16", 6: "fd00:10:10::/48"}
BRIDGE_DEV = {4: "vx-bridge", 6: "vx-bridge-6"}
#: Pings per flow in the all-flows-at-once count (10 ms apart): 3 s, while the peers' probes add
#: ~20 packets a second to each gateway's tunnel, well under one flow's count.
SPREAD_COUNT = 300
Flow = tuple[str, str]


@pytest.fixture(scope="module")
def aa3lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    topology = tmp_path_factory.mktemp("aa3") / "active-active-3.yaml"
    topology.write_text(AA3_TOPOLOGY)
    with lab_running(Lab(new_lab_name(), topology), "--grace-period", "30", "--timeout", "120") as lab:
        yield lab


def _ip_key(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _flows3(pods: dict[str, dict[str, Any]]) -> list[Flow]:
    return [(s, d) for s in sorted(pods) if s.startswith("east/") for d in sorted(pods) if d.startswith("west/w4/")]


def _node_ns(lab: Lab, pod: str) -> str:
    cluster, node, _ = pod.split("/")
    return f"{lab.name}-{cluster}-{node}"


def _owners(lab: Lab) -> dict[str, str]:
    """Every tunnel address of the west gateways -> the gateway (vx-bridge/-6, vx-local/-6)."""
    out = {}
    for g in GW3:
        for link in lab.ipj(f"{lab.name}-west-{g}", "addr", "show"):
            if link["ifname"].startswith("vx-"):
                out.update({a["local"]: g for a in link.get("addr_info", [])})
    return out


def _picks(lab: Lab, pods: dict[str, dict[str, Any]], owners: dict[str, str], src: str, dst: str, family: int) -> str:
    """The gateway the kernel of ``src``'s node picks for packets from pod ``src`` to pod
    ``dst`` (``ip route get ... iif``: the input path the pod's packets take, its multipath hash)."""
    k = _ip_key(family)
    ns, sip, dip = _node_ns(lab, src), pods[src][k], pods[dst][k]
    (to_pod,) = lab.ipj(ns, "route", "get", sip)
    (route,) = lab.ipj(ns, "route", "get", dip, "from", sip, "iif", to_pod["dev"])
    return owners[route["gateway"]]


def predict(lab: Lab, pods: dict[str, dict[str, Any]], flows: list[Flow], family: int) -> dict[Flow, str]:
    """Per flow, the gateway of its requests; asserts its replies are picked to cross the same
    one (one seed and a symmetric hash on both ends: the point of fabric.agent.multipath)."""
    owners = _owners(lab)
    out = {}
    for src, dst in flows:
        there, back = _picks(lab, pods, owners, src, dst, family), _picks(lab, pods, owners, dst, src, family)
        assert there == back, f"IPv{family} {src} -> {dst}: requests via {there}, replies via {back}"
        out[(src, dst)] = there
    return out


def _counts(lab: Lab, family: int) -> dict[str, tuple[int, int]]:
    out = {}
    for g in GW3:
        (link,) = lab.ipj(f"{lab.name}-west-{g}", "-s", "link", "show", BRIDGE_DEV[family])
        out[g] = (link["stats64"]["rx"]["packets"], link["stats64"]["tx"]["packets"])
    return out


def _ping_fam(pods: dict[str, dict[str, Any]], src: str, dst: str, family: int, *args: str,
              out: IO[str] | int = subprocess.PIPE) -> subprocess.Popen[str]:  # fmt: skip
    return subprocess.Popen(["ip", "netns", "exec", pods[src]["netns"], "ping", f"-{family}", "-n", "-i", "0.01",
                             "-W", "1", *args, pods[dst][_ip_key(family)]],
                            stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _alone(lab: Lab, pods: dict[str, dict[str, Any]], flow: Flow, family: int, count: int = CLASSIFY_COUNT) -> str:
    """The gateway that carried ``flow`` both ways while it ran alone (packet counts); asserts
    its replies crossed the gateway of its requests."""
    before = _counts(lab, family)
    _ping_fam(pods, *flow, family, "-q", "-c", str(count)).communicate(timeout=60)
    after = _counts(lab, family)
    rx = {g: after[g][0] - before[g][0] for g in GW3}
    tx = {g: after[g][1] - before[g][1] for g in GW3}
    on = max(GW3, key=lambda g: rx[g])
    for g in GW3:
        if g != on:
            assert rx[on] - rx[g] >= count * 0.6, f"IPv{family} {flow}: no clear gateway (rx {rx})"
            assert tx[on] - tx[g] >= count * 0.6, f"IPv{family} {flow}: replies not via {on} (tx {tx}, rx {rx})"
    return on


#: Pings per IPv6 flow classified by counts: the IPv6 tunnels carry no probes (they are IPv4),
#: so a few packets name the gateway.
V6_CLASSIFY_COUNT = 20


def measure6(lab: Lab, pods: dict[str, dict[str, Any]], flows: list[Flow]) -> dict[Flow, str]:
    """Per IPv6 flow, the gateway that carried it both ways, one flow at a time. (IPv6 cannot be
    predicted with ``ip route get``: under the custom policy a forwarded packet's hash is
    ``jhash_2words(outer, inner, 0)`` (``rt6_multipath_custom_hash_skb``) but a lookup's is the
    outer hash alone (``rt6_multipath_custom_hash_fl6``), so the two pick different buckets.)"""
    return {f: _alone(lab, pods, f, 6, V6_CLASSIFY_COUNT) for f in flows}


@pytest.fixture(scope="module")
def aa3_v6(aa3lab: Lab) -> dict[Flow, str]:
    """The IPv6 flows' gateways, measured once for the module (nothing changes the groups
    between the tests that use it)."""
    pods = aa3lab.pods()
    return measure6(aa3lab, pods, _flows3(pods))


def test_fabric_hash_set_where_active_active_routes_are_and_nowhere_else(aa3lab: Lab) -> None:
    """e1, e2 (groups to west) and w4 (groups to east) hold one non-zero seed and the IPv6 hash
    by addresses; the gateways, which route over no group, keep the kernel's own."""
    def sysctl(node: str, key: str) -> str:
        return aa3lab.nsrun(f"{aa3lab.name}-{node}", "sysctl", "-n", key).stdout.strip()

    seeds = {n: sysctl(n, "net.ipv4.fib_multipath_hash_seed") for n in ("east-e1", "east-e2", "west-w4")}
    assert len(set(seeds.values())) == 1 and "0" not in seeds.values(), seeds
    for n in ("east-e1", "east-e2", "west-w4"):
        assert sysctl(n, "net.ipv6.fib_multipath_hash_policy") == "3", n
        assert sysctl(n, "net.ipv6.fib_multipath_hash_fields") == "3", n
    for g in GW3:
        assert sysctl(f"west-{g}", "net.ipv4.fib_multipath_hash_seed") == "0", f"{g} has no group, yet its seed was set"


@pytest.mark.parametrize("family", [4, 6])
def test_three_active_gateways_all_carry_flows(aa3lab: Lab, family: int, request: pytest.FixtureRequest) -> None:
    west = next(c for c in aa3lab.status()["clusters"] if c["name"] == "west")
    assert sorted([west["active_gateway"], *west["also_active_gateways"]]) == list(GW3), west
    for node in ("east-e1", "east-e2"):
        assert len(_group(aa3lab, f"{aa3lab.name}-{node}", WEST_CIDR[family])) == 3
    assert len(_group(aa3lab, f"{aa3lab.name}-west-w4", EAST_CIDR[family])) == 3
    pods = aa3lab.pods()
    flows = _flows3(pods)
    # IPv4: the kernel's picks (both ends agree), and one flow per gateway alone does what was
    # picked; IPv6: every flow measured alone, both ways through one gateway.
    picked = predict(aa3lab, pods, flows, family) if family == 4 else request.getfixturevalue("aa3_v6")
    share = {g: sum(1 for v in picked.values() if v == g) for g in GW3}
    print(f"\nIPv{family} flows per gateway: {share}")
    assert all(share.values()), f"a gateway carries none of the {len(flows)} flows: {share}"
    if family == 4:
        for g in GW3:
            flow = next(f for f, v in picked.items() if v == g)
            assert _alone(aa3lab, pods, flow, family) == g, f"IPv{family} {flow}: picked {g}"
    # All flows at once: each gateway's tunnel counts its flows' requests in, replies out
    # (plus the peers' probes: less than one flow's packets in this time).
    before = _counts(aa3lab, family)
    pings = {f: _ping_fam(pods, *f, family, "-q", "-c", str(SPREAD_COUNT)) for f in flows}
    for f, p in pings.items():
        out, _ = p.communicate(timeout=60)
        assert f" {SPREAD_COUNT} received" in out, f"IPv{family} {f} lost packets:\n{out[-400:]}"
    after = _counts(aa3lab, family)
    for g in GW3:
        want = share[g] * SPREAD_COUNT
        rx, tx = after[g][0] - before[g][0], after[g][1] - before[g][1]
        assert want <= rx < want + SPREAD_COUNT, f"IPv{family} {g}: {rx} packets in, {want} expected"
        assert want <= tx < want + SPREAD_COUNT, f"IPv{family} {g}: {tx} packets out, {want} expected"


def test_losing_one_of_three_moves_only_its_share_ipv4_and_ipv6(aa3lab: Lab, aa3_v6: dict[Flow, str]) -> None:
    pods = aa3lab.pods()
    flows = _flows3(pods)
    picked = {4: predict(aa3lab, pods, flows, 4), 6: aa3_v6}
    cut = "w2"
    # Pinged: up to two flows per gateway and family (all 48 at 100/s would load the machine).
    pinged: list[tuple[int, Flow]] = []
    for fam in (4, 6):
        for g in GW3:
            pinged += [(fam, f) for f in [f for f, v in picked[fam].items() if v == g][:2]]
    assert {picked[fam][f] for fam, f in pinged} == set(GW3)
    count = 800  # 8 s at 10 ms
    spools = {k: spool() for k in pinged}
    pings = {(fam, f): _ping_fam(pods, *f, fam, "-D", "-c", str(count), out=spools[(fam, f)]) for fam, f in pinged}
    time.sleep(1.5)
    cut_at = time.time()
    aalab_e1 = f"{aa3lab.name}-east-e1"
    groups = [(f"{aa3lab.name}-{n}", cidr[fam]) for n, cidr in (("east-e1", WEST_CIDR), ("east-e2", WEST_CIDR),
                                                                ("west-w4", EAST_CIDR)) for fam in (4, 6)]  # fmt: skip
    aa3lab.lab("fail", f"west/{cut}")
    try:
        wait_until(lambda: all(len(_group(aa3lab, ns, dst)) == 2 for ns, dst in groups), 10,
                   "the cut gateway to leave every group (east/e1, east/e2, west/w4)")  # fmt: skip
        # Only the cut gateway's share moved: every other flow is picked to the same gateway as
        # before, and the cut one's flows are spread over the survivors (IPv6: measured once
        # the pings are over, still cut).
        during = {4: predict(aa3lab, pods, [f for fm, f in pinged if fm == 4], 4)}
        results = {k: _loss(p, spools[k]) for k, p in pings.items()}
        heal_at = time.time()  # the end of the window the outages are measured in
        during[6] = measure6(aa3lab, pods, [f for fm, f in pinged if fm == 6])
    finally:
        aa3lab.lab("heal", f"west/{cut}")
    report: dict[str, Any] = {}
    for (fam, f), (sent, got, replies) in results.items():
        # Up to the flow's own last reply: the pings end one after another before heal_at.
        gap = largest_gap(replies, cut_at, min(heal_at, replies[-1])) if replies and replies[-1] > cut_at else -1
        report[f"IPv{fam} {f[0]} -> {f[1]} via {picked[fam][f]}"] = {"lost": sent - got,
                                                                     "largest_gap_ms": round(gap * 1000)}
    print("\n" + json.dumps(report, indent=1))
    for fam, f in pinged:
        sent, got, replies = results[(fam, f)]
        if picked[fam][f] != cut:
            assert during[fam][f] == picked[fam][f], f"IPv{fam} {f} moved from {picked[fam][f]} to {during[fam][f]}"
            assert sent == got, f"IPv{fam} {f} on a surviving gateway lost {sent - got} of {sent} packets"
            gap = largest_gap(replies, cut_at, min(heal_at, replies[-1]))
            assert gap < MAX_SURVIVOR_GAP_S, f"IPv{fam} {f} on a surviving gateway paused {gap:.3f} s"
        else:
            assert during[fam][f] != cut, f"IPv{fam} {f} still picked to the cut gateway"
            assert replies and replies[-1] > cut_at + 1, f"IPv{fam} {f} of the cut gateway did not resume"
            gap = largest_gap(replies, cut_at, min(heal_at, replies[-1]))
            assert gap < MAX_OUTAGE_S, f"IPv{fam} {f}: outage {gap:.3f} s"
    wait_until(lambda: all(len(_group(aa3lab, aalab_e1, WEST_CIDR[fam])) == 3 for fam in (4, 6)), 30,
               "the healed gateway to rejoin east/e1's groups")  # fmt: skip
    wait_until(aa3lab.all_in_sync, 30, "every node in sync after heal")
