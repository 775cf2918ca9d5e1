"""End to end, through fabric-tool: issue 3's acceptance on examples/gateway.yaml.

One P2P cluster (east: e1, e2) and two gateway-mode clusters (west: w1 w2 w3, north: n1 n2 n3,
gateway candidates the first two of each), one pod per node, a lab service per cluster.
Steps run in file order against one lab (module fixture); each leaves the lab working.

The failover test PRINTS the measured outage (run pytest with -s to see it) and fails above
3 s; the target is under 1 s. Issue 21: an agent killed on the active gateway is restarted by
the lab's supervisor with no role move and no packet lost; every core saturated by a CPU hog in
every node namespace moves no role, while a real cut under that load still moves it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.conftest import REPO, Lab, Ping, lab_running, largest_gap, new_lab_name
from tests.waiting import wait_until

TOPOLOGY = REPO / "examples" / "gateway.yaml"
#: Fail the failover test above this (the issue's bound); the target is 1 s.
MAX_OUTAGE_S = 3.0
#: A gap this long in a 10 ms ping is an outage; shorter ones are scheduling noise on a busy box.
NO_OUTAGE_S = 0.3
#: How long the CPU-saturation test keeps every core busy (the bench runs 60 s).
SATURATION_S = 15.0


@pytest.fixture(scope="module")
def gwlab() -> Iterator[Lab]:
    with lab_running(Lab(new_lab_name(), TOPOLOGY), "--grace-period", "30", "--timeout", "120") as lab:
        yield lab


def _clusters(lab: Lab) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in lab.status()["clusters"]}


def test_check_services_and_host_network_pass_every_pair(gwlab: Lab) -> None:
    clusters = _clusters(gwlab)
    assert {c: (v["mode"], v["active_gateway"], v["standby_gateway"]) for c, v in clusters.items()} == {
        "east": ("p2p", "e1", "e2"), "west": ("gateway", "w1", "w2"), "north": ("gateway", "n1", "n2")
    }  # fmt: skip
    p = gwlab.tool("check", "--lab", gwlab.name, "--services", "--host-network", "--json", "--timeout", "3",
                   check=False)  # fmt: skip
    doc = json.loads(p.stdout)
    failed = [f"{x['src']} -> {x['dst']}: {x['error']}" for x in doc["pairs"] if not x["ok"]]
    assert p.returncode == 0 and not failed, "\n".join(failed)
    kinds = {(x["src"].count("/"), x["dst"].endswith("/svc")) for x in doc["pairs"]}
    # pod -> pod, pod -> service, host network -> pod
    assert kinds == {(2, False), (2, True), (1, False)}
    # 8 pods: 56 pod pairs; 8 x 2 remote services; 8 hosts x the pods of the other clusters (5 or 6).
    assert doc["passed"] == 56 + 16 + (2 * 6 + 6 * 5)
    text = gwlab.tool("status", "--lab", gwlab.name).stdout
    assert "cluster west: active gateway w1, standby w2" in text


def test_cutting_the_active_gateway_fails_over_fast_and_heal_does_not_flap(gwlab: Lab) -> None:
    src, dst = "west/w3/p0", "north/n3/p0"  # internal node to internal node: through both gateways
    active = _clusters(gwlab)["west"]["active_gateway"]
    standby = _clusters(gwlab)["west"]["standby_gateway"]
    ping = Ping(gwlab, src, dst, duration_s=30)
    time.sleep(1.5)
    cut_at = time.time()
    gwlab.lab("fail", f"west/{active}")
    try:
        wait_until(lambda: _clusters(gwlab)["west"]["active_gateway"] == standby, 10, "the role to move to the standby")
        time.sleep(3.0)
        heal_at = time.time()
    finally:
        gwlab.lab("heal", f"west/{active}")
    time.sleep(5.0)
    end = time.time()
    replies = ping.stop()
    outage = largest_gap(replies, cut_at, heal_at)
    after_heal = largest_gap(replies, heal_at, end)
    print(f"\nfailover of west/{active} -> west/{standby}: outage {outage * 1000:.0f} ms "
          f"(largest gap in a 10 ms ping); after heal: largest gap {after_heal * 1000:.0f} ms")  # fmt: skip
    assert replies and replies[-1] > heal_at, "traffic did not resume"
    assert outage < MAX_OUTAGE_S, f"outage {outage:.3f} s exceeds {MAX_OUTAGE_S} s"
    assert after_heal < NO_OUTAGE_S, f"second outage of {after_heal:.3f} s after heal (flap back?)"
    west = _clusters(gwlab)["west"]
    assert (west["active_gateway"], west["standby_gateway"], west["gateway_moves"]) == (standby, active, 1)
    wait_until(gwlab.all_in_sync, 30, "every node in sync after heal")


def _moves(lab: Lab) -> dict[str, tuple[str, int]]:
    return {name: (c["active_gateway"], c["gateway_moves"]) for name, c in _clusters(lab).items()}


def _ping_count(lab: Lab, src: str, dst: str, count: int) -> subprocess.Popen[str]:
    """``count`` pings 10 ms apart; read the summary with :func:`_loss`."""
    pods = lab.pods()
    return subprocess.Popen(["ip", "netns", "exec", pods[src]["netns"], "ping", "-n", "-i", "0.01", "-W", "1",
                             "-c", str(count), pods[dst]["ip"]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _loss(p: subprocess.Popen[str]) -> tuple[int, int, str]:
    out, _ = p.communicate(timeout=120)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out[-2000:]
    return int(m.group(1)), int(m.group(2)), out[-500:]


def test_killing_the_gateway_agent_moves_nothing_loses_nothing_and_the_lab_restarts_it(gwlab: Lab) -> None:
    """An agent crash on the active gateway (issue 21 sections 3 and 5): its session ends, but the
    dataplane forwards and the peers still reach it through the tunnel, so the role stays; the
    lab's supervisor restarts the agent (counted in ``lab status``); not one packet is lost."""
    src, dst = "north/n3/p0", "west/w3/p0"
    active = _clusters(gwlab)["west"]["active_gateway"]
    node = gwlab.nodes()[f"west/{active}"]
    pid, restarts = node["agent_pid"], node["agent_restarts"]
    assert pid
    before = _moves(gwlab)
    ping = _ping_count(gwlab, src, dst, 1000)  # 10 s
    time.sleep(1.5)
    os.kill(int(pid), signal.SIGKILL)
    wait_until(lambda: (n := gwlab.nodes()[f"west/{active}"])["agent_pid"] not in (None, pid) and n["connected"],
               30, "the supervisor to restart the killed agent and its session to come back")  # fmt: skip
    sent, got, out = _loss(ping)
    after = _moves(gwlab)
    node = gwlab.nodes()[f"west/{active}"]
    print(f"\nagent of the active gateway west/{active} killed and restarted (pid {pid} -> {node['agent_pid']}): "
          f"{sent - got} of {sent} packets lost; roles {before} -> {after}")  # fmt: skip
    assert sent == 1000 and got == sent, out
    assert after == before, "an agent restart on the active gateway moved a role"
    assert node["agent_restarts"] == restarts + 1
    text = gwlab.lab("status").stdout
    assert f"restarts of agent/west/{active}: {restarts + 1}" in text
    wait_until(gwlab.all_in_sync, 30, "every node in sync after the agent restart")
    p = gwlab.tool("check", "--lab", gwlab.name, "--services", "--host-network", "--json", check=False)
    assert p.returncode == 0, p.stdout[-2000:]


@contextlib.contextmanager
def _cpu_hogs(lab: Lab) -> Iterator[list[int]]:
    """A busy loop in every node's namespace (more runnable processes than cores: every core
    saturated), ended by PID."""
    hogs = [subprocess.Popen(["ip", "netns", "exec", n["netns"], "sh", "-c", "while :; do :; done"])
            for n in lab.nodes().values()]  # fmt: skip
    try:
        yield [h.pid for h in hogs]
    finally:
        for h in hogs:
            with contextlib.suppress(ProcessLookupError):
                h.kill()
            h.wait(timeout=10)


def test_cpu_saturation_moves_no_role_and_a_real_cut_still_does(gwlab: Lab) -> None:
    """Every core saturated for SATURATION_S: the probes' verdicts must not move any role (the
    prober excuses its own stalls); a real cut under the same load still moves west's role."""
    wait_until(gwlab.all_in_sync, 30, "every node in sync")
    before = _moves(gwlab)
    active, standby = _clusters(gwlab)["west"]["active_gateway"], _clusters(gwlab)["west"]["standby_gateway"]
    with _cpu_hogs(gwlab) as pids:
        assert len(pids) == len(gwlab.nodes()) >= os.cpu_count()  # type: ignore[operator]
        time.sleep(SATURATION_S)
        during = _moves(gwlab)
        assert during == before, f"CPU saturation moved a role: {before} -> {during}"
        gwlab.lab("fail", f"west/{active}")
        try:
            wait_until(lambda: _clusters(gwlab)["west"]["active_gateway"] == standby, 15,
                       "the role to move to the standby on a real cut under load")  # fmt: skip
        finally:
            gwlab.lab("heal", f"west/{active}")
    after = _moves(gwlab)
    assert after["west"] == (standby, before["west"][1] + 1)
    assert {k: v for k, v in after.items() if k != "west"} == {k: v for k, v in before.items() if k != "west"}
    wait_until(gwlab.all_in_sync, 30, "every node in sync after heal")
