"""End to end, through fabric-tool: issue 3's acceptance on examples/gateway.yaml.

One P2P cluster (east: e1, e2) and two gateway-mode clusters (west: w1 w2 w3, north: n1 n2 n3,
gateway candidates the first two of each), one pod per node, a lab service per cluster.
Steps run in file order against one lab (module fixture); each leaves the lab working.

The failover test PRINTS the measured outage (run pytest with -s to see it) and fails above
3 s; the target is under 1 s.
"""

from __future__ import annotations

import json
import os
import signal
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


def test_killing_the_gateway_agent_causes_no_outage(gwlab: Lab) -> None:
    src, dst = "north/n3/p0", "west/w3/p0"
    active = _clusters(gwlab)["west"]["active_gateway"]
    pid = gwlab.nodes()[f"west/{active}"]["agent_pid"]
    assert pid
    ping = Ping(gwlab, src, dst, duration_s=30)
    time.sleep(1.5)
    start = time.time()
    os.kill(int(pid), signal.SIGKILL)
    time.sleep(4.0)
    end = time.time()
    replies = ping.stop()
    gap = largest_gap(replies, start, end)
    print(f"\nagent of the active gateway west/{active} killed: largest gap {gap * 1000:.0f} ms")
    assert gap < NO_OUTAGE_S, f"killing only the agent interrupted traffic for {gap:.3f} s"
    gwlab.lab("start-agent", f"west/{active}")
    wait_until(gwlab.all_in_sync, 30, "every node in sync after the agent restart")
    p = gwlab.tool("check", "--lab", gwlab.name, "--services", "--host-network", "--json", check=False)
    assert p.returncode == 0, p.stdout[-2000:]
