"""KernelDataplane's error contract: kernel failures become DataplaneError with their own errno,
bugs propagate as what they are (DESIGN.md: a bug crashes the process into a clean resync).

No kernel here: the pyroute2 handle and the raw netlink socket are stubs that raise what a
test tells them to."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from fabric.netlink import dataplane as dp_mod
from fabric.netlink import rawnl
from fabric.netlink.addresses import AddressOwner
from fabric.netlink.dataplane import DataplaneError, KernelDataplane
from fabric.netlink.objects import Address, DeviceLink, Rule
from fabric.netlink.report import TableStats

LINK = "vx-bridge"


class _Raising:
    """Stands in for pyroute2's IPRoute: every call raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __getattr__(self, name: str) -> Any:
        def call(*_args: object, **_kwargs: object) -> Any:
            raise self.exc

        return call

    def close(self) -> None:
        pass


class _NoSocket:
    def close(self) -> None:
        pass


def _dataplane(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> KernelDataplane:
    monkeypatch.setattr(dp_mod.rawnl, "NetlinkSocket", lambda **_kw: _NoSocket())
    monkeypatch.setattr(dp_mod.namespaces, "iproute", lambda _netns: _Raising(exc))
    dp = KernelDataplane()
    dp._index[LINK] = 7  # known link: no dump needed to find its index
    dp._names[7] = LINK
    return dp


def _calls(dp: KernelDataplane) -> dict[str, Any]:
    """One single-entry call (or dump) of every kind that goes through pyroute2."""
    addr = Address(LINK, "10.0.0.1/24")
    return {
        "add_link": lambda: dp.add_link(DeviceLink(name="vx-hairpin", kind="ifb")),
        "update_link": lambda: dp.update_link(DeviceLink(name=LINK, kind="ifb")),
        "del_link": lambda: dp.del_link(LINK),
        "add_address": lambda: dp.add_address(addr),
        "del_address": lambda: dp.del_address(addr),
        "list_addresses": lambda: dp.list_addresses(LINK),
        "add_rule": lambda: dp.add_rule(Rule(family=2, table=500, priority=1000)),
        "list_rules": lambda: dp.list_rules(2),
    }


CALLS = ["add_link", "update_link", "del_link", "add_address", "del_address", "list_addresses", "add_rule",
         "list_rules"]
KERNEL_FAILURES = [
    pytest.param(NetlinkError(errno.EEXIST, "File exists"), errno.EEXIST, id="pyroute2-NetlinkError"),
    pytest.param(OSError(errno.EPERM, "Operation not permitted"), errno.EPERM, id="OSError"),
    pytest.param(rawnl.NetlinkFailure(errno.ENOBUFS, "No buffer space"), errno.ENOBUFS, id="rawnl-NetlinkFailure"),
]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(("exc", "code"), KERNEL_FAILURES)
def test_kernel_failure_becomes_dataplane_error_with_its_errno(
    monkeypatch: pytest.MonkeyPatch, call: str, exc: BaseException, code: int
) -> None:
    dp = _dataplane(monkeypatch, exc)
    with pytest.raises(DataplaneError) as info:
        _calls(dp)[call]()
    assert info.value.code == code, info.value
    assert info.value.__cause__ is exc


BUGS = [
    pytest.param(TypeError("unexpected keyword argument 'vxlan_lerning'"), id="TypeError"),
    pytest.param(KeyError("IFLA_IFNAME"), id="KeyError"),
    pytest.param(AttributeError("'NoneType' object has no attribute 'get_attr'"), id="AttributeError"),
]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("exc", BUGS)
def test_bug_propagates_unchanged(monkeypatch: pytest.MonkeyPatch, call: str, exc: BaseException) -> None:
    dp = _dataplane(monkeypatch, exc)
    with pytest.raises(type(exc)) as info:
        _calls(dp)[call]()
    assert info.value is exc
    assert not isinstance(info.value, DataplaneError)


def test_owner_counts_kernel_failure_and_lets_bug_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table owners catch DataplaneError only: a kernel failure is one failed entry of the
    pass, a bug leaves the pass (and the agent) at once."""
    want = frozenset({Address(LINK, "10.0.0.1/24")})

    dp = _dataplane(monkeypatch, NetlinkError(errno.EACCES, "Permission denied"))
    owner = AddressOwner(dp, frozenset({LINK}))
    owner.set_desired(want)
    stats = TableStats()
    owner.apply_adds(stats)
    assert (stats.failures, stats.errnos) == (1, {errno.EACCES: 1})

    dp = _dataplane(monkeypatch, TypeError("bad argument"))
    owner = AddressOwner(dp, frozenset({LINK}))
    owner.set_desired(want)
    stats = TableStats()
    with pytest.raises(TypeError, match="bad argument"):
        owner.apply_adds(stats)
    assert stats.failures == 0
