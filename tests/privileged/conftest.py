"""The privileged netlink tests' ``dp`` fixture: a KernelDataplane on a namespace whose veth
underlay holds 198.18.0.1/24 (the address every desired state of these tests names as its VTEP)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fabric.netlink.dataplane import KernelDataplane
from tests.privileged.kernelns import sh


@pytest.fixture
def dp(netns: str) -> Iterator[KernelDataplane]:
    sh(netns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
    sh(netns, "addr", "add", "198.18.0.1/24", "dev", "ul0")
    sh(netns, "link", "set", "ul0", "up")
    sh(netns, "link", "set", "ul1", "up")
    d = KernelDataplane(netns=netns)
    try:
        yield d
    finally:
        d.close()
