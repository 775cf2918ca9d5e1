"""ICMP and ICMPv6 echo: the one encoder and parser of the agent's tunnel probes and the tools.

The agent's prober (:mod:`fabric.agent.probes`), ``fabric-probe`` (``tools.diagnose.probe``) and
``fabric diagnose mtu`` all send echo requests through raw sockets and read what comes back;
they share this code so that a request is built, and a reply or an ICMP error matched, the same
way everywhere. Standard library only (no scapy): the agent image does not carry it.

Raw IPv4 ICMP sockets deliver the whole IP packet (header included); raw ICMPv6 sockets deliver
the ICMPv6 message alone (the source comes from ``recvfrom``) and the kernel fills the ICMPv6
checksum, which covers a pseudo-header only the kernel knows for sure.
"""

from __future__ import annotations

import dataclasses
import socket
import struct

ECHO_REQUEST = 8
ECHO_REPLY = 0
DEST_UNREACHABLE = 3
FRAG_NEEDED = 4  # code of DEST_UNREACHABLE: DF set and the next hop's MTU is too small
TIME_EXCEEDED = 11
ECHO_REQUEST6 = 128
ECHO_REPLY6 = 129
DEST_UNREACHABLE6 = 1
TIME_EXCEEDED6 = 3

_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
_IPV6_HEADER_LEN = 40


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``; a message with a correct one sums to 0."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMP echo request (type 8) with its checksum; the kernel adds the IP header."""
    header = _HEADER.pack(ECHO_REQUEST, 0, 0, ident, seq)
    return _HEADER.pack(ECHO_REQUEST, 0, checksum(header + payload), ident, seq) + payload


def echo_request6(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMPv6 echo request (type 128), checksum 0: the kernel fills it on raw ICMPv6 sockets."""
    return _HEADER.pack(ECHO_REQUEST6, 0, 0, ident, seq) + payload


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One received ICMP or ICMPv6 message, decoded as far as the probers need."""

    #: Source address (IPv4: from the IP header; IPv6: what the caller passed from recvfrom).
    src: str
    type: int
    code: int
    #: Bytes 4-5 and 6-7 of the header: an echo's identifier and sequence (for "fragmentation
    #: needed", ``seq`` is the next-hop MTU).
    ident: int
    seq: int
    #: An error's quoted echo request as ``(identifier, sequence)``; None for other messages or
    #: when the quote is not an echo request.
    quoted: tuple[int, int] | None = None

    def is_reply(self, ident: int) -> bool:
        """An echo reply (either family) carrying our identifier."""
        return self.type in (ECHO_REPLY, ECHO_REPLY6) and self.ident == ident

    def quotes(self, ident: int) -> bool:
        """An error quoting one of our echo requests (``self.quoted[1]`` is its sequence)."""
        return self.quoted is not None and self.quoted[0] == ident


def parse4(packet: bytes) -> Message | None:
    """An IPv4 packet from a raw ICMP socket, decoded; None when it is not a whole ICMP header."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_ICMP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    icmp_type, code, _csum, ident, seq = _HEADER.unpack_from(packet, ihl)
    quoted = None
    if icmp_type in (DEST_UNREACHABLE, TIME_EXCEEDED):
        inner = packet[ihl + 8 :]  # the offending packet's IP header and its first 8 bytes
        if len(inner) >= 20 and inner[0] >> 4 == 4 and inner[9] == socket.IPPROTO_ICMP:
            qihl = (inner[0] & 0x0F) * 4
            if len(inner) >= qihl + 8:
                qtype, _qc, _qs, qid, qseq = _HEADER.unpack_from(inner, qihl)
                if qtype == ECHO_REQUEST:
                    quoted = (qid, qseq)
    return Message(socket.inet_ntoa(packet[12:16]), icmp_type, code, ident, seq, quoted)


def parse6(message: bytes, src: str = "") -> Message | None:
    """An ICMPv6 message from a raw ICMPv6 socket (no IPv6 header), decoded; ``src`` is the
    sender from ``recvfrom`` (any ``%scope`` suffix dropped). None when shorter than a header."""
    if len(message) < 8:
        return None
    icmp_type, code, _csum, ident, seq = _HEADER.unpack_from(message)
    quoted = None
    if icmp_type in (DEST_UNREACHABLE6, TIME_EXCEEDED6) and len(message) >= 8 + _IPV6_HEADER_LEN + 8:
        # The error quotes our request: its IPv6 header (40 bytes, no extension headers on our
        # requests), then our echo header.
        qtype, _qc, _qs, qid, qseq = _HEADER.unpack_from(message, 8 + _IPV6_HEADER_LEN)
        if qtype == ECHO_REQUEST6:
            quoted = (qid, qseq)
    return Message(src.partition("%")[0], icmp_type, code, ident, seq, quoted)
