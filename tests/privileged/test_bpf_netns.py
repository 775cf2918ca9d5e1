"""The translator on real devices: two namespaces joined by a veth pair.

    kft-A (our cluster's node)                  kft-B (another cluster)
    10.0.1.5/16, fd00:10::1:5/64                100.65.3.9/16, fd00:65::3:9/64
    a0 [tunnel ingress + egress programs] ----- b0
    kf-hp (ifb) [hairpin program]               routes 100.64/16, fd00:64::/64 -> b0

a0 plays the tunnel device. B knows A only by its global addresses (100.64.1.5, fd00:64::1:5).
Transmit checksum offload is off on both ends (``ethtool -K tx off``), so a wrong L4 checksum
fix-up is caught by the receiving stack instead of being trusted as CHECKSUM_PARTIAL.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.bpf.translate import AttachPoint, Mapping, Translator, parse_mappings

MAPPINGS = {"10.0.0.0/16": "100.64.0.0/16", "fd00:10::/64": "fd00:64::/64"}
A4_L, A4_G, B4 = "10.0.1.5", "100.64.1.5", "100.65.3.9"
A6_L, A6_G, B6 = "fd00:10::1:5", "fd00:64::1:5", "fd00:65::3:9"
REPO = Path(__file__).resolve().parents[2]

# Accepts one connection, reads everything, answers "<peer address> <bytes read>".
SERVER = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("ready", flush=True)
c, peer = s.accept(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    n += len(b)
c.sendall(f"{peer[0]} {n}".encode()); c.close()
"""
# Sends 300 kB (many segments, GSO on the sender) and prints the server's answer.
CLIENT = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
c = socket.create_connection((sys.argv[1], 5001), timeout=10); peer = c.getpeername()[0]
c.sendall(b"k" * 300000); c.shutdown(socket.SHUT_WR)
print(c.recv(1000).decode(), peer)
"""


def sh(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(args[:6])}... failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    return p.stdout


def nsx(ns: str, *args: str) -> str:
    return sh("ip", "netns", "exec", ns, *args)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[str, str, Path]]:
    a, b = f"kft-{uuid.uuid4().hex[:8]}", f"kft-{uuid.uuid4().hex[:8]}"
    bpffs = Path(tempfile.mkdtemp(prefix="kftbpf"))
    sh("mount", "-t", "bpf", "bpf", str(bpffs))
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            nsx(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "a0", "type", "veth", "peer", "b0", "netns", b)
        sh("ip", "-n", a, "link", "add", "kf-hp", "type", "ifb")  # no dummy module here
        for ns, dev, v4, v6 in ((a, "a0", A4_L + "/16", A6_L + "/64"), (b, "b0", B4 + "/16", B6 + "/64")):
            nsx(ns, "ethtool", "-K", dev, "tx", "off")
            sh("ip", "-n", ns, "addr", "add", v4, "dev", dev)
            sh("ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", a, "link", "set", "kf-hp", "up")
        mac = {ns: nsx(ns, "cat", f"/sys/class/net/{dev}/address").strip() for ns, dev in ((a, "a0"), (b, "b0"))}
        for dst in ("100.65.0.0/16", "fd00:65::/64"):
            sh("ip", "-n", a, "route", "add", dst, "dev", "a0")
        for dst in ("100.64.0.0/16", "fd00:64::/64"):
            sh("ip", "-n", b, "route", "add", dst, "dev", "b0")
            sh("ip", "-n", a, "route", "add", dst, "dev", "kf-hp")  # hairpin: own globals
        for addr in (B4, B6):
            sh("ip", "-n", a, "neigh", "replace", addr, "lladdr", mac[b], "dev", "a0", "nud", "permanent")
        for addr in (A4_G, A6_G):
            sh("ip", "-n", b, "neigh", "replace", addr, "lladdr", mac[a], "dev", "b0", "nud", "permanent")
        yield a, b, bpffs
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["umount", str(bpffs)], check=False)
        bpffs.rmdir()


@pytest.fixture(scope="module")
def loaded(pair: tuple[str, str, Path]) -> Iterator[Translator]:
    a, _b, bpffs = pair
    t = Translator("netns", pin_root=bpffs / "kosmos-fabric", netns=a)
    t.load()
    t.set_mappings(parse_mappings(MAPPINGS))
    t.attach_tunnel("a0")
    t.attach("kf-hp", AttachPoint.HAIRPIN)
    try:
        yield t
    finally:
        t.cleanup(["a0", "kf-hp"])


def exchange(server_ns: str, listen: str, client_ns: str, connect: str) -> tuple[str, int, str]:
    """(peer address the server saw, bytes it got, peer address the client saw)."""
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", SERVER, listen],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        out = nsx(client_ns, sys.executable, "-c", CLIENT, connect).split()
        srv.wait(timeout=10)
        return out[0], int(out[1]), out[2]
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


@pytest.mark.parametrize(("a_l", "a_g", "b"), [(A4_L, A4_G, B4), (A6_L, A6_G, B6)], ids=["ipv4", "ipv6"])
def test_tcp_both_directions_with_translated_peer(pair: tuple[str, str, Path], loaded: Translator,
                                                  a_l: str, a_g: str, b: str) -> None:
    a, bns, _ = pair
    m = next(m for m in loaded.mappings() if m.local.version == (6 if ":" in a_l else 4))
    before = loaded.counters()[m]
    # A's pod connects out: B sees A's global address.
    assert exchange(bns, b, a, b) == (a_g, 300000, b)
    # B connects to A's global address: A's pod sees B as is, B's socket sees A's global.
    assert exchange(a, a_l, bns, a_g) == (b, 300000, a_g)
    after = loaded.counters()[m]
    assert after.in_packets > before.in_packets and after.out_packets > before.out_packets
    assert after.in_bytes > before.in_bytes + 300000  # B -> A carried the 300 kB once


@pytest.mark.parametrize(("a_l", "a_g"), [(A4_L, A4_G), (A6_L, A6_G)], ids=["ipv4", "ipv6"])
def test_hairpin_reaches_own_global_address(pair: tuple[str, str, Path], loaded: Translator,
                                            a_l: str, a_g: str) -> None:
    """A pod connecting to its cluster's own global address (here its own) through kf-hp."""
    a, _b, _ = pair
    assert exchange(a, a_l, a, a_g) == (a_g, 300000, a_g)


def _prog_ids(ns: str) -> list[str]:
    out = "".join(nsx(ns, "tc", "filter", "show", "dev", "a0", side) for side in ("ingress", "egress"))
    return re.findall(r" id (\d+)", out)


def test_restart_keeps_counters_and_loses_no_ping(pair: tuple[str, str, Path], loaded: Translator) -> None:
    """A second process (the restarted agent) compiles, reuses the pins and replaces the filters
    while B pings A's global address every 10 ms."""
    a, b, bpffs = pair
    m = Mapping.parse("10.0.0.0/16", "100.64.0.0/16")
    nsx(b, "ping", "-c", "3", "-i", "0.2", A4_G)
    before = loaded.counters()[m]
    ids_before = _prog_ids(a)
    # Pings until told to stop (SIGINT: ping prints its summary), so a slow compile on a loaded
    # machine can never outlast it; stopped half a second after the restart is done.
    ping = subprocess.Popen(["ip", "netns", "exec", b, "ping", "-q", "-i", "0.01", A4_G],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    restart = (
        "from pathlib import Path; from fabric.bpf.translate import Translator, parse_mappings\n"
        f"t = Translator('netns', pin_root=Path({str(bpffs / 'kosmos-fabric')!r}), netns={a!r})\n"
        f"t.load(); d = t.set_mappings(parse_mappings({MAPPINGS!r}))\n"
        "assert not d.added and not d.removed, d\n"
        "t.attach_tunnel('a0')\n"
    )
    try:
        subprocess.run([sys.executable, "-c", restart], check=True, cwd=REPO, timeout=300)
        time.sleep(0.5)
    finally:
        ping.send_signal(signal.SIGINT)
    out, _ = ping.communicate(timeout=60)
    sent, got = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())  # type: ignore[union-attr]
    assert sent >= 50 and got == sent, out  # every echo of the whole restart answered
    assert _prog_ids(a) != ids_before  # the programs really were replaced
    after = loaded.counters()[m]
    assert after.in_packets >= before.in_packets + got and after.out_packets >= before.out_packets + got
