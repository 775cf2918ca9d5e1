"""Global IP end to end (issue 4): examples/global-ip.yaml through the CLI.

east (p2p) and west (gateway mode) use identical pod and service CIDRs, each mapped to its own
global CIDRs; north does not overlap anything. Checked: every pair passes with remote pods
probed by global IP; TCP (iperf3) both ways between the overlapping clusters with transmit
checksum offload off in the pods (a wrong L4 checksum fix-up is dropped by the receiver instead
of being trusted as CHECKSUM_PARTIAL); the receiving pod sees the sender's *global* address;
hairpin (a pod reaching a pod of its own cluster by global IP); counters move; ``lab down``
removes the lab's bpffs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import REPO, RESYNC_S, Lab, lab_running, new_lab_name, run
from tests.waiting import wait_until

TOPOLOGY = REPO / "examples" / "global-ip.yaml"
# Accepts one connection and answers the peer address it saw (then exits).
PEER_SERVER = (
    "import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
    "s.bind(('0.0.0.0',int(sys.argv[1])));s.listen(1);print('ready',flush=True);"
    "c,p=s.accept();c.sendall(p[0].encode());c.close()"
)
PEER_CLIENT = (
    "import socket,sys;c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5);"
    "print(c.recv(100).decode())"
)


@pytest.fixture(scope="module")
def glab() -> Iterator[Lab]:
    name = new_lab_name()
    with lab_running(Lab(name, TOPOLOGY), "--resync-period", str(RESYNC_S), "--timeout", "120") as lab:
        yield lab
    assert not os.path.exists(f"/run/kosmos-fabric/lab/{name}/bpf"), "lab down left the lab's bpffs"
    assert f"/run/kosmos-fabric/lab/{name}/bpf" not in Path("/proc/self/mounts").read_text()


def _pods(lab: Lab) -> dict[str, dict[str, Any]]:
    return lab.pods()


def _peer_seen(lab: Lab, server: dict[str, Any], client: dict[str, Any], connect_to: str, port: int) -> str:
    """The address ``server`` saw when ``client`` connected to ``connect_to``."""
    srv = subprocess.Popen(["ip", "netns", "exec", server["netns"], sys.executable, "-c", PEER_SERVER, str(port)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        out = lab.nsrun(client["netns"], sys.executable, "-c", PEER_CLIENT, connect_to, str(port)).stdout.strip()
        srv.wait(timeout=10)
        return out
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


def _counters(lab: Lab, node: str) -> dict[str, dict[str, int]]:
    doc = json.loads(lab.lab("bpf", node, "--json").stdout)
    return {m["local"]: m for m in doc["mappings"]}


def test_status_shows_global_ips_and_check_uses_them(glab: Lab) -> None:
    pods = _pods(glab)
    assert pods["east/e1/p0"]["ip"] == pods["west/w1/p0"]["ip"] == "10.10.0.2"  # really overlapping
    assert pods["east/e1/p0"]["global_ip"] == "172.20.0.2"
    assert pods["west/w1/p0"]["global_ip"] == "172.22.0.2"
    assert pods["north/n1/p0"]["global_ip"] is None
    res = glab.check()
    assert res["returncode"] == 0 and res["failed"] == 0, res
    used = {(p["src"], p["dst"]): p["dst_ip"] for p in res["pairs"]}
    n = len(pods)
    assert len(used) == n * (n - 1)
    for (src, dst), ip in used.items():
        same = src.split("/")[0] == dst.split("/")[0]
        want = pods[dst]["ip"] if same or pods[dst]["global_ip"] is None else pods[dst]["global_ip"]
        assert ip == want, (src, dst, ip)


def test_tcp_both_ways_and_receiver_sees_global_source(glab: Lab) -> None:
    pods = _pods(glab)
    east, west = pods["east/e1/p0"], pods["west/w2/p1"]  # west/w2 is not the active gateway
    for p in (east, west):
        glab.nsrun(p["netns"], "ethtool", "-K", "eth0", "tx", "off")
    before = _counters(glab, "east/e1")["10.10.0.0/16"]
    for server, client in ((west, east), (east, west)):
        srv = subprocess.Popen(["ip", "netns", "exec", server["netns"], "iperf3", "-s", "-1", "-p", "5301"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda s=server: ":5301" in glab.nsrun(s["netns"], "ss", "-ltnH").stdout, 10, "iperf3 -s")
            out = run("ip", "netns", "exec", client["netns"], "iperf3", "-c", server["global_ip"], "-p", "5301",
                      "-t", "2", "-J", check=False)
            doc = json.loads(out.stdout)
            assert out.returncode == 0 and "error" not in doc, doc.get("error", out.stderr)
            assert doc["end"]["sum_received"]["bytes"] > 1_000_000, doc["end"]
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                srv.wait(timeout=10)
            if srv.poll() is None:
                srv.kill()
                srv.wait()
    assert _peer_seen(glab, west, east, west["global_ip"], 5302) == east["global_ip"]
    assert _peer_seen(glab, east, west, east["global_ip"], 5303) == west["global_ip"]
    # north (not mapped) sees east by its global address, and east sees north as it is.
    north = pods["north/n1/p0"]
    assert _peer_seen(glab, north, east, north["ip"], 5304) == east["global_ip"]
    assert _peer_seen(glab, east, north, east["global_ip"], 5305) == north["ip"]
    after = _counters(glab, "east/e1")["10.10.0.0/16"]
    assert after["in_packets"] > before["in_packets"] and after["out_packets"] > before["out_packets"]
    assert after["in_bytes"] - before["in_bytes"] > 1_000_000  # west -> east carried the iperf stream


def test_hairpin_same_cluster_by_global_ip(glab: Lab) -> None:
    pods = _pods(glab)
    # Across nodes of a P2P cluster, across nodes of a gateway cluster, and to itself.
    for a, b in (("east/e1/p0", "east/e2/p0"), ("west/w2/p0", "west/w1/p0"), ("east/e1/p1", "east/e1/p1")):
        src, dst = pods[a], pods[b]
        assert _peer_seen(glab, dst, src, dst["global_ip"], 5310) == src["global_ip"], (a, b)
    doc = json.loads(glab.lab("bpf", "east/e1", "--json").stdout)
    attached = {(x["device"], x["direction"]) for x in doc["attachments"]}
    assert attached == {("vx-bridge", "ingress"), ("vx-bridge", "egress"), ("kf-hairpin", "egress")}
    # An internal node of the gateway cluster has no vx-bridge: hairpin only.
    st = glab.status()
    west = next(c for c in st["clusters"] if c["name"] == "west")
    internal = [n["name"] for n in west["nodes"] if n["name"] not in (west["active_gateway"], west["standby_gateway"])]
    assert not internal  # two nodes: active and standby, both hold vx-bridge and the programs
    for node in ("west/w1", "west/w2"):
        doc = json.loads(glab.lab("bpf", node, "--json").stdout)
        assert ("vx-bridge", "egress") in {(x["device"], x["direction"]) for x in doc["attachments"]}, node


def test_diagnose_trace_follows_global_ips(glab: Lab) -> None:
    """`diagnose trace` to a remote pod's global IP shows the global -> real hop on the owning
    node and ends at that pod, every hop green."""
    pods = _pods(glab)
    dst = pods["west/w2/p1"]
    out = glab.tool("diagnose", "trace", "east/e1/p0", dst["global_ip"], "--lab", glab.name, "--json").stdout
    doc = json.loads(out)
    text = json.dumps(doc)
    assert f"{dst['global_ip']} -> {dst['ip']}" in text, text
    assert "west/w2/p1" in text and "global->real" in text, text
    assert doc["ok"] and _first_failure(doc) is None, text


def test_trace_names_a_missing_translation_entry_and_the_agent_repairs_it(glab: Lab) -> None:
    """Drift in a BPF map: remove the ingress (global -> local) entry on the node that
    translates; `diagnose trace` names that hop and entry, and the next resync puts it back."""
    import ipaddress

    from fabric.bpf import translate

    pods = _pods(glab)
    dst = pods["west/w2/p1"]
    global_cidr = "172.22.0.0/16"

    def trace() -> dict[str, Any]:
        p = glab.tool("diagnose", "trace", "east/e1/p0", dst["global_ip"], "--lab", glab.name, "--json",
                      check=False)
        out: dict[str, Any] = json.loads(p.stdout)
        return out

    green = trace()
    translating = next(h["where"] for h in green["hops"] if h["what"] == "global->real")
    node = translating.removeprefix("node ")
    pin_dir = Path(f"/run/kosmos-fabric/lab/{glab.name}/bpf/{node.replace('/', '-')}")
    for _attempt in range(5):  # the agent may repair it before the trace looks: try again
        maps = translate.TranslatorMaps(pin_dir)
        try:
            assert maps.maps["xlate4_dnat"].delete(translate._key(ipaddress.ip_network(global_cidr)))
        finally:
            maps.close()
        fail = _first_failure(trace())
        if fail is not None:
            break
    assert fail is not None, "the translation entry was repaired before any trace saw it"
    assert fail["what"] == "translation" and fail["where"] == translating, fail
    assert global_cidr in fail["broken"] and node in fail["broken"], fail
    wait_until(lambda: trace()["ok"], RESYNC_S * 1.2 + 10, "the agent to put the translation entry back")


def _first_failure(trace: dict[str, Any]) -> dict[str, Any] | None:
    return next((h for h in trace["hops"] if not h["ok"]), None)
