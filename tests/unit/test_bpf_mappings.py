"""Mapping validation of the translator loader (pure Python, no BPF)."""

from __future__ import annotations

import pytest

from fabric.bpf.translate import Mapping, MappingError, TranslatorError, parse_mappings, pin_dir_for

BAD = [
    ({"10.0.0.0/16": "100.64.0.0/24"}, "different prefix lengths"),
    ({"10.0.0.0/16": "fd00::/16"}, "mixes IPv4 and IPv6"),
    ({"10.0.0.1/16": "100.64.0.0/16"}, "'10.0.0.1/16' is not a network address"),
    ({"10.0.0.0/16": "banana"}, "global CIDR 'banana'"),
    ({"10.0.0.0/16": "100.64.0.0/16", "10.0.5.0/24": "100.65.0.0/24"}, "local CIDRs of"),
    ({"10.0.0.0/16": "100.64.0.0/16", "10.1.0.0/16": "100.64.0.0/16"}, "global CIDRs of"),
    ({"10.0.0.0/16": "10.1.0.0/16", "10.1.0.0/16": "100.64.0.0/16"}, "overlaps local CIDR"),
]


@pytest.mark.parametrize(("table", "reason"), BAD, ids=[b[1] for b in BAD])
def test_bad_mappings_are_refused_naming_the_value(table: dict[str, str], reason: str) -> None:
    with pytest.raises(MappingError, match=reason) as e:
        parse_mappings(table, source="cluster c1 globalCIDRs")
    assert "cluster c1 globalCIDRs" in str(e.value)


def test_good_mappings_sorted_v4_first() -> None:
    ms = parse_mappings({"fd00:10::/64": "fd00:64::/64", "10.0.0.0/16": "100.64.0.0/16"})
    assert [str(m) for m in ms] == ["10.0.0.0/16=100.64.0.0/16", "fd00:10::/64=fd00:64::/64"]
    assert ms[0] == Mapping.parse("10.0.0.0/16", "100.64.0.0/16")


@pytest.mark.parametrize("name", ["", "a/b", "..", "x" * 65])
def test_instance_names_cannot_escape_the_pin_root(name: str) -> None:
    with pytest.raises(TranslatorError, match="instance name"):
        pin_dir_for(name)
