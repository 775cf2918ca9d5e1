"""Dual stack in the lab plan and ``check`` (issue 5), without root: per-family sources and
destinations, not-expected pairs, the per-family matrix, the IPv6 lab service ruleset."""

from __future__ import annotations

from pathlib import Path

from fabric import topology
from tools import lab
from tools.diagnose import check

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dualstack.yaml"


def _state() -> lab.LabState:
    return lab.plan("kftunit", topology.load(EXAMPLE))


def test_lab_plan_gives_pods_and_services_an_address_per_family() -> None:
    st = _state()
    pods = {f"{n.key}/{p.name}": p for n in st.nodes() for p in n.pods}
    assert (pods["dsp2p/a1/p0"].ip, pods["dsp2p/a1/p0"].ip6) == ("10.30.0.2", "fd00:10:30::2")
    assert (pods["v6only/c1/p0"].ip, pods["v6only/c1/p0"].ip6) == ("", "fd00:10:50::2")
    assert (pods["v4only/d1/p0"].ip, pods["v4only/d1/p0"].ip6) == ("10.60.0.2", "")
    c = {c.name: c for c in st.clusters}
    assert (c["dsgw"].service_ip6, c["dsgw"].service_backend6) == ("fd00:10:99::a", "fd00:10:40::2")
    assert (c["v6only"].service_ip, c["v6only"].service_ip6) == (None, "fd00:10:97::a")
    assert (st.underlay6, st.gateway6) == ("fd00:198:18::/64", "fd00:198:18::1")
    rules = lab.service_ruleset("fd00:10:99::a", "fd00:10:40::2")
    assert "table ip6 kflab6" in rules and "ip6 daddr fd00:10:99::a dnat to fd00:10:40::2" in rules
    assert "ct original ip6 daddr fd00:10:99::a masquerade" in rules
    # IPv4 services keep their ruleset unchanged.
    assert lab.service_ruleset("10.96.0.10", "10.10.0.2").startswith("table ip kflab {")


def test_jobs_pair_only_sources_and_destinations_of_one_family() -> None:
    st = _state()
    pods = check.pods_of(st)
    assert len([p for p in pods if p.family == 4]) == 7 and len([p for p in pods if p.family == 6]) == 7
    for src, dsts in check.jobs(pods, check.services_of(st), check.hosts_of(st)):
        assert all(d.family == src.family and (":" in d.ip) == (src.family == 6) for d in dsts)
    hosts = check.hosts_of(st)
    assert {h.label for h in hosts if h.family == 4} >= {"v4only/d1"}
    assert "v6only/c1" not in {h.label for h in hosts if h.family == 4}  # management IPv4 is not a source
    assert check.pods_of(st, (6,)) == [p for p in pods if p.family == 6]


def test_not_expected_lists_every_pair_missing_a_family_once() -> None:
    st = _state()
    ne = check.not_expected(st)
    keys = {(n.src, n.dst, n.family) for n in ne}
    assert len(keys) == len(ne)
    assert ("v4only/d1/p0", "v6only/c1/p0", 4) in keys and ("v4only/d1/p0", "v6only/c1/p0", 6) in keys
    assert ("dsp2p/a1/p0", "v6only/c1/p0", 4) in keys and ("dsp2p/a1/p0", "v6only/c1/p0", 6) not in keys
    assert not any(n.src.startswith("v4only") and n.dst.startswith("v4only") for n in ne)
    # 7 pods per family, 2 of the 9 lack it: 2 x 7 ordered pairs x 2 directions per family.
    assert len(ne) == 2 * (2 * 7 * 2)


def test_matrix_shows_both_families_and_the_not_expected_pairs() -> None:
    st = _state()
    pods = check.pods_of(st)
    pairs = [check.PairResult(s.label, d.label, d.ip, "icmp6" if s.family == 6 else "icmp", True, 0.1, None, s.family)
             for s, dsts in check.jobs(pods) for d in dsts]  # fmt: skip
    result = check.CheckResult(pods, pairs, 1.0, not_expected=check.not_expected(st))
    text = check.render_matrix(result, marks=("+", "X", "."))
    assert text.startswith("IPv4\n") and "\nIPv6\n" in text
    assert "IPv4: 42/42 pairs passed (icmp), 28 not expected" in text
    assert "IPv4 v4only -> v6only: 4 pairs, v4only and v6only share no address family" in text
    assert result.ok and "84/84 pairs passed (icmp, icmp6), all pairs passed, 56 not expected" in text
    assert result.to_json()["not_expected"][0]["reason"]
