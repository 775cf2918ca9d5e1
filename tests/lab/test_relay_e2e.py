"""End to end, through fabric-tool: agents whose sessions go through fabric-relay processes
(``lab up --relays 2``, issue 21 section 1, the relay tier) on examples/gateway.yaml.

What must hold with real agents programming real namespaces: every agent holds its session
through its relay (mutual TLS both ways) and got its certificate from the reflector itself
(``--certificates-from``: relays carry sessions only); the fabric is in sync and every pod
reaches every other pod; killing a relay loses no packet of a flow between nodes behind it
(the dataplane stays programmed), the lab's supervisor restarts the relay and its agents resync
through it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.control import api
from tests.lab.conftest import REPO, Lab, Ping, lab_running, largest_gap, new_lab_name
from tests.waiting import wait_until

TOPOLOGY = REPO / "examples" / "gateway.yaml"
RELAYS = 2
#: A gap this long in a 10 ms ping is an outage; shorter ones are scheduling noise on a busy box.
NO_OUTAGE_S = 0.3


@pytest.fixture(scope="module")
def rlab() -> Iterator[Lab]:
    with lab_running(Lab(new_lab_name(), TOPOLOGY), "--relays", str(RELAYS), "--grace-period", "30",
                     "--timeout", "120") as lab:  # fmt: skip
        yield lab


def _relay_agents(lab: Lab, relay: dict[str, Any]) -> float:
    """``fabric_relay_agents`` as relay ``relay`` serves it (inside the lab's underlay namespace)."""
    gateway = relay["address"].rsplit(":", 1)[0]
    url = f"http://{gateway}:{api.DEFAULT_RELAY_METRICS_PORT + relay['index']}/metrics"
    netns = lab.status()["reflector"]["netns"]
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    text = lab.nsrun(netns, str(REPO / ".venv" / "bin" / "python"), "-c", fetch).stdout
    m = re.search(r"^fabric_relay_agents (\S+)$", text, re.M)
    assert m, text[-2000:]
    return float(m.group(1))


def test_every_agent_holds_its_session_through_a_relay_and_every_pod_reaches_every_pod(rlab: Lab) -> None:
    doc = rlab.status()
    relays = doc["relays"]
    assert [r["index"] for r in relays] == list(range(RELAYS)) and all(r["pid"] for r in relays), relays
    addresses = {r["address"] for r in relays}
    nodes = rlab.nodes()
    via = {key: n["session_via"] for key, n in nodes.items()}
    assert set(via.values()) == addresses, via  # every relay carries some, nothing goes direct
    assert all(n["in_sync"] for n in nodes.values()), {k: n["in_sync"] for k, n in nodes.items()}
    # The relays' own count of the agents they hold: every node, each on the relay it was given.
    held = {r["address"]: _relay_agents(rlab, r) for r in relays}
    assert held == {a: float(sum(1 for v in via.values() if v == a)) for a in addresses}, held
    # Each agent asked the reflector for its certificate (with the bootstrap credential) and
    # the relay vouched for it: the agents run with TLS, and nothing was refused.
    assert not doc.get("rejections"), doc.get("rejections")
    p = rlab.tool("check", "--lab", rlab.name, "--json", "--timeout", "3", check=False)
    report = json.loads(p.stdout)
    failed = [f"{x['src']} -> {x['dst']}: {x['error']}" for x in report["pairs"] if not x["ok"]]
    assert p.returncode == 0 and not failed, "\n".join(failed)


def test_a_killed_relay_loses_no_packet_and_its_agents_resync_through_it(rlab: Lab) -> None:
    nodes = rlab.nodes()
    relay = rlab.status()["relays"][0]
    behind = [k for k, n in nodes.items() if n["session_via"] == relay["address"]]
    # A flow between two nodes of different clusters whose agents both sit behind relay 0.
    src, dst = next((a, b) for a in behind for b in behind if a.split("/")[0] != b.split("/")[0])
    ping = Ping(rlab, f"{src}/p0", f"{dst}/p0", duration_s=25)
    time.sleep(1.5)
    killed_at = time.time()
    os.kill(relay["pid"], signal.SIGKILL)

    def back() -> bool:
        r = rlab.status()["relays"][0]
        return bool(r["pid"]) and r["pid"] != relay["pid"] and r["restarts"] >= 1

    wait_until(back, 60, "the supervisor to restart relay 0")
    wait_until(rlab.all_in_sync, 60, "every node in sync again, through the restarted relay")
    resynced_at = time.time()
    replies = ping.stop()
    gap = largest_gap(replies, killed_at, min(resynced_at, replies[-1]))
    print(f"\n{src} -> {dst} (both behind relay 0): largest gap {gap * 1000:.0f} ms while the relay was down and "
          f"its agents resynced ({resynced_at - killed_at:.1f} s)")
    assert gap < NO_OUTAGE_S, f"{src} -> {dst}: a gap of {gap:.3f} s after relay 0 was killed"
    after = {k: n["session_via"] for k, n in rlab.nodes().items() if k in behind}
    assert after == dict.fromkeys(behind, relay["address"])
