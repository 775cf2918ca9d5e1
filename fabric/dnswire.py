"""The one DNS wire-format codec (RFC 1035) of the project: read a query, write a response.

Two servers speak it: the clusterset responder of ``kosmos-mcs`` (:mod:`mcs.dns`, the zone
``svc.clusterset.local``) and the lab's cluster DNS (``kubeemu.dns``). Each keeps its own policy
(which names exist, which answers they get, which error a bad query earns); this module only
turns bytes into a :class:`Query` and a :class:`Response` back into bytes. It imports nothing of
ours, so the lab may use it without the production code depending on the lab.

The wire format, as far as an authoritative server and a forwarder need it:

- a 12-byte header (:data:`HEADER`): id, flags (QR, opcode, AA, TC, RD, RA, rcode), and the
  counts of questions, answers, authority and additional records;
- the question: a name (labels of 1 to 63 bytes, each behind its length byte, ending in a zero
  byte; a length byte with its top two bits set is instead a two-byte compression pointer to
  another place in the message), then type and class (two bytes each);
- resource records built from typed rdata (A, AAAA, CNAME, SRV, SOA: :func:`address_record` and
  the others). Their names are written uncompressed, except an owner name that is the
  question's, which is the pointer ``0xC00C`` (offset 12: where the question's name starts);
- a UDP response holds at most :data:`UDP_MAX` bytes (no EDNS). A longer one is truncated with
  TC set, so the client asks again over TCP (RFC 1035 4.2.1, RFC 7766). Which records a
  truncated response keeps is the caller's choice (:func:`encode_response`).

Safety rules for untrusted input (every query comes from the network):

- every read is bounds-checked: a malformed query raises :class:`Malformed` (its message says
  why), never IndexError, struct.error or UnicodeDecodeError, and nothing else escapes;
- compression pointers are followed at most :data:`MAX_POINTERS` times, so a pointer loop
  ends in :class:`Malformed` instead of spinning; a caller may refuse pointers in the
  question altogether (``pointers=False``: a query's only question has no earlier name to point
  to);
- a name longer than 255 bytes on the wire is malformed (RFC 1035 2.3.4), which also bounds
  the labels a query can make us hold;
- a response (QR set) is never answered (:func:`error_response` returns None): two servers
  must not answer each other in a loop; nor is a datagram shorter than a header (no id to echo).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("!HHHHHH")
QTYPE = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "TXT": 16, "AAAA": 28, "SRV": 33, "OPT": 41, "ANY": 255}
A, CNAME, SOA, AAAA, SRV, ANY = QTYPE["A"], QTYPE["CNAME"], QTYPE["SOA"], QTYPE["AAAA"], QTYPE["SRV"], QTYPE["ANY"]
QCLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
#: The largest UDP response without EDNS (RFC 1035 4.2.1); longer ones are truncated (TC set).
UDP_MAX = 512
FLAG_QR, FLAG_AA, FLAG_TC, FLAG_RD, FLAG_RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
#: The opcode's bits in the flags (echoed in every response).
OPCODE_MASK = 0x7800
#: Compression pointers followed in one name at most: more is a loop (a real name has far fewer:
#: at most 127 labels fit in 255 bytes).
MAX_POINTERS = 127
#: The owner name "the question's name": a pointer to offset 12, where the question starts.
QUESTION_POINTER = b"\xc0\x0c"


class Malformed(Exception):
    """A query this codec cannot read (the message says why)."""


@dataclass(frozen=True)
class Header:
    """What every message starts with, as far as a server reads it before the question."""

    ident: int
    flags: int
    qdcount: int

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)


@dataclass(frozen=True)
class Query(Header):
    """One parsed query: its header, the first question's labels (lowercased, for lookups), type
    and class, and the question's raw bytes (echoed as sent: the client's case kept)."""

    labels: tuple[str, ...]
    qtype: int
    qclass: int
    question: bytes

    @property
    def name(self) -> str:
        """The question's name, lowercase, without the trailing dot ("" for the root)."""
        return ".".join(self.labels)


def parse_header(data: bytes) -> Header | None:
    """The header of ``data``; None when it is shorter than one (nothing to answer: no id)."""
    if len(data) < HEADER.size:
        return None
    ident, flags, qd, _an, _ns, _ar = HEADER.unpack_from(data)
    return Header(ident, flags, qd)


def read_name(data: bytes, pos: int, *, pointers: bool = True) -> tuple[tuple[str, ...], int]:
    """The labels of the name at ``pos``, lowercased, and the position just after the name where
    it starts. Compression pointers are followed (at most :data:`MAX_POINTERS`), or with
    ``pointers=False`` refused; :class:`Malformed` for anything unreadable."""
    labels: list[str] = []
    end = -1
    total = 0
    jumps = 0
    while True:
        if pos >= len(data):
            raise Malformed("name runs past the end")
        n = data[pos]
        if n & 0xC0 == 0xC0 and pointers:
            if pos + 1 >= len(data):
                raise Malformed("truncated compression pointer")
            jumps += 1
            if jumps > MAX_POINTERS:
                raise Malformed("compression pointer loop")
            if end < 0:
                end = pos + 2
            pos = ((n & 0x3F) << 8) | data[pos + 1]
            continue
        if n & 0xC0:
            raise Malformed("compressed name in a question" if n & 0xC0 == 0xC0 else f"label type {n >> 6} unknown")
        pos += 1
        if n == 0:
            return tuple(labels), end if end >= 0 else pos
        label = data[pos:pos + n]
        if len(label) != n:
            raise Malformed("label runs past the end")
        total += n + 1
        if total > 255:
            raise Malformed("name longer than 255 bytes")
        labels.append(label.decode("ascii", "replace").lower())
        pos += n


def encode_name(name: str) -> bytes:
    """``name`` (dots between labels; a trailing dot optional) in wire form, uncompressed;
    ValueError naming it when a label or the whole is too long (or not ASCII)."""
    out = bytearray()
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        try:
            raw = label.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"DNS label {label!r} of {name!r}: not ASCII") from None
        if not 0 < len(raw) <= 63:
            raise ValueError(f"DNS label {label!r} of {name!r}: 1 to 63 characters")
        out += bytes([len(raw)]) + raw
    out += b"\0"
    if len(out) > 255:
        raise ValueError(f"DNS name {name!r}: longer than 255 bytes")
    return bytes(out)


def parse_query(data: bytes, *, pointers: bool = True) -> Query:
    """The header and first question of ``data``; :class:`Malformed` if unreadable (a datagram
    shorter than a header cannot even be answered: the caller drops it). ``pointers``: whether
    the question's name may use compression (:func:`read_name`)."""
    head = parse_header(data)
    if head is None:
        raise Malformed("shorter than a DNS header")
    if head.qdcount < 1:
        raise Malformed("no question")
    labels, pos = read_name(data, HEADER.size, pointers=pointers)
    if pos + 4 > len(data):
        raise Malformed("question without type and class")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    return Query(head.ident, head.flags, head.qdcount, labels, qtype, qclass, data[HEADER.size:pos + 4])


@dataclass(frozen=True)
class Record:
    """One resource record: owner name ("" meaning the question's name, written as a pointer),
    type, TTL and rdata already in wire form."""

    name: str
    rtype: int
    ttl: int
    rdata: bytes

    def encode(self) -> bytes:
        owner = QUESTION_POINTER if not self.name else encode_name(self.name)
        return owner + struct.pack("!HHIH", self.rtype, QCLASS_IN, self.ttl, len(self.rdata)) + self.rdata


def address_record(ip: str, ttl: int, name: str = "") -> Record:
    """An A or AAAA record (by the address's family); ValueError for a string that is no address."""
    addr = ipaddress.ip_address(ip)
    return Record(name, A if addr.version == 4 else AAAA, ttl, addr.packed)


def cname_record(target: str, ttl: int, name: str = "") -> Record:
    return Record(name, CNAME, ttl, encode_name(target))


def srv_record(priority: int, weight: int, port: int, target: str, ttl: int, name: str = "") -> Record:
    return Record(name, SRV, ttl, struct.pack("!HHH", priority, weight, port) + encode_name(target))


def soa_record(zone: str, ttl: int, serial: int) -> Record:
    """The zone's SOA (CoreDNS kubernetes plugin's shape: ``ns.dns.<zone>``,
    ``hostmaster.<zone>``, minimum = TTL), for the authority section of negative answers."""
    rdata = encode_name(f"ns.dns.{zone}") + encode_name(f"hostmaster.{zone}") + struct.pack(
        "!IIIII", serial & 0xFFFFFFFF, 7200, 1800, 86400, ttl)
    return Record(zone, SOA, ttl, rdata)


@dataclass
class Response:
    """What to answer: an rcode, answer and authority records."""

    rcode: int = NOERROR
    answers: list[Record] = field(default_factory=list)
    authority: list[Record] = field(default_factory=list)
    authoritative: bool = True


def encode_response(q: Query, resp: Response, limit: int | None = None, *, partial: bool = True) -> bytes:
    """The response datagram to ``q`` (its id, opcode and RD echoed; RA clear: this server does
    not recurse). With ``limit`` (UDP), a response that does not fit has TC set, so the client
    retries over TCP (RFC 1035 4.2.1, RFC 7766): with ``partial`` it keeps the answers that fit
    (in order), without it none; either way no authority then. An authority section alone that
    does not fit is dropped without TC (an SOA is a hint for negative caching, never a reason
    to retry)."""
    answers = [r.encode() for r in resp.answers]
    authority = [r.encode() for r in resp.authority]
    tc = 0
    if limit is not None:
        size = HEADER.size + len(q.question)
        kept: list[bytes] = []
        for r in answers:
            if size + len(r) > limit:
                tc = FLAG_TC
                break
            kept.append(r)
            size += len(r)
        if tc:
            answers, authority = (kept if partial else []), []
        elif size + sum(len(r) for r in authority) > limit:
            authority = []
    flags = FLAG_QR | (q.flags & OPCODE_MASK) | (FLAG_AA if resp.authoritative else 0) | tc | (q.flags & FLAG_RD) \
        | (resp.rcode & 0xF)
    return HEADER.pack(q.ident, flags, 1, len(answers), len(authority), 0) + q.question + b"".join(answers) + \
        b"".join(authority)


def error_response(data: bytes, rcode: int, *, authoritative: bool = False) -> bytes | None:
    """A header-only response with ``rcode`` to a query whose question is not answered (it could
    not be parsed, or the caller refuses the header): its id, opcode and RD echoed. None when
    it is too short to have an id, or is itself a response (never answer those)."""
    head = parse_header(data)
    if head is None or head.is_response:
        return None
    flags = FLAG_QR | (head.flags & OPCODE_MASK) | (FLAG_AA if authoritative else 0) | (head.flags & FLAG_RD) \
        | (rcode & 0xF)
    return HEADER.pack(head.ident, flags, 0, 0, 0, 0)
