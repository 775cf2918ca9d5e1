"""Observability building blocks without root: probe RTT/loss bookkeeping, the agent's gateway
role from its plan, metrics and health over HTTP, and the fan-out lag of a real reflector with
two in-process agents on the fake kernel (rejection classes: tests/unit/test_rejection_reasons.py)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from fabric import health, types
from fabric.agent import agent as agent_mod
from fabric.agent import probes
from fabric.control import reflector
from tests.unit.test_agent_loop import CLUSTERS, NODES, _agent, _in_sync
from tests.waiting import wait_until_async


def test_probe_rtt_and_loss_per_target() -> None:
    st = probes.ProbeState(interval_s=0.1, multiplier=3, startup_s=1.0)
    st.set_targets({"west/w1": ("100.82.0.13", "vx-bridge"), "west/w2": ("100.82.0.14", "vx-bridge")}, now=0.0)
    st.on_sent("100.82.0.13", "vx-bridge", 1, 0.0)
    st.on_sent("100.82.0.14", "vx-bridge", 1, 0.0)
    assert st.on_reply("100.82.0.13", 0.002, 1) == [("west/w1", pytest.approx(0.002))]
    assert st.on_reply("100.82.0.13", 0.003, 1) == []  # a duplicate answers nothing new
    assert st.expire(0.2) == []  # within the detection time (0.3 s)
    assert st.expire(0.31) == ["west/w2"]
    st.on_reply("100.82.0.13", 0.3)  # a late or unnumbered reply: liveness, not a sample
    stats = {s.name: s for s in st.stats(0.31)}
    assert stats["west/w1"].up and stats["west/w1"].loss_ratio == 0.0 and stats["west/w1"].answered == 1
    assert not stats["west/w2"].up and stats["west/w2"].loss_ratio == 1.0 and stats["west/w2"].lost == 1


def test_parse_echo_reply_seq() -> None:
    import struct

    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0]) + bytes([198, 19, 0, 21]) + bytes([198, 19, 0, 11])
    reply = struct.pack("!BBHHH", 0, 0, 0, 0x1234, 77)
    assert probes.parse_echo_reply_seq(ip + reply, 0x1234) == ("198.19.0.21", 77)
    assert probes.parse_echo_reply_seq(ip + reply, 0x4321) is None


def _dev(name: str) -> types.VxlanDevice:
    return types.VxlanDevice(name, 54, 4876, "02:00:00:00:00:01", "100.64.0.1/10", "198.18.0.1", 1450)


def test_gateway_role_from_the_plan() -> None:
    bridge, local = _dev(types.VX_BRIDGE), _dev(types.VX_LOCAL)
    via_bridge = types.RouteEntry("10.10.0.0/16", "100.64.0.2", types.VX_BRIDGE)
    via_local = types.RouteEntry("10.10.0.0/16", "198.19.0.2", types.VX_LOCAL)
    assert agent_mod.gateway_role(types.NodeState(devices=(bridge,))) == "endpoint"
    assert agent_mod.gateway_role(types.NodeState(devices=(local,), routes=(via_local,))) == "none"
    assert agent_mod.gateway_role(types.NodeState(devices=(bridge, local), routes=(via_bridge,))) == "active"
    assert agent_mod.gateway_role(types.NodeState(devices=(bridge, local), routes=(via_local,))) == "standby"
    m = health.AgentMetrics()
    m.set_role("standby")
    assert prometheus_client.REGISTRY.get_sample_value("fabric_agent_gateway_role", {"role": "standby"}) == 1
    assert prometheus_client.REGISTRY.get_sample_value("fabric_agent_gateway_role", {"role": "active"}) == 0
    with pytest.raises(ValueError, match="boss"):
        m.set_role("boss")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_http_endpoints_serve_registry_health_and_debug() -> None:
    reg = CollectorRegistry()
    prometheus_client.Counter("fabric_test_things_total", "test", registry=reg).inc(3)
    ready = {"ok": False}
    server = health.serve(
        "127.0.0.1:0", lambda: (True, "ok"), lambda: (ready["ok"], "not yet"), registry=reg,
        debug={"state": lambda: {"node": "east/e1"}},
    )
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        code, body = _get(base + "/metrics")
        assert code == 200 and "fabric_test_things_total 3.0" in body and "fabric_agent_" not in body
        assert _get(base + "/healthz") == (200, "ok\n")
        assert _get(base + "/readyz") == (503, "not yet\n")
        ready["ok"] = True
        assert _get(base + "/readyz")[0] == 200
        code, body = _get(base + "/debug/state")
        assert code == 200 and json.loads(body) == {"node": "east/e1"}
        code, body = _get(base + "/debug/nope")
        assert code == 404 and "/debug/state" in body
    finally:
        server.shutdown()


def test_reflector_metrics_fanout_lag_and_agent_debug_state(tmp_path: Path) -> None:
    asyncio.run(_fanout(str(tmp_path / "r.sock")))


async def _fanout(sock: str) -> None:
    refl = reflector.Reflector(types.FabricConfig(clusters=CLUSTERS), grace_period=5, keepalive_interval=0.2,
                               startup_hold=0)  # fmt: skip
    await refl.start([f"unix:{sock}"])
    reg = CollectorRegistry()
    reg.register(refl.collector())
    e1, _ = _agent(sock, "east/e1")
    w1, _ = _agent(sock, "west/w1")
    tasks = [asyncio.create_task(e1.run())]
    try:
        await wait_until_async(lambda: _in_sync(refl, {"east/e1"}), 10, "e1 in sync")
        tasks.append(asyncio.create_task(w1.run()))  # e1 gets a delta: a fan-out to time
        await wait_until_async(lambda: _in_sync(refl, set(NODES)), 10, "both in sync")
        await wait_until_async(
            lambda: (reg.get_sample_value("fabric_reflector_fanout_lag_seconds_count") or 0) >= 1,
            10,
            "a fan-out observed",
        )
        assert reg.get_sample_value("fabric_reflector_fanouts_pending") == 0
        assert reg.get_sample_value("fabric_reflector_sessions") == 2
        assert reg.get_sample_value("fabric_reflector_nodes_in_sync") == 2
        gen = reg.get_sample_value("fabric_reflector_planned_version", {"node": "east/e1"})
        assert gen == reg.get_sample_value("fabric_reflector_applied_version", {"node": "east/e1"}) and gen
        ok, why = await asyncio.to_thread(refl.healthy)
        assert ok, why
        assert refl.ready() == (True, "ok")
        doc = await asyncio.to_thread(e1.debug_state)
        assert doc["node"] == "east/e1" and doc["gateway_role"] == "endpoint"
        assert doc["desired"] == doc["kernel"], "the fake kernel holds exactly the plan"
        assert {r["dst"] for r in doc["kernel"]["routes"]} == {"10.20.1.0/24"}
    finally:
        e1.stop()
        w1.stop()
        await asyncio.gather(*tasks)
        await refl.stop()
