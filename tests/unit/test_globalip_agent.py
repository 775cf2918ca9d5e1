"""Global IP on the node, without a kernel: render (hairpin device + device routes), the netlink
owners (ifb link, device nexthops) on the fake dataplane, and the agent's TranslatorSync against
a recording stand-in of the BPF loader (the real loader is covered by tests/privileged/test_bpf_*
and end to end by tests/lab/test_globalip_e2e.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fabric import types
from fabric.agent import render, translator
from fabric.bpf import translate
from fabric.netlink import fake, objects, reconciler
from fabric.netlink.report import TableStats

STATE = types.NodeState(
    devices=(types.VxlanDevice("vx-bridge", 54, 4876, "02:aa:00:00:00:01", "100.82.0.11/10", "198.18.0.11", 1450),),
    peers=(types.Peer("vx-bridge", "100.82.0.21", "02:bb:00:00:00:01", "198.18.0.21"),),
    routes=(
        types.RouteEntry("172.20.0.0/16", "0.0.0.0", types.HAIRPIN_DEVICE),
        types.RouteEntry("172.22.0.0/16", "100.82.0.21", "vx-bridge"),
    ),
    translations=(types.Translation("10.10.0.0/16", "172.20.0.0/16"),),
    programs=(types.Program(types.HAIRPIN_DEVICE, "hairpin"), types.Program("vx-bridge", "tunnel")),
)
LINKS = frozenset({types.VX_BRIDGE, types.VX_LOCAL, types.HAIRPIN_DEVICE})


def _render(state: types.NodeState = STATE, ifindex: int = 10) -> objects.KernelState:
    return render.render(state, underlay_ifindex=ifindex, table=200, rule_priority=200)


def test_render_hairpin_device_and_device_routes() -> None:
    ks = _render()
    assert objects.DeviceLink(types.HAIRPIN_DEVICE) in ks.links
    assert objects.Route(200, "172.20.0.0/16", types.HAIRPIN_DEVICE, "0.0.0.0") in ks.routes
    # Without the hairpin program the device is not planned, and neither is its route.
    bare = render.render(types.NodeState(devices=STATE.devices, routes=STATE.routes[:1]), underlay_ifindex=10,
                         table=200, rule_priority=200)
    assert not any(r.link == types.HAIRPIN_DEVICE for r in bare.routes)
    plan = render.translator_plan(STATE)
    assert plan.mappings == (("10.10.0.0/16", "172.20.0.0/16"),)
    assert plan.attachments == {("vx-bridge", "tunnel"), (types.HAIRPIN_DEVICE, "hairpin")}
    assert not render.translator_plan(types.NodeState(devices=STATE.devices))


def _dp() -> tuple[fake.FakeDataplane, objects.KernelState]:
    dp = fake.FakeDataplane()
    return dp, _render(ifindex=dp.add_plain_link("eth0", ip="198.18.0.11"))


def test_reconciler_creates_and_repairs_the_hairpin_device_and_its_device_route() -> None:
    dp, ks = _dp()
    rec = reconciler.Reconciler(dp, table=200, rule_priority=200, link_names=LINKS)
    rec.set_desired(ks)
    report = rec.apply()
    assert report.failures == 0, report.first_error
    assert dp.links[types.HAIRPIN_DEVICE].kind == "ifb" and dp.links[types.HAIRPIN_DEVICE].up
    nh = {n.gateway: n for n in dp.nexthops.values()}["0.0.0.0"]
    assert nh.link == types.HAIRPIN_DEVICE
    assert dp.routes[(200, "172.20.0.0/16")].nhid == nh.id
    # Drift: the device deleted by hand comes back with its route on the next resync pass.
    dp.del_link(types.HAIRPIN_DEVICE)
    rec.resync()
    assert rec.apply().failures == 0
    assert types.HAIRPIN_DEVICE in dp.links and (200, "172.20.0.0/16") in dp.routes
    # A restart with the same plan changes nothing.
    rec2 = reconciler.Reconciler(dp, table=200, rule_priority=200, link_names=LINKS)
    rec2.set_desired(ks)
    assert rec2.apply().changes == 0


def test_a_foreign_link_with_the_hairpin_name_is_refused_not_touched() -> None:
    dp, ks = _dp()
    dp.add_plain_link(types.HAIRPIN_DEVICE, kind="veth")
    rec = reconciler.Reconciler(dp, table=200, rule_priority=200, link_names=LINKS)
    rec.set_desired(ks)
    report = rec.apply()
    assert report.tables["links"].failures == 1 and "not ifb" in (report.first_error or "")
    assert dp.links[types.HAIRPIN_DEVICE].kind == "veth"


class _FakeTranslator:
    """Records calls; holds mappings and attachments like the kernel would."""

    instances: list[_FakeTranslator] = []
    fail_attach: set[str] = set()

    def __init__(self, instance: str, *, pin_root: Path, netns: str | None = None) -> None:
        self.pin_dir = translate.pin_dir_for(instance, pin_root)
        self.calls: list[str] = []
        self.maps: set[translate.Mapping] = set()
        self.attached: set[tuple[str, translate.AttachPoint]] = set()
        _FakeTranslator.instances.append(self)

    def load(self) -> None:
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        self.calls.append("load")

    def set_mappings(self, mappings: Any, *, source: str = "") -> translate.MappingDelta:
        new = set(mappings)
        d = translate.MappingDelta(added=sorted(new - self.maps, key=str), removed=sorted(self.maps - new, key=str))
        self.maps = new
        self.calls.append(f"set_mappings {len(new)}")
        return d

    def attachments(self, ifnames: Any) -> list[dict[str, str]]:
        return [{"device": d, "direction": p.direction, "program": p.function} for d, p in sorted(self.attached,
                key=lambda a: (a[0], a[1].function))]

    def attach(self, dev: str, point: translate.AttachPoint) -> None:
        if dev in self.fail_attach:
            raise translate.TranslatorError(f"device {dev!r} not found")
        self.attached.add((dev, point))
        self.calls.append(f"attach {dev} {point.name}")

    def detach(self, dev: str, point: translate.AttachPoint) -> None:
        self.attached.discard((dev, point))
        self.calls.append(f"detach {dev} {point.name}")


@pytest.fixture
def fake_translator(monkeypatch: pytest.MonkeyPatch) -> type[_FakeTranslator]:
    _FakeTranslator.instances.clear()
    _FakeTranslator.fail_attach = set()
    monkeypatch.setattr(translate, "Translator", _FakeTranslator)
    return _FakeTranslator


def test_translator_sync_is_lazy_incremental_and_reports_failures(tmp_path: Path,
                                                                  fake_translator: type[_FakeTranslator]) -> None:
    sync = translator.TranslatorSync("east-e1", tmp_path)
    stats = TableStats()
    sync.apply(render.TranslatorPlan(), stats)
    assert not fake_translator.instances and not sync.loaded  # nothing planned: nothing compiled
    plan = render.translator_plan(STATE)
    sync.apply(plan, stats)
    (t,) = fake_translator.instances
    assert t.calls[:2] == ["load", "set_mappings 1"]
    assert {(d, p.name) for d, p in t.attached} == {
        ("vx-bridge", "TUNNEL_INGRESS"), ("vx-bridge", "TUNNEL_EGRESS"), (types.HAIRPIN_DEVICE, "HAIRPIN")}
    assert stats.adds == 1 + 3 and stats.failures == 0
    adds = stats.adds
    sync.apply(plan, stats)
    assert stats.adds == adds and stats.deletes == 0  # same plan, maps and programs in place: nothing written
    t.maps.clear()  # drift: the mapping removed from the maps behind our back
    sync.apply(plan, stats)
    assert len(t.maps) == 1 and stats.adds == adds + 1  # the next pass puts it back
    t.attached.clear()  # the device was recreated: its filters are gone
    sync.apply(plan, stats)
    assert len(t.attached) == 3
    # A restarted agent (new sync) with the same plan: loads (reusing pins), re-attaches (an
    # atomic replace in the kernel), writes no mapping.
    fake_translator.fail_attach = {"vx-bridge"}
    sync2 = translator.TranslatorSync("east-e1", tmp_path)
    stats2 = TableStats()
    sync2.apply(plan, stats2)
    assert stats2.failures == 2 and "vx-bridge" in (stats2.first_error or "")
    # Translation removed from the plan: mappings emptied, programs detached.
    fake_translator.fail_attach = set()
    t2 = fake_translator.instances[-1]
    t2.attached = set(t.attached)
    sync2.apply(render.TranslatorPlan(), TableStats())
    assert t2.maps == set() and t2.attached == set()


def test_pins_of_an_earlier_run_are_cleared_when_nothing_is_planned(tmp_path: Path,
                                                                    fake_translator: type[_FakeTranslator]) -> None:
    (tmp_path / "east-e1").mkdir()
    translator.TranslatorSync("east-e1", tmp_path).apply(render.TranslatorPlan(), TableStats())
    (t,) = fake_translator.instances
    assert t.calls == ["load", "set_mappings 0"]
