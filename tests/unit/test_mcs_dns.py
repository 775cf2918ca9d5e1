"""mcs.dns: clusterset names answered, checked with scapy's DNS codec (an independent one)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR

from mcs import dns
from mcs.derive import Endpoint, Export, Port, Slice, derive, view
from tests.fuzzing import budget

TABLE = {("shop", "web"): ("10.96.0.10",), ("shop", "db"): ("10.10.1.5", "10.20.1.6", "fd00::7")}


def ask(name: str, qtype: str = "A", *, qclass: str = "IN", ident: int = 4242, rd: int = 1) -> DNS:
    raw = dns.answer(bytes(DNS(id=ident, rd=rd, qd=DNSQR(qname=name, qtype=qtype, qclass=qclass))), TABLE)
    assert raw is not None
    return DNS(raw)


def rdata(resp: DNS) -> list[str]:
    return [str(resp.an[i].rdata) for i in range(resp.ancount)]


def test_a_clusterset_ip_service_resolves_to_its_ips() -> None:
    r = ask("web.shop.svc.clusterset.local")
    assert (r.id, r.qr, r.aa, r.rd, r.rcode, r.qdcount) == (4242, 1, 1, 1, dns.NOERROR, 1)
    assert rdata(r) == ["10.96.0.10"]
    assert r.an[0].ttl == dns.TTL_S and r.an[0].rrname == b"web.shop.svc.clusterset.local."


def test_a_headless_service_resolves_to_each_endpoint_of_the_family_asked() -> None:
    assert rdata(ask("db.shop.svc.clusterset.local.")) == ["10.10.1.5", "10.20.1.6"]
    assert rdata(ask("db.shop.svc.clusterset.local", "AAAA")) == ["fd00::7"]


def test_names_are_case_insensitive_and_the_question_is_echoed_as_asked() -> None:
    r = ask("WeB.Shop.SVC.clusterset.LOCAL")
    assert rdata(r) == ["10.96.0.10"] and r.qd[0].qname == b"WeB.Shop.SVC.clusterset.LOCAL."


@pytest.mark.parametrize(("name", "qtype", "rcode", "answers"), [
    ("web.shop.svc.clusterset.local", "AAAA", dns.NOERROR, 0),   # the name exists, no IPv6: NODATA
    ("web.shop.svc.clusterset.local", "TXT", dns.NOERROR, 0),
    ("shop.svc.clusterset.local", "A", dns.NOERROR, 0),          # a namespace with imports
    ("svc.clusterset.local", "A", dns.NOERROR, 0),
    ("other.svc.clusterset.local", "A", dns.NXDOMAIN, 0),       # no such namespace
    ("api.shop.svc.clusterset.local", "A", dns.NXDOMAIN, 0),    # not imported
    ("db-0.east.db.shop.svc.clusterset.local", "A", dns.NXDOMAIN, 0),
    ("web.shop.svc.cluster.local", "A", dns.REFUSED, 0),        # not our zone
    ("example.com", "A", dns.REFUSED, 0),
])
def test_what_is_not_an_answer_is_said_as_an_authoritative_server_says_it(
        name: str, qtype: str, rcode: int, answers: int) -> None:
    r = ask(name, qtype)
    assert (r.rcode, r.ancount, r.qdcount) == (rcode, answers, 1)


def test_bad_queries_get_errors_not_exceptions() -> None:
    assert ask("web.shop.svc.clusterset.local", qclass="CH").rcode == dns.NOTIMP
    two = DNS(rd=1, qd=[DNSQR(qname="a.b.svc.clusterset.local"), DNSQR(qname="c.d.svc.clusterset.local")])
    assert DNS(bytes(two)).qdcount == 2
    assert DNS(dns.answer(bytes(two), TABLE)).rcode == dns.FORMERR
    truncated = bytes(DNS(rd=1, qd=DNSQR(qname="web.shop.svc.clusterset.local")))[:-3]
    assert DNS(dns.answer(truncated, TABLE)).rcode == dns.FORMERR
    assert dns.answer(b"\x00" * 5, TABLE) is None
    response = bytes(DNS(qr=1, qd=DNSQR(qname="web.shop.svc.clusterset.local")))
    assert dns.answer(response, TABLE) is None, "a response is never answered"
    assert DNS(dns.answer(bytes(DNS(opcode=2, qd=DNSQR(qname="x"))), TABLE)).rcode == dns.NOTIMP



def test_a_compressed_question_is_formerr_and_errors_keep_the_id_and_aa() -> None:
    """The question of a plain query has no earlier name to point to: a pointer there is refused
    (FORMERR), not followed into the header."""
    good = bytes(DNS(id=77, rd=1, qd=DNSQR(qname="web.shop.svc.clusterset.local")))
    pointer = good[:12] + b"\x03web\xc0\x00" + good[-4:]
    r = DNS(dns.answer(pointer, TABLE))
    assert (r.id, r.qr, r.aa, r.rd, r.rcode, r.qdcount, r.ancount) == (77, 1, 1, 1, dns.FORMERR, 0, 0)


_query = st.builds(lambda name, qt, ident: bytes(DNS(id=ident, rd=1, qd=DNSQR(qname=name, qtype=qt))),
                   st.sampled_from(["web.shop.svc.clusterset.local", "db.shop.svc.clusterset.local", "x.y"]),
                   st.sampled_from([1, 28, 16, 255]), st.integers(0, 65535))


@pytest.mark.fuzz
@budget()
@given(st.one_of(st.binary(max_size=300), st.tuples(_query, st.integers(0, 80), st.binary(min_size=1, max_size=4)).map(
    lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])))
def test_any_datagram_gets_a_well_formed_answer_or_none(data: bytes) -> None:
    out = dns.answer(data, TABLE)
    if out is None:
        return
    r = DNS(out)
    assert r.qr == 1 and r.id == int.from_bytes(data[:2], "big")
    assert r.rcode in (dns.NOERROR, dns.FORMERR, dns.NXDOMAIN, dns.NOTIMP, dns.REFUSED)


def test_the_table_holds_import_ips_and_ready_headless_endpoints_only() -> None:
    def export(cluster: str, headless: bool, *eps: Endpoint) -> Export:
        return Export(cluster, "shop", "db" if headless else "web", "2026-12-01T00:00:00Z", "ClusterIP",
                      headless=headless, ports=(Port("p", "TCP", 5432),), slices=(Slice("IPv4", (), eps),))
    d = derive([export("east", True, Endpoint(("10.10.1.5",)), Endpoint(("10.10.1.9",), ready=False)),
                export("west", True, Endpoint(("10.20.1.6",))), export("east", False, Endpoint(("10.10.2.2",)))])
    imports = view(d, "south", {"IPv4"}, unreachable={"west"})
    assert dns.table(imports, {("shop", "web"): ("10.96.0.10",)}) == {
        ("shop", "db"): ("10.10.1.5",), ("shop", "web"): ("10.96.0.10",)}
    assert dns.table(imports, {})[("shop", "web")] == (), "no cluster IP allocated yet: no address"
