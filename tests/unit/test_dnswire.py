"""fabric.dnswire, the one DNS codec: untrusted bytes never raise anything but Malformed, a valid
query round-trips, compression pointers are followed but never loop, truncation keeps a UDP
response within its limit; responses are checked with scapy's DNS codec (an independent one)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR

from fabric import dnswire as w
from tests.fuzzing import budget

pytestmark = pytest.mark.unit

# A label as resolvers send them (letters of both cases, digits, hyphen, underscore for SRV).
_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
                 max_size=63)
_labels = st.lists(_label, max_size=8).filter(lambda ls: sum(len(x) + 1 for x in ls) + 1 <= 255)


def _query(ident: int, flags: int, labels: list[str], qtype: int, qclass: int) -> bytes:
    name = b"".join(bytes([len(x)]) + x.encode() for x in labels) + b"\0"
    return w.HEADER.pack(ident, flags, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, qclass)


_queries = st.builds(_query, st.integers(0, 0xFFFF), st.integers(0, 0x7FFF), _labels, st.integers(0, 0xFFFF),
                     st.integers(0, 0xFFFF))


def _mutate(data: bytes, at: int, junk: bytes, how: int) -> bytes:
    """``data`` with ``junk`` written over, inserted at, or as a compression pointer placed at
    ``at`` (every byte of a query is one an attacker chooses), or cut at ``at``."""
    at = min(at, len(data))
    if how == 0:
        return data[:at] + junk + data[at + len(junk):]
    if how == 1:
        return data[:at] + junk + data[at:]
    if how == 2:
        return data[:at] + bytes([0xC0 | (junk[0] & 0x3F), junk[-1]]) + data[at + 2:]
    return data[:at]


_mutated = st.builds(_mutate, _queries, st.integers(0, 300), st.binary(min_size=1, max_size=6), st.integers(0, 3))


def _decode_everything(data: bytes) -> None:
    """Every entry point that reads untrusted bytes, on ``data``: only Malformed may escape."""
    w.parse_header(data)
    for pointers in (True, False):
        try:
            q = w.parse_query(data, pointers=pointers)
        except w.Malformed:
            continue
        assert q.question == data[w.HEADER.size:w.HEADER.size + len(q.question)]
        assert sum(len(x) + 1 for x in q.labels) + 1 <= 255
        # What a server then writes: the question echoed, a header of its own.
        out = w.encode_response(q, w.Response(rcode=w.REFUSED), w.UDP_MAX)
        assert out[:2] == data[:2] and out[w.HEADER.size:] == q.question
    for pos in range(0, min(len(data), 40)):
        with contextlib.suppress(w.Malformed):
            w.read_name(data, pos)
    for rcode in (w.FORMERR, w.NOTIMP):
        err = w.error_response(data, rcode)
        assert err is None or (len(err) == w.HEADER.size and err[:2] == data[:2] and err[3] & 0xF == rcode)


@pytest.mark.fuzz
@budget()
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_malformed(data: bytes) -> None:
    _decode_everything(data)


@pytest.mark.fuzz
@budget()
@given(_mutated)
def test_mutated_queries_never_raise_anything_but_malformed(data: bytes) -> None:
    _decode_everything(data)


@pytest.mark.fuzz
@budget()
@given(st.integers(0, 0xFFFF), st.integers(0, 0x7FFF), _labels, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_a_valid_query_round_trips(ident: int, flags: int, labels: list[str], qtype: int, qclass: int) -> None:
    data = _query(ident, flags, labels, qtype, qclass)
    for pointers in (True, False):
        q = w.parse_query(data, pointers=pointers)
        assert (q.ident, q.flags, q.qtype, q.qclass, q.qdcount) == (ident, flags, qtype, qclass, 1)
        assert q.labels == tuple(x.lower() for x in labels) and q.question == data[w.HEADER.size:]
        assert q.opcode == (flags >> 11) & 0xF and q.name == ".".join(x.lower() for x in labels)
    assert w.encode_name(".".join(labels)) == data[w.HEADER.size:-4], "encode_name writes what read_name reads"
    # The response echoes the question as asked and reads back through an independent codec.
    r = DNS(w.encode_response(w.parse_query(data), w.Response(rcode=w.NXDOMAIN)))
    assert (r.id, r.qr, r.opcode, r.rd, r.rcode, r.qdcount) == (ident, 1, (flags >> 11) & 0xF, (flags >> 8) & 1,
                                                                w.NXDOMAIN, 1)
    assert r.qd[0].qname == ".".join(labels).encode() + b"."


def test_scapys_queries_parse() -> None:
    q = w.parse_query(bytes(DNS(id=7, rd=1, qd=DNSQR(qname="Web.Shop.svc.cluster.local", qtype="SRV"))))
    assert (q.ident, q.labels, q.qtype, q.qclass) == (7, ("web", "shop", "svc", "cluster", "local"), w.SRV, 1)


def test_compression_pointers_are_followed_and_never_loop() -> None:
    head = w.HEADER.pack(1, 0, 1, 0, 0, 0)
    # The question's name: "a" then a pointer to "example.com" further on (legal elsewhere in a message).
    data = head + b"\x01a\xc0\x10" + b"\x07example\x03com\x00"
    labels, end = w.read_name(data, 12)
    assert labels == ("a", "example", "com") and end == 16, "the position after the pointer, not after its target"
    with pytest.raises(w.Malformed, match="compressed name in a question"):
        w.read_name(data, 12, pointers=False)
    for loop in (b"\xc0\x0c", b"\x01a\xc0\x0c", b"\xc0\x0e\xc0\x0c"):  # to itself, through a label, two pointers
        with pytest.raises(w.Malformed, match=r"loop|longer than 255"):
            w.read_name(head + loop, 12)
    with pytest.raises(w.Malformed, match="truncated compression pointer"):
        w.read_name(head + b"\xc0", 12)
    with pytest.raises(w.Malformed, match="label type"):
        w.read_name(head + b"\x41a", 12)


def test_error_responses_echo_the_id_and_are_never_sent_to_responses_or_scraps() -> None:
    query = bytes(DNS(id=99, rd=1, opcode=2, qd=DNSQR(qname="a.b")))
    r = DNS(w.error_response(query, w.NOTIMP, authoritative=True))
    assert (r.id, r.qr, r.opcode, r.rd, r.aa, r.rcode, r.qdcount) == (99, 1, 2, 1, 1, w.NOTIMP, 0)
    assert DNS(w.error_response(query, w.FORMERR)).aa == 0
    assert w.error_response(bytes(DNS(id=99, qr=1, qd=DNSQR(qname="a.b"))), w.FORMERR) is None
    assert w.error_response(query[:11], w.FORMERR) is None
    assert w.parse_header(query[:11]) is None
    with pytest.raises(w.Malformed, match="no question"):
        w.parse_query(w.HEADER.pack(1, 0, 0, 0, 0, 0))


def test_records_read_back_through_scapy() -> None:
    q = w.parse_query(bytes(DNS(id=3, qd=DNSQR(qname="x.cluster.local", qtype=255))))
    resp = w.Response(answers=[
        w.address_record("10.0.0.1", 5), w.address_record("fd00::1", 5, "y.cluster.local"),
        w.cname_record("e.example.com", 7), w.srv_record(1, 2, 443, "h.cluster.local", 5, "_p._tcp.cluster.local"),
    ], authority=[w.soa_record("cluster.local", 5, 42)])
    r = DNS(w.encode_response(q, resp))
    got = [(r.an[i].rrname, r.an[i].type, r.an[i].ttl) for i in range(r.ancount)]
    assert got == [(b"x.cluster.local.", w.A, 5), (b"y.cluster.local.", w.AAAA, 5), (b"x.cluster.local.", w.CNAME, 7),
                   (b"_p._tcp.cluster.local.", w.SRV, 5)]
    assert r.an[0].rdata == "10.0.0.1" and r.an[1].rdata == "fd00::1" and r.an[2].rdata == b"e.example.com."
    assert (r.an[3].priority, r.an[3].weight, r.an[3].port, r.an[3].target) == (1, 2, 443, b"h.cluster.local.")
    soa = r.ns[0]
    assert (soa.rrname, soa.mname, soa.rname, soa.serial, soa.minimum) == (
        b"cluster.local.", b"ns.dns.cluster.local.", b"hostmaster.cluster.local.", 42, 5)
    with pytest.raises(ValueError, match="1 to 63"):
        w.encode_name("a" * 64 + ".b")
    with pytest.raises(ValueError, match="longer than 255"):
        w.encode_name(".".join(["a" * 60] * 5))
    with pytest.raises(ValueError, match="not ASCII"):
        w.encode_name("ä.b")


@pytest.mark.fuzz
@budget()
@given(st.integers(0, 90), st.booleans(), st.booleans())
def test_truncation_keeps_a_udp_response_within_its_limit(n: int, partial: bool, negative: bool) -> None:
    q = w.parse_query(bytes(DNS(id=5, rd=1, qd=DNSQR(qname="big.shop.svc.cluster.local"))))
    resp = w.Response(answers=[w.address_record(f"10.1.{i // 250}.{i % 250 + 1}", 5) for i in range(n)],
                      authority=[w.soa_record("cluster.local", 5, 1)] if negative else [])
    whole = w.encode_response(q, resp)
    out = w.encode_response(q, resp, w.UDP_MAX, partial=partial)
    r = DNS(out)
    answers_fit = len(whole) - sum(len(x.encode()) for x in resp.authority) <= w.UDP_MAX
    assert len(out) <= w.UDP_MAX and r.tc == (0 if answers_fit else 1)
    if answers_fit:
        assert r.ancount == n and r.nscount == (len(resp.authority) if len(whole) <= w.UDP_MAX else 0)
    else:
        assert r.nscount == 0 and (0 < r.ancount < n if partial else r.ancount == 0)
        assert out[w.HEADER.size:].startswith(q.question)
    assert DNS(whole).ancount == n and DNS(whole).tc == 0
