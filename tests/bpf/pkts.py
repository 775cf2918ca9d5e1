"""Packets for the translator's in-kernel tests, as named scapy constants.

One cluster's mappings (MAPPINGS) and the addresses around them. Every translated packet is
written out in full with the addresses it must carry after translation; its checksums are
computed by scapy from scratch (:func:`rebuilt`), so a test compares the program's output with
an independent computation, byte for byte. Quoted headers inside ICMP errors are the complete
original packets (small enough to be quoted whole), so their checksums are checkable too.

Naming: <PROTO><family>_<direction>[_<variant>] is the input, the same name + ``_X`` is the
expected output. Directions: IN (tunnel ingress, dst global -> local), OUT (tunnel egress,
src local -> global), HP (hairpin: both, then redirect).
"""

from __future__ import annotations

from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    fragment6,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

MAPPINGS = {
    "10.0.0.0/16": "100.64.0.0/16",
    "172.16.5.0/24": "100.66.7.0/24",
    "fd00:10::/64": "fd00:64::/64",
}

POD4_L, POD4_G = "10.0.1.5", "100.64.1.5"        # a pod of ours, local and global
POD4B_L, POD4B_G = "10.0.2.9", "100.64.2.9"      # another pod of ours
SVC4_L, SVC4_G = "172.16.5.77", "100.66.7.77"    # a service of ours (/24 mapping)
REMOTE4 = "100.65.3.9"                           # a pod of another cluster, by its global IP
ROUTER4 = "100.65.0.1"                           # a router on the other side
NODE4 = "192.168.1.1"                            # a node address (no mapping)
POD6_L, POD6_G = "fd00:10::1:5", "fd00:64::1:5"
POD6B_L, POD6B_G = "fd00:10::2:9", "fd00:64::2:9"
REMOTE6 = "fd00:65::3:9"
ROUTER6 = "fd00:65::1"
NODE6 = "fd00:198::1"                            # a node address (no mapping)

PAYLOAD = Raw(b"kosmos-fabric translation test payload")


def eth() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def eth_raw(l3: bytes, ethertype: int = 0x0800) -> Raw:
    """An Ethernet frame around raw (malformed, truncated) L3 bytes."""
    return Raw(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=ethertype)) + l3)


def rebuilt(pkt: Packet) -> bytes:
    """The packet's bytes with every checksum (and length) computed afresh by scapy."""
    p = pkt.copy()
    for layer in _layers(p):
        for f in ("chksum", "cksum", "len", "plen"):
            if f in layer.fields and not (f == "chksum" and isinstance(layer, UDP) and layer.chksum == 0):
                layer.fields.pop(f, None)  # (a UDP checksum of 0 means "none" and stays 0)
    return bytes(p)


def _layers(p: Packet) -> list[Any]:
    out = []
    while p is not None and not isinstance(p, Raw) and p.name != "NoPayload":
        out.append(p)
        p = p.payload if p.payload else None
    return out


def quoted(pkt: Packet) -> Raw:
    """A whole packet as the payload of an ICMP error (checksums computed by scapy)."""
    return Raw(rebuilt(pkt))


# --- IPv4, tunnel ingress ---------------------------------------------------------------------
TCP4_IN = eth() / IP(src=REMOTE4, dst=POD4_G) / TCP(sport=40000, dport=80, flags="PA", seq=7) / PAYLOAD
TCP4_IN_X = eth() / IP(src=REMOTE4, dst=POD4_L) / TCP(sport=40000, dport=80, flags="PA", seq=7) / PAYLOAD
UDP4_IN = eth() / IP(src=REMOTE4, dst=SVC4_G) / UDP(sport=5353, dport=53) / PAYLOAD
UDP4_IN_X = eth() / IP(src=REMOTE4, dst=SVC4_L) / UDP(sport=5353, dport=53) / PAYLOAD
UDP4_IN_ZEROCSUM = eth() / IP(src=REMOTE4, dst=POD4_G) / UDP(sport=4789, dport=4789, chksum=0) / PAYLOAD
UDP4_IN_ZEROCSUM_X = eth() / IP(src=REMOTE4, dst=POD4_L) / UDP(sport=4789, dport=4789, chksum=0) / PAYLOAD
ICMP4_IN_ECHO = eth() / IP(src=REMOTE4, dst=POD4_G) / ICMP(type=8, id=3, seq=1) / PAYLOAD
ICMP4_IN_ECHO_X = eth() / IP(src=REMOTE4, dst=POD4_L) / ICMP(type=8, id=3, seq=1) / PAYLOAD
_OPTS = [IPOption_RR(routers=["1.2.3.4"]), IPOption_NOP()]
TCP4_IN_OPTIONS = eth() / IP(src=REMOTE4, dst=POD4_G, options=_OPTS) / TCP(sport=1, dport=2, flags="S") / PAYLOAD
TCP4_IN_OPTIONS_X = eth() / IP(src=REMOTE4, dst=POD4_L, options=_OPTS) / TCP(sport=1, dport=2, flags="S") / PAYLOAD
# Path MTU discovery: a router of the other cluster says our (translated) TCP segment was too big.
_SENT4 = IP(src=POD4_G, dst=REMOTE4, flags="DF") / TCP(sport=33000, dport=443, flags="PA", seq=99) / PAYLOAD
_SENT4_X = IP(src=POD4_L, dst=REMOTE4, flags="DF") / TCP(sport=33000, dport=443, flags="PA", seq=99) / PAYLOAD
ICMP4_IN_FRAG_NEEDED = eth() / IP(src=ROUTER4, dst=POD4_G) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted(_SENT4)
ICMP4_IN_FRAG_NEEDED_X = eth() / IP(src=ROUTER4, dst=POD4_L) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted(_SENT4_X)
# traceroute: time exceeded for a UDP probe we sent
_PROBE4 = IP(src=POD4_G, dst=REMOTE4, ttl=1) / UDP(sport=45000, dport=33434) / PAYLOAD
_PROBE4_X = IP(src=POD4_L, dst=REMOTE4, ttl=1) / UDP(sport=45000, dport=33434) / PAYLOAD
ICMP4_IN_TTL = eth() / IP(src=ROUTER4, dst=POD4_G) / ICMP(type=11, code=0) / quoted(_PROBE4)
ICMP4_IN_TTL_X = eth() / IP(src=ROUTER4, dst=POD4_L) / ICMP(type=11, code=0) / quoted(_PROBE4_X)
# Fragments of one UDP datagram: the first carries the UDP header (checksum over the whole
# datagram, updated incrementally), the others only IP.
# A probe whose UDP checksum computes to 0 (sent as 0xffff: 0 means "no checksum"), quoted in
# time exceeded: the quote must come back as the pod sent it, 0xffff, not 0 (the incremental
# update alone yields 0) -- found writing the model, tests/bpf/model.py.
def _udp_sum_zero(ip: Packet, sent_as: Packet) -> Packet:
    """``ip / UDP / payload``, two payload bytes chosen so that the UDP checksum of ``sent_as``
    (the same packet as the pod sent it, local source) computes to 0."""
    base = sent_as / UDP(sport=45001, dport=33434) / Raw(b"zero-sum" + b"\0\0")
    fix = (IP if ip.version == 4 else IPv6)(rebuilt(base))[UDP].chksum  # the sum the 2 bytes cancel
    return ip / UDP(sport=45001, dport=33434) / Raw(b"zero-sum" + fix.to_bytes(2, "big"))


_ZPROBE4_X = _udp_sum_zero(IP(src=POD4_L, dst=REMOTE4, ttl=1), IP(src=POD4_L, dst=REMOTE4, ttl=1))
_ZPROBE4 = _udp_sum_zero(IP(src=POD4_G, dst=REMOTE4, ttl=1), IP(src=POD4_L, dst=REMOTE4, ttl=1))
ICMP4_IN_TTL_UDP_FFFF = eth() / IP(src=ROUTER4, dst=POD4_G) / ICMP(type=11, code=0) / quoted(_ZPROBE4)
ICMP4_IN_TTL_UDP_FFFF_X = eth() / IP(src=ROUTER4, dst=POD4_L) / ICMP(type=11, code=0) / quoted(_ZPROBE4_X)
_BIG4 = IP(src=REMOTE4, dst=POD4_G, id=4242) / UDP(sport=7000, dport=7001) / Raw(b"x" * 96)
_BIG4_X = IP(src=REMOTE4, dst=POD4_L, id=4242) / UDP(sport=7000, dport=7001) / Raw(b"x" * 96)
_FRAGS4 = fragment(IP(rebuilt(_BIG4)), fragsize=48)
_FRAGS4_X = fragment(IP(rebuilt(_BIG4_X)), fragsize=48)
FRAG4_IN_FIRST, FRAG4_IN_FIRST_X = eth() / _FRAGS4[0], eth() / _FRAGS4_X[0]
FRAG4_IN_LAST, FRAG4_IN_LAST_X = eth() / _FRAGS4[-1], eth() / _FRAGS4_X[-1]
GRE4_IN = eth() / IP(src=REMOTE4, dst=POD4_G, proto=47) / Raw(b"\x00\x00\x08\x00" + b"opaque" * 4)
GRE4_IN_X = eth() / IP(src=REMOTE4, dst=POD4_L, proto=47) / Raw(b"\x00\x00\x08\x00" + b"opaque" * 4)
# Protocol numbers are per family: 58 (ICMPv6) in IPv4 and 1 (ICMP) in IPv6 are unknown protocols
# (addresses only, payload untouched, however short) -- 1 in IPv6 found by tests/privileged/test_bpf_fuzz.py.
ICMP6_IN_IPV4 = eth() / IP(src=REMOTE4, dst=POD4_G, proto=58) / Raw(b"\x80\x00\x12\x34opaque")
ICMP6_IN_IPV4_X = eth() / IP(src=REMOTE4, dst=POD4_L, proto=58) / Raw(b"\x80\x00\x12\x34opaque")
ICMP4_IN_IPV6_SHORT = eth() / IPv6(src=REMOTE6, dst=POD6_G, nh=1) / Raw(b"\x08\x00")
ICMP4_IN_IPV6_SHORT_X = eth() / IPv6(src=REMOTE6, dst=POD6_L, nh=1) / Raw(b"\x08\x00")
TCP4_IN_OTHER = eth() / IP(src=REMOTE4, dst="100.70.0.1") / TCP(sport=1, dport=2) / PAYLOAD  # not ours
ARP_IN = eth() / ARP(psrc=REMOTE4, pdst=POD4_G)
# Malformed or truncated: left untouched (not IPv4 as far as anyone can tell) or dropped (ours,
# but the checksum that must change is missing).
# (A frame cut inside the IP header itself is refused by BPF_PROG_TEST_RUN with EINVAL, so it
# cannot be a row; the programs leave such a frame untouched because the header load fails.)
IP4_IHL_BEYOND_END = eth_raw(b"\x4f" + rebuilt(IP(src=REMOTE4, dst=POD4_G) / TCP())[1:])
IP4_BAD_IHL = eth_raw(b"\x43" + rebuilt(IP(src=REMOTE4, dst=POD4_G) / UDP() / PAYLOAD)[1:])
TCP4_IN_TRUNCATED = eth_raw(rebuilt(IP(src=REMOTE4, dst=POD4_G) / TCP() / PAYLOAD)[: 20 + 10])

# --- IPv4, tunnel egress ----------------------------------------------------------------------
TCP4_OUT = eth() / IP(src=POD4_L, dst=REMOTE4) / TCP(sport=33000, dport=443, flags="S") / PAYLOAD
TCP4_OUT_X = eth() / IP(src=POD4_G, dst=REMOTE4) / TCP(sport=33000, dport=443, flags="S") / PAYLOAD
UDP4_OUT_ZEROCSUM = eth() / IP(src=POD4_L, dst=REMOTE4) / UDP(sport=9, dport=9, chksum=0) / PAYLOAD
UDP4_OUT_ZEROCSUM_X = eth() / IP(src=POD4_G, dst=REMOTE4) / UDP(sport=9, dport=9, chksum=0) / PAYLOAD
# Our pod answers a probe from the other cluster (delivered to it with dst local) with an error.
_GOT4 = IP(src=REMOTE4, dst=POD4_L) / UDP(sport=5000, dport=6000) / PAYLOAD
_GOT4_X = IP(src=REMOTE4, dst=POD4_G) / UDP(sport=5000, dport=6000) / PAYLOAD
ICMP4_OUT_PORT_UNREACH = eth() / IP(src=POD4_L, dst=REMOTE4) / ICMP(type=3, code=3) / quoted(_GOT4)
ICMP4_OUT_PORT_UNREACH_X = eth() / IP(src=POD4_G, dst=REMOTE4) / ICMP(type=3, code=3) / quoted(_GOT4_X)
# A node of ours forwarding to a pod reports "fragmentation needed" from its own address (no
# mapping): the quoted local destination must still leave as the global one (tunnel_egress.bpf.c:
# no local address reaches another cluster) -- found writing the model, tests/bpf/model.py.
_FWD4 = IP(src=REMOTE4, dst=POD4_L, flags="DF") / TCP(sport=40000, dport=80, flags="PA") / PAYLOAD
_FWD4_X = IP(src=REMOTE4, dst=POD4_G, flags="DF") / TCP(sport=40000, dport=80, flags="PA") / PAYLOAD
ICMP4_OUT_NODE_FRAG_NEEDED = eth() / IP(src=NODE4, dst=REMOTE4) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted(_FWD4)
ICMP4_OUT_NODE_FRAG_NEEDED_X = eth() / IP(src=NODE4, dst=REMOTE4) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted(
    _FWD4_X)
ICMP4_OUT_NODE_ECHO = eth() / IP(src=NODE4, dst=REMOTE4) / ICMP(type=8) / quoted(_FWD4)  # not an error: untouched
TCP4_OUT_NODE = eth() / IP(src=NODE4, dst=REMOTE4) / TCP() / PAYLOAD  # no mapping: untouched

# --- IPv4, hairpin ----------------------------------------------------------------------------
TCP4_HP = eth() / IP(src=POD4_L, dst=POD4B_G) / TCP(sport=41000, dport=8080, flags="S") / PAYLOAD
TCP4_HP_X = eth() / IP(src=POD4_G, dst=POD4B_L) / TCP(sport=41000, dport=8080, flags="S") / PAYLOAD
TCP4_HP_REPLY = eth() / IP(src=POD4B_L, dst=POD4_G) / TCP(sport=8080, dport=41000, flags="SA") / PAYLOAD
TCP4_HP_REPLY_X = eth() / IP(src=POD4B_G, dst=POD4_L) / TCP(sport=8080, dport=41000, flags="SA") / PAYLOAD
UDP4_HP_FROM_NODE = eth() / IP(src=NODE4, dst=SVC4_G) / UDP(sport=1000, dport=53) / PAYLOAD
UDP4_HP_FROM_NODE_X = eth() / IP(src=NODE4, dst=SVC4_L) / UDP(sport=1000, dport=53) / PAYLOAD
TCP4_HP_NOT_OURS = eth() / IP(src=POD4_L, dst=REMOTE4) / TCP() / PAYLOAD

# --- IPv6, tunnel ingress ---------------------------------------------------------------------
TCP6_IN = eth() / IPv6(src=REMOTE6, dst=POD6_G) / TCP(sport=40000, dport=80, flags="PA") / PAYLOAD
TCP6_IN_X = eth() / IPv6(src=REMOTE6, dst=POD6_L) / TCP(sport=40000, dport=80, flags="PA") / PAYLOAD
UDP6_IN = eth() / IPv6(src=REMOTE6, dst=POD6_G) / UDP(sport=5353, dport=53) / PAYLOAD
UDP6_IN_X = eth() / IPv6(src=REMOTE6, dst=POD6_L) / UDP(sport=5353, dport=53) / PAYLOAD
ICMP6_IN_ECHO = eth() / IPv6(src=REMOTE6, dst=POD6_G) / ICMPv6EchoRequest(id=5, seq=1, data=b"ping")
ICMP6_IN_ECHO_X = eth() / IPv6(src=REMOTE6, dst=POD6_L) / ICMPv6EchoRequest(id=5, seq=1, data=b"ping")
_SENT6 = IPv6(src=POD6_G, dst=REMOTE6) / TCP(sport=33000, dport=443, flags="PA") / PAYLOAD
_SENT6_X = IPv6(src=POD6_L, dst=REMOTE6) / TCP(sport=33000, dport=443, flags="PA") / PAYLOAD
ICMP6_IN_TOO_BIG = eth() / IPv6(src=ROUTER6, dst=POD6_G) / ICMPv6PacketTooBig(mtu=1280) / quoted(_SENT6)
ICMP6_IN_TOO_BIG_X = eth() / IPv6(src=ROUTER6, dst=POD6_L) / ICMPv6PacketTooBig(mtu=1280) / quoted(_SENT6_X)
_ZPROBE6_X = _udp_sum_zero(IPv6(src=POD6_L, dst=REMOTE6, hlim=1), IPv6(src=POD6_L, dst=REMOTE6, hlim=1))
_ZPROBE6 = _udp_sum_zero(IPv6(src=POD6_G, dst=REMOTE6, hlim=1), IPv6(src=POD6_L, dst=REMOTE6, hlim=1))
ICMP6_IN_TTL_UDP_FFFF = eth() / IPv6(src=ROUTER6, dst=POD6_G) / ICMPv6TimeExceeded() / quoted(_ZPROBE6)
ICMP6_IN_TTL_UDP_FFFF_X = eth() / IPv6(src=ROUTER6, dst=POD6_L) / ICMPv6TimeExceeded() / quoted(_ZPROBE6_X)
_PING6 = IPv6(src=POD6_G, dst=REMOTE6) / ICMPv6EchoRequest(id=9, seq=2, data=b"x" * 40)
_PING6_X = IPv6(src=POD6_L, dst=REMOTE6) / ICMPv6EchoRequest(id=9, seq=2, data=b"x" * 40)
ICMP6_IN_TOO_BIG_PING = eth() / IPv6(src=ROUTER6, dst=POD6_G) / ICMPv6PacketTooBig(mtu=1280) / quoted(_PING6)
ICMP6_IN_TOO_BIG_PING_X = eth() / IPv6(src=ROUTER6, dst=POD6_L) / ICMPv6PacketTooBig(mtu=1280) / quoted(_PING6_X)
_EXT = IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
TCP6_IN_EXTHDRS = eth() / IPv6(src=REMOTE6, dst=POD6_G) / _EXT / TCP(sport=1, dport=2) / PAYLOAD
TCP6_IN_EXTHDRS_X = eth() / IPv6(src=REMOTE6, dst=POD6_L) / _EXT / TCP(sport=1, dport=2) / PAYLOAD
_BIG6 = IPv6(src=REMOTE6, dst=POD6_G) / IPv6ExtHdrFragment(id=77) / UDP(sport=7000, dport=7001) / Raw(b"y" * 120)
_BIG6_X = IPv6(src=REMOTE6, dst=POD6_L) / IPv6ExtHdrFragment(id=77) / UDP(sport=7000, dport=7001) / Raw(b"y" * 120)
_FRAGS6 = fragment6(IPv6(rebuilt(_BIG6)), 104)
_FRAGS6_X = fragment6(IPv6(rebuilt(_BIG6_X)), 104)
FRAG6_IN_FIRST, FRAG6_IN_FIRST_X = eth() / _FRAGS6[0], eth() / _FRAGS6_X[0]
FRAG6_IN_LAST, FRAG6_IN_LAST_X = eth() / _FRAGS6[-1], eth() / _FRAGS6_X[-1]
_MANY = IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
TCP6_IN_TOO_MANY_EXTHDRS = eth() / IPv6(src=REMOTE6, dst=POD6_G) / _MANY / _MANY / TCP() / PAYLOAD
TCP6_IN_OTHER = eth() / IPv6(src=REMOTE6, dst="fd00:99::1") / TCP() / PAYLOAD
IP6_EXTHDR_BEYOND_END = eth_raw(rebuilt(IPv6(src=REMOTE6, dst=POD6_G, nh=0))[:40], 0x86DD)
UDP6_IN_TRUNCATED = eth_raw(rebuilt(IPv6(src=REMOTE6, dst=POD6_G) / UDP() / PAYLOAD)[: 40 + 4], 0x86DD)

# --- IPv6, tunnel egress and hairpin ----------------------------------------------------------
UDP6_OUT = eth() / IPv6(src=POD6_L, dst=REMOTE6) / UDP(sport=5353, dport=53) / PAYLOAD
UDP6_OUT_X = eth() / IPv6(src=POD6_G, dst=REMOTE6) / UDP(sport=5353, dport=53) / PAYLOAD
ICMP6_OUT_ECHO_REPLY = eth() / IPv6(src=POD6_L, dst=REMOTE6) / ICMPv6EchoReply(id=5, seq=1, data=b"pong")
ICMP6_OUT_ECHO_REPLY_X = eth() / IPv6(src=POD6_G, dst=REMOTE6) / ICMPv6EchoReply(id=5, seq=1, data=b"pong")
_GOT6 = IPv6(src=REMOTE6, dst=POD6_L) / UDP(sport=5000, dport=6000) / PAYLOAD
_GOT6_X = IPv6(src=REMOTE6, dst=POD6_G) / UDP(sport=5000, dport=6000) / PAYLOAD
ICMP6_OUT_PORT_UNREACH = eth() / IPv6(src=POD6_L, dst=REMOTE6) / ICMPv6DestUnreach(code=4) / quoted(_GOT6)
ICMP6_OUT_PORT_UNREACH_X = eth() / IPv6(src=POD6_G, dst=REMOTE6) / ICMPv6DestUnreach(code=4) / quoted(_GOT6_X)
_FWD6 = IPv6(src=REMOTE6, dst=POD6_L) / TCP(sport=40000, dport=80, flags="PA") / PAYLOAD
_FWD6_X = IPv6(src=REMOTE6, dst=POD6_G) / TCP(sport=40000, dport=80, flags="PA") / PAYLOAD
ICMP6_OUT_NODE_TOO_BIG = eth() / IPv6(src=NODE6, dst=REMOTE6) / ICMPv6PacketTooBig(mtu=1280) / quoted(_FWD6)
ICMP6_OUT_NODE_TOO_BIG_X = eth() / IPv6(src=NODE6, dst=REMOTE6) / ICMPv6PacketTooBig(mtu=1280) / quoted(_FWD6_X)
TCP6_HP = eth() / IPv6(src=POD6_L, dst=POD6B_G) / TCP(sport=41000, dport=8080, flags="S") / PAYLOAD
TCP6_HP_X = eth() / IPv6(src=POD6_G, dst=POD6B_L) / TCP(sport=41000, dport=8080, flags="S") / PAYLOAD
