"""Observability end to end: metrics move, diagnose names what was broken (issue 6).

One lab of its own (a P2P cluster and a gateway-mode cluster with a single gateway candidate, so
a fault under test never makes the reflector fail over around it), built with a long resync period
so hand-made breakage that the event monitor does not see (a route or FDB entry *replaced*, not
deleted) stays until the test repairs it by restarting the node's agent. Steps run in file
order; each leaves the lab working.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.conftest import Lab, lab_running, new_lab_name, run
from tests.waiting import wait_until

pytestmark = pytest.mark.lab

TOPOLOGY = """\
underlay: 198.18.0.0/16
clusters:
  - name: east
    mode: p2p
    podCIDRs: [10.10.0.0/16]
    serviceCIDRs: [10.96.0.0/20]
    nodes:
      - {name: e1, pods: 1}
      - {name: e2, pods: 1}
      - {name: e3, pods: 1}
  - name: west
    mode: gateway
    gateways: [w1]
    podCIDRs: [10.20.0.0/16]
    serviceCIDRs: [10.97.0.0/20]
    nodes:
      - {name: w1, pods: 1}
      - {name: w2, pods: 1}
      - {name: w3, pods: 1}
"""

AGENT_METRICS = [
    "fabric_agent_reconcile_duration_seconds_count", "fabric_agent_kernel_failures_total",
    "fabric_agent_drift_repairs_total", "fabric_agent_desired_entries", "fabric_agent_programmed_entries",
    "fabric_agent_last_sync_age_seconds", "fabric_agent_session_connected", "fabric_agent_session_connects_total",
    "fabric_agent_tunnel_up", "fabric_agent_tunnel_peer_up", "fabric_agent_probe_rtt_seconds_count",
    "fabric_agent_probe_loss_ratio", "fabric_agent_gateway_role", "fabric_agent_announcement_rejections_total",
]
REFLECTOR_METRICS = [
    "fabric_reflector_sessions", "fabric_reflector_planned_version", "fabric_reflector_applied_version",
    "fabric_reflector_fanout_lag_seconds_count", "fabric_reflector_rejections_total", "fabric_reflector_gateway",
    "fabric_reflector_nodes_in_sync",
]


@pytest.fixture(scope="module")
def olab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    topo = tmp_path_factory.mktemp("obs") / "topology.yaml"
    topo.write_text(TOPOLOGY)
    up = ("--resync-period", "600", "--grace-period", "30", "--timeout", "90")
    with lab_running(Lab(new_lab_name(), topo), *up) as lab:
        yield lab


def scrape(lab: Lab, node: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample (comments dropped)."""
    text = lab.lab("metrics", node).stdout
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return samples.get(key, 0.0)


def restart_agent(lab: Lab, node: str) -> None:
    """The repair: a restarted agent reads the kernel back and programs the difference."""
    lab.lab("stop-agent", node)
    lab.lab("start-agent", node)
    wait_until(lab.all_in_sync, 30, "every node in sync after the agent restart")


def trace(lab: Lab, src: str, dst: str) -> tuple[int, str]:
    p = lab.tool("diagnose", "trace", src, dst, "--lab", lab.name, check=False)
    return p.returncode, p.stdout


def active_gateway(lab: Lab, cluster: str) -> str:
    for key, value in scrape(lab, "reflector").items():
        m = re.match(r'fabric_reflector_gateway\{cluster="(\w+)",node="(\w+)",role="active"\}', key)
        if m and m.group(1) == cluster and value == 1:
            return f"{cluster}/{m.group(2)}"
    raise AssertionError(f"no active gateway of {cluster} in the reflector's metrics")


def test_every_metric_is_served_and_health_is_green(olab: Lab) -> None:
    agent = wait_until(
        lambda: (s := scrape(olab, "east/e1")) and metric(s, "fabric_agent_probe_rtt_seconds_count", cluster="west") > 0
        and s,
        20,
        "probe samples on east/e1",
    )
    names = {k.partition("{")[0] for k in agent}
    assert set(AGENT_METRICS) <= names, set(AGENT_METRICS) - names
    assert metric(agent, "fabric_agent_tunnel_up", cluster="west") == 1
    assert metric(agent, "fabric_agent_gateway_role", role="endpoint") == 1
    assert metric(agent, "fabric_agent_desired_entries", table="routes") == metric(
        agent, "fabric_agent_programmed_entries", table="routes") > 0
    refl = scrape(olab, "reflector")
    names = {k.partition("{")[0] for k in refl}
    assert set(REFLECTOR_METRICS) <= names, set(REFLECTOR_METRICS) - names
    assert metric(refl, "fabric_reflector_sessions") == 6
    gw = active_gateway(olab, "west")
    assert metric(scrape(olab, gw), "fabric_agent_gateway_role", role="active") == 1
    for path in ("/healthz", "/readyz"):
        assert olab.lab("metrics", "east/e1", "--path", path).stdout.strip() == "ok"
        assert olab.lab("metrics", "reflector", "--path", path).stdout.strip() == "ok"
    assert "kernel matches the plan" in olab.tool("diagnose", "state", "west/w3", "--lab", olab.name).stdout


def test_route_deleted_by_hand_is_a_drift_repair(olab: Lab) -> None:
    ns = olab.nodes()["east/e1"]["netns"]
    before = metric(scrape(olab, "east/e1"), "fabric_agent_drift_repairs_total")
    run("ip", "-n", ns, "route", "del", "10.20.0.0/16", "table", "main")
    wait_until(
        lambda: metric(scrape(olab, "east/e1"), "fabric_agent_drift_repairs_total") > before,
        10,
        "drift repairs to count the deleted route",
    )
    rc, out = trace(olab, "east/e1/p0", "west/w3/p0")
    assert rc == 0, out


def test_trace_is_green_then_names_the_broken_route_fdb_and_neighbour(olab: Lab) -> None:
    for dst in ("west/w3/p0", "west/svc", "east/e2/p0"):
        rc, out = trace(olab, "east/e1/p0", dst)
        assert rc == 0 and "every hop green" in out, out
    rc, out = trace(olab, "west/w3/p0", "east/e2/p0")
    assert rc == 0 and "vx-local" in out and "vx-bridge" in out, out

    ns = olab.nodes()["east/e1"]["netns"]
    # Someone else's route replaces ours: no delete event, so it stays until the repair.
    run("ip", "-n", ns, "route", "replace", "blackhole", "10.20.0.0/16", "table", "main")
    try:
        rc, out = trace(olab, "east/e1/p0", "west/w3/p0")
        assert rc == 1 and "first failing hop: node east/e1 (route)" in out, out
        assert "broken object: route 10.20.0.0/16 via" in out, out
        state = olab.tool("diagnose", "state", "east/e1", "--lab", olab.name, check=False)
        assert state.returncode == 1 and "- missing   dst=10.20.0.0/16" in state.stdout, state.stdout
    finally:
        run("ip", "-n", ns, "route", "del", "10.20.0.0/16", "table", "main", check=False)
        restart_agent(olab, "east/e1")
    assert trace(olab, "east/e1/p0", "west/w3/p0")[0] == 0

    # An FDB entry on west's gateway: the one towards the east node that is not one of east's
    # gateways. (West has a single gateway candidate, so the probes that see this tunnel break
    # cannot move the role away from the fault under test.)
    gw = active_gateway(olab, "west")
    hot = {k for k, v in scrape(olab, "reflector").items() if k.startswith("fabric_reflector_gateway{") and v}
    plain = next(n for n in ("e1", "e2", "e3") if not any(f'node="{n}"' in k for k in hot))
    dst_ip = olab.nodes()[f"east/{plain}"]["underlay"]
    gw_ns = olab.nodes()[gw]["netns"]
    entries = json.loads(run("bridge", "-n", gw_ns, "-j", "fdb", "show", "dev", "vx-bridge").stdout or "[]")
    fdb = [e for e in entries if e.get("dst") == dst_ip]
    assert fdb, f"no FDB entry towards east/{plain} on {gw}"
    assert trace(olab, f"{gw}/p0", f"east/{plain}/p0")[0] == 0
    run("bridge", "-n", gw_ns, "fdb", "replace", fdb[0]["mac"], "dev", "vx-bridge", "dst", "198.18.0.250", "self",
        "permanent")  # fmt: skip
    try:
        rc, out = trace(olab, f"{gw}/p0", f"east/{plain}/p0")
        assert rc == 1 and f"first failing hop: node {gw} (FDB)" in out, out
        assert f"broken object: fdb {fdb[0]['mac']} dev vx-bridge dst {dst_ip}" in out, out
    finally:
        restart_agent(olab, gw)
    assert trace(olab, f"{gw}/p0", f"east/{plain}/p0")[0] == 0

    # The static neighbour of the same peer, overwritten with a MAC nobody has.
    gw = active_gateway(olab, "west")
    gw_ns = olab.nodes()[gw]["netns"]
    assert trace(olab, f"{gw}/p0", f"east/{plain}/p0")[0] == 0
    neighs = json.loads(run("ip", "-n", gw_ns, "-j", "neigh", "show", "dev", "vx-bridge").stdout or "[]")
    overlay = next(n["dst"] for n in neighs if n.get("lladdr") == fdb[0]["mac"])
    run("ip", "-n", gw_ns, "neigh", "replace", overlay, "lladdr", "02:00:00:00:00:77", "dev", "vx-bridge",
        "nud", "permanent")  # fmt: skip
    try:
        rc, out = trace(olab, f"{gw}/p0", f"east/{plain}/p0")
        assert rc == 1 and f"first failing hop: node {gw} (neighbour)" in out, out
        assert f"broken object: neighbour {overlay} lladdr {fdb[0]['mac']} dev vx-bridge" in out, out
    finally:
        restart_agent(olab, gw)
    assert trace(olab, f"{gw}/p0", f"east/{plain}/p0")[0] == 0


def test_mtu_finds_the_path_limit_and_warns_about_the_tunnel_device(olab: Lab) -> None:
    p = olab.tool("diagnose", "mtu", "east/e1/p0", "west/w3/p0", "--lab", olab.name, check=False)
    assert p.returncode == 0 and "path MTU 1450" in p.stdout, p.stdout
    gw = active_gateway(olab, "west")
    ns = olab.nodes()[gw]["netns"]
    run("ip", "-n", ns, "link", "set", "eth0", "mtu", "1400")  # the gateway's underlay link
    try:
        p = olab.tool("diagnose", "mtu", "east/e1/p0", "west/w3/p0", "--lab", olab.name, check=False)
        m = re.search(r"path MTU (\d+)", p.stdout)
        assert p.returncode == 1 and m and int(m.group(1)) < 1410, p.stdout
        assert "WARNING: vx-bridge on east/e1 has MTU 1450" in p.stdout, p.stdout
    finally:
        run("ip", "-n", ns, "link", "set", "eth0", "mtu", "1500")


def test_killed_tunnel_shows_loss_and_state_down_then_recovers(olab: Lab, tmp_path: Path) -> None:
    lost_before = metric(scrape(olab, "east/e1"), "fabric_agent_probes_lost_total", cluster="west")
    olab.lab("fail", "west/w1")
    try:
        def down_with_loss() -> bool:
            s = scrape(olab, "east/e1")
            return (metric(s, "fabric_agent_tunnel_up", cluster="west") == 0
                    and metric(s, "fabric_agent_tunnel_peer_up", peer="west/w1") == 0
                    and metric(s, "fabric_agent_probes_lost_total", cluster="west") > lost_before)

        wait_until(down_with_loss, 15, "the tunnel to west to be down on east/e1, with probes lost")
        wait_until(
            lambda: metric(scrape(olab, "east/e1"), "fabric_agent_probe_loss_ratio", cluster="west") > 0.5,
            15,
            "the loss ratio to rise",
        )
        rc, out = trace(olab, "east/e1/p0", "west/w3/p0")
        assert rc == 1 and "tunnel down" in out, out
        check = olab.tool("check", "--lab", olab.name, "--timeout", "1", "--junit", str(tmp_path / "j.xml"),
                          check=False)  # fmt: skip
        assert check.returncode == 1 and "<failure" in (tmp_path / "j.xml").read_text()
    finally:
        olab.lab("heal", "west/w1")
    wait_until(
        lambda: metric(scrape(olab, "east/e1"), "fabric_agent_tunnel_up", cluster="west") == 1,
        30,
        "the tunnel to west to come back",
    )
    wait_until(olab.all_in_sync, 60, "every node in sync after heal")
    p = olab.tool("check", "--lab", olab.name, "--retest-failed", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nothing to retest" in olab.tool("check", "--lab", olab.name, "--retest-failed").stderr
    # Nothing above changed the plan (west has one gateway; an agent restart moves no role, issue
    # 21 section 3): cut east's active gateway so its role moves, and the fan-out of that plan is
    # timed once every agent, e1 back after the heal included, has applied it.
    lagged = metric(scrape(olab, "reflector"), "fabric_reflector_fanout_lag_seconds_count")
    olab.lab("fail", "east/e1")
    try:
        wait_until(lambda: metric(scrape(olab, "reflector"), "fabric_reflector_gateway", cluster="east", node="e2",
                                  role="active") == 1, 20, "east's active gateway role to move to e2")
    finally:
        olab.lab("heal", "east/e1")
    wait_until(olab.all_in_sync, 60, "every node in sync after the heal of e1")
    wait_until(lambda: metric(scrape(olab, "reflector"), "fabric_reflector_fanout_lag_seconds_count") > lagged, 30,
               "the fan-out of the new plan timed")
