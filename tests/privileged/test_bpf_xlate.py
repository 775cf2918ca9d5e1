"""The translator's programs, run in the kernel on scapy packets (BPF_PROG_TEST_RUN).

Each row is (description, attach point, input packet, expected packet, expected verdict), with
packets from tests/bpf/pkts.py. Expected packets carry checksums computed by scapy from scratch
for the translated addresses, so a byte-for-byte match proves every checksum fix-up; a row whose
expected packet is its input proves the program left it alone (or dropped it unmodified).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from fabric.bpf import libbpf
from fabric.bpf.translate import AttachPoint, Mapping, Translator, parse_mappings
from tests.bpf import pkts as P

OK, SHOT, REDIRECT = 0, 2, 7
IN, OUT, HP = AttachPoint.TUNNEL_INGRESS, AttachPoint.TUNNEL_EGRESS, AttachPoint.HAIRPIN

CASES: list[tuple[str, AttachPoint, Packet, Packet, int]] = [
    # IPv4 ingress: destination global -> local
    ("tcp4 in", IN, P.TCP4_IN, P.TCP4_IN_X, OK),
    ("udp4 in, /24 service mapping", IN, P.UDP4_IN, P.UDP4_IN_X, OK),
    ("udp4 in, zero checksum stays zero", IN, P.UDP4_IN_ZEROCSUM, P.UDP4_IN_ZEROCSUM_X, OK),
    ("icmp4 echo in", IN, P.ICMP4_IN_ECHO, P.ICMP4_IN_ECHO_X, OK),
    ("ipv4 options in", IN, P.TCP4_IN_OPTIONS, P.TCP4_IN_OPTIONS_X, OK),
    ("icmp4 frag-needed in, quoted tcp source", IN, P.ICMP4_IN_FRAG_NEEDED, P.ICMP4_IN_FRAG_NEEDED_X, OK),
    ("icmp4 time-exceeded in, quoted udp source", IN, P.ICMP4_IN_TTL, P.ICMP4_IN_TTL_X, OK),
    ("icmp4 time-exceeded in, quoted udp checksum 0xffff stays 0xffff", IN, P.ICMP4_IN_TTL_UDP_FFFF,
     P.ICMP4_IN_TTL_UDP_FFFF_X, OK),
    ("ipv4 first fragment in", IN, P.FRAG4_IN_FIRST, P.FRAG4_IN_FIRST_X, OK),
    ("ipv4 non-first fragment in", IN, P.FRAG4_IN_LAST, P.FRAG4_IN_LAST_X, OK),
    ("unknown protocol (gre) in: addresses only", IN, P.GRE4_IN, P.GRE4_IN_X, OK),
    ("protocol 58 in ipv4 is not icmpv6: addresses only", IN, P.ICMP6_IN_IPV4, P.ICMP6_IN_IPV4_X, OK),
    ("protocol 1 in ipv6 is not icmp: short is not truncated", IN, P.ICMP4_IN_IPV6_SHORT, P.ICMP4_IN_IPV6_SHORT_X, OK),
    ("tcp4 in, not our global: untouched", IN, P.TCP4_IN_OTHER, P.TCP4_IN_OTHER, OK),
    ("tcp4 out-bound packet on ingress: untouched", IN, P.TCP4_OUT, P.TCP4_OUT, OK),
    ("arp: untouched", IN, P.ARP_IN, P.ARP_IN, OK),
    ("ours, ihl reaches past the end: dropped unmodified", IN, P.IP4_IHL_BEYOND_END, P.IP4_IHL_BEYOND_END, SHOT),
    ("ipv4 ihl 3: untouched", IN, P.IP4_BAD_IHL, P.IP4_BAD_IHL, OK),
    ("ours, tcp header truncated: dropped unmodified", IN, P.TCP4_IN_TRUNCATED, P.TCP4_IN_TRUNCATED, SHOT),
    # IPv4 egress: source local -> global
    ("tcp4 out", OUT, P.TCP4_OUT, P.TCP4_OUT_X, OK),
    ("udp4 out, zero checksum stays zero", OUT, P.UDP4_OUT_ZEROCSUM, P.UDP4_OUT_ZEROCSUM_X, OK),
    ("icmp4 port-unreach out, quoted udp destination", OUT, P.ICMP4_OUT_PORT_UNREACH,
     P.ICMP4_OUT_PORT_UNREACH_X, OK),
    ("icmp4 frag-needed out from a node address, quoted local destination", OUT, P.ICMP4_OUT_NODE_FRAG_NEEDED,
     P.ICMP4_OUT_NODE_FRAG_NEEDED_X, OK),
    ("icmp4 echo out from a node address: untouched", OUT, P.ICMP4_OUT_NODE_ECHO, P.ICMP4_OUT_NODE_ECHO, OK),
    ("tcp4 out from a node address: untouched", OUT, P.TCP4_OUT_NODE, P.TCP4_OUT_NODE, OK),
    ("tcp4 in-bound packet on egress: untouched", OUT, P.TCP4_IN, P.TCP4_IN, OK),
    # IPv4 hairpin: both, then redirect to the hairpin device's ingress
    ("tcp4 hairpin", HP, P.TCP4_HP, P.TCP4_HP_X, REDIRECT),
    ("tcp4 hairpin reply", HP, P.TCP4_HP_REPLY, P.TCP4_HP_REPLY_X, REDIRECT),
    ("udp4 hairpin from a node address: destination only", HP, P.UDP4_HP_FROM_NODE, P.UDP4_HP_FROM_NODE_X,
     REDIRECT),
    ("hairpin, destination not ours: untouched", HP, P.TCP4_HP_NOT_OURS, P.TCP4_HP_NOT_OURS, OK),
    # IPv6 ingress
    ("tcp6 in", IN, P.TCP6_IN, P.TCP6_IN_X, OK),
    ("udp6 in", IN, P.UDP6_IN, P.UDP6_IN_X, OK),
    ("icmp6 echo in (pseudo-header)", IN, P.ICMP6_IN_ECHO, P.ICMP6_IN_ECHO_X, OK),
    ("icmp6 packet-too-big in, quoted tcp source", IN, P.ICMP6_IN_TOO_BIG, P.ICMP6_IN_TOO_BIG_X, OK),
    ("icmp6 packet-too-big in, quoted echo source", IN, P.ICMP6_IN_TOO_BIG_PING, P.ICMP6_IN_TOO_BIG_PING_X, OK),
    ("icmp6 time-exceeded in, quoted udp checksum 0xffff stays 0xffff", IN, P.ICMP6_IN_TTL_UDP_FFFF,
     P.ICMP6_IN_TTL_UDP_FFFF_X, OK),
    ("ipv6 hop-by-hop + destination options in", IN, P.TCP6_IN_EXTHDRS, P.TCP6_IN_EXTHDRS_X, OK),
    ("ipv6 first fragment in", IN, P.FRAG6_IN_FIRST, P.FRAG6_IN_FIRST_X, OK),
    ("ipv6 non-first fragment in", IN, P.FRAG6_IN_LAST, P.FRAG6_IN_LAST_X, OK),
    ("ipv6 too many extension headers: dropped unmodified", IN, P.TCP6_IN_TOO_MANY_EXTHDRS,
     P.TCP6_IN_TOO_MANY_EXTHDRS, SHOT),
    ("tcp6 in, not our global: untouched", IN, P.TCP6_IN_OTHER, P.TCP6_IN_OTHER, OK),
    ("ours, ipv6 extension header missing: dropped unmodified", IN, P.IP6_EXTHDR_BEYOND_END,
     P.IP6_EXTHDR_BEYOND_END, SHOT),
    ("ours, udp6 header truncated: dropped unmodified", IN, P.UDP6_IN_TRUNCATED, P.UDP6_IN_TRUNCATED, SHOT),
    # IPv6 egress and hairpin
    ("udp6 out", OUT, P.UDP6_OUT, P.UDP6_OUT_X, OK),
    ("icmp6 echo reply out", OUT, P.ICMP6_OUT_ECHO_REPLY, P.ICMP6_OUT_ECHO_REPLY_X, OK),
    ("icmp6 port-unreach out, quoted udp destination", OUT, P.ICMP6_OUT_PORT_UNREACH,
     P.ICMP6_OUT_PORT_UNREACH_X, OK),
    ("icmp6 packet-too-big out from a node address, quoted local destination", OUT, P.ICMP6_OUT_NODE_TOO_BIG,
     P.ICMP6_OUT_NODE_TOO_BIG_X, OK),
    ("tcp6 hairpin", HP, P.TCP6_HP, P.TCP6_HP_X, REDIRECT),
]


@pytest.fixture(scope="module")
def bpffs() -> Iterator[Path]:
    """A private bpf filesystem instance (nothing pinned in the machine's /sys/fs/bpf)."""
    d = Path(tempfile.mkdtemp(prefix="kftbpf"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
        d.rmdir()


@pytest.fixture(scope="module")
def translator(bpffs: Path) -> Iterator[Translator]:
    t = Translator("table", pin_root=bpffs / "kosmos-fabric")
    t.load()
    delta = t.set_mappings(parse_mappings(P.MAPPINGS))
    assert not delta.failed
    try:
        yield t
    finally:
        t.cleanup()


def _bytes(pkt: Packet) -> bytes:
    return P.rebuilt(pkt)


@pytest.mark.parametrize(("desc", "point", "pkt", "expected", "verdict"), CASES, ids=[c[0] for c in CASES])
def test_translation(translator: Translator, desc: str, point: AttachPoint, pkt: Packet, expected: Packet,
                     verdict: int) -> None:
    res = libbpf.prog_test_run(translator.prog_fd(point), _bytes(pkt))
    want = _bytes(expected)
    assert res.retval == verdict, f"{desc}: verdict {res.retval}, expected {verdict}"
    if res.data != want:
        got, exp = Ether(res.data), Ether(want)
        pytest.fail(f"{desc}: output differs\n--- got\n{got.show2(dump=True)}\n--- expected\n{exp.show2(dump=True)}")


def test_counters_and_drops_count_per_mapping(translator: Translator) -> None:
    pod = Mapping.parse("10.0.0.0/16", "100.64.0.0/16")
    before, drops_before = translator.counters()[pod], translator.drops()
    for _ in range(3):
        libbpf.prog_test_run(translator.prog_fd(IN), _bytes(P.TCP4_IN))
    libbpf.prog_test_run(translator.prog_fd(OUT), _bytes(P.TCP4_OUT))
    libbpf.prog_test_run(translator.prog_fd(IN), _bytes(P.TCP4_IN_TRUNCATED))
    after = translator.counters()[pod]
    assert after.in_packets - before.in_packets == 3
    assert after.in_bytes - before.in_bytes == 3 * len(_bytes(P.TCP4_IN))
    assert after.out_packets - before.out_packets == 1
    assert translator.drops()["l4_truncated"] - drops_before["l4_truncated"] == 1


def test_lpm_most_specific_wins_and_delta_keeps_counters(translator: Translator) -> None:
    """A later, more specific mapping takes over its prefix; unchanged mappings keep their slots."""
    pod = Mapping.parse("10.0.0.0/16", "100.64.0.0/16")
    libbpf.prog_test_run(translator.prog_fd(IN), _bytes(P.TCP4_IN))
    kept = translator.counters()[pod].in_packets
    assert kept > 0
    base = parse_mappings(P.MAPPINGS)
    try:
        # same mappings plus one: only the new one is written
        extra = Mapping.parse("10.1.0.0/24", "100.67.0.0/24")
        delta = translator.set_mappings([*base, extra])
        assert delta.added == [extra] and delta.unchanged == len(base) and not delta.removed
        assert translator.counters()[pod].in_packets == kept
        res = libbpf.prog_test_run(translator.prog_fd(IN), _bytes(
            P.eth() / P.IP(src=P.REMOTE4, dst="100.67.0.9") / P.UDP(sport=1, dport=2) / P.PAYLOAD))
        assert Ether(res.data)["IP"].dst == "10.1.0.9"
    finally:
        delta = translator.set_mappings(base)
        assert delta.removed == [extra] and not delta.failed
    assert translator.counters()[pod].in_packets == kept


def test_dump_lists_mappings(translator: Translator) -> None:
    d = translator.dump()
    assert {(m["local"], m["global"]) for m in d["mappings"]} == set(P.MAPPINGS.items())
    assert set(d["drops"]) == {"l4_truncated", "store_failed", "exthdr_limit"}
