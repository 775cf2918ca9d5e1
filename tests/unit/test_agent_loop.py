"""The agent's control loop end to end without root: a real reflector, agents on the fake kernel.

What is pinned here is the contract that protects live traffic:
- nothing is deleted before the first complete snapshot (a reflector in its startup hold sends
  none), then stale entries go and the plan is programmed;
- failed kernel entries are retried until the node reports in sync;
- losing the reflector changes nothing in the kernel.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

import prometheus_client

from fabric import types
from fabric.agent import agent as agent_mod
from fabric.agent import config
from fabric.control import planner, reflector
from fabric.netlink import fake, objects
from tests.waiting import wait_until_async

CLUSTERS = (
    types.ClusterConfig("east", types.ClusterMode.P2P, ("10.10.0.0/16",)),
    types.ClusterConfig("west", types.ClusterMode.P2P, ("10.20.0.0/16",)),
)
NODES = {"east/e1": ("198.18.0.11", "10.10.1.0/24"), "west/w1": ("198.18.0.13", "10.20.1.0/24")}
STALE = objects.FdbEntry("vx-bridge", "02:00:00:00:00:99", "198.18.0.99")


class _NoEvents:
    def __init__(self, *_: object) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class NoProber:
    """No raw sockets in unit tests: probes are covered by test_gateway_failover.py (the agent's
    ``prober_factory`` for every unit test that builds an Agent)."""

    def __init__(self, on_change: Callable[[frozenset[str]], None], cfg: config.AgentConfig) -> None:
        self.targets: dict[str, tuple[str, str]] = {}

    def set_targets(self, targets: dict[str, tuple[str, str]]) -> None:
        self.targets = dict(targets)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def _agent(sock: str, key: str) -> tuple[agent_mod.Agent, fake.FakeDataplane]:
    ip, cidr = NODES[key]
    cluster, node = key.split("/")
    dp = fake.FakeDataplane()
    dp.add_plain_link("eth0", ip=ip)
    cfg = config.load(["--reflector", f"unix:{sock}", "--cluster", cluster, "--node", node, "--underlay-ip", ip,
                       "--pod-cidr", cidr, "--keepalive-interval", "0.2", "--resync-period", "0.5"], environ={})
    return agent_mod.Agent(cfg, dp, events_factory=_NoEvents, prober_factory=NoProber, handle_signals=False), dp


def _sample(name: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name) or 0.0


def _in_sync(refl: reflector.Reflector, keys: set[str]) -> bool:
    nodes = {n.key: n for n in refl.status().nodes()}
    return keys <= nodes.keys() and all(nodes[k].in_sync for k in keys)


def test_snapshot_gates_deletion_then_plan_is_programmed_and_survives_reflector_loss(tmp_path: Path) -> None:
    asyncio.run(_scenario(str(tmp_path / "r.sock")))


async def _scenario(sock: str) -> None:
    cfg = types.FabricConfig(clusters=CLUSTERS, expected_nodes=tuple(NODES))
    refl = reflector.Reflector(cfg, grace_period=5, keepalive_interval=0.2, startup_hold=30)
    await refl.start([f"unix:{sock}"])
    e1, dp1 = _agent(sock, "east/e1")
    w1, _ = _agent(sock, "west/w1")
    tasks: list[asyncio.Task[int]] = []
    try:
        # Left over from an earlier life of this agent: ours (on our device), and stale.
        underlay = dp1.underlay_link("198.18.0.11")
        dp1.add_link(objects.VxlanLink("vx-bridge", 54, 4876, "02:00:00:00:00:01", "198.18.0.11",
                                       underlay.ifindex, 1450))
        dp1.add_fdb([STALE])
        tasks.append(asyncio.create_task(e1.run()))
        await wait_until_async(lambda: "east/e1" in {n.key for n in refl.status().nodes()}, 10, "e1 announced")
        await asyncio.sleep(1.2)  # several resync periods: still no snapshot (w1 is expected)
        assert STALE in dp1.fdb, "an agent deleted state before its first complete snapshot"
        assert not e1.ready()[0]

        # Make the first route programming fail: the agent must retry until it is in sync.
        dp1.fail_next("add_route", errno.ENOBUFS)
        failures_before = _sample("fabric_agent_kernel_failures_total")
        tasks.append(asyncio.create_task(w1.run()))
        await wait_until_async(lambda: _in_sync(refl, set(NODES)), 10, "both agents in sync")
        assert STALE not in dp1.fdb
        assert _sample("fabric_agent_kernel_failures_total") > failures_before, "the injected fault never fired"
        assert e1.ready()[0] and e1.healthy()[0]

        w1_overlay = planner.overlay_address("198.18.0.13", types.DEFAULT_BRIDGE_CIDR_V4).split("/")[0]
        routes = {(r.dst, dp1.nexthops[r.nhid].gateway) for r in dp1.routes.values()}
        assert routes == {("10.20.1.0/24", w1_overlay)}
        assert {f.dst for f in dp1.fdb} == {"198.18.0.13"}
        assert {n.ip for n in dp1.neighbours.values()} == {w1_overlay}

        # A dump the kernel fails during a periodic resync is a failed pass, retried: no crash.
        failures_before = _sample("fabric_agent_kernel_failures_total")
        dp1.fail_next("list_links", errno.ENOBUFS, count=2)
        await wait_until_async(lambda: _sample("fabric_agent_kernel_failures_total") >= failures_before + 2, 10,
                               "two failed resyncs counted")  # fmt: skip
        await wait_until_async(lambda: e1.healthy()[0] and _in_sync(refl, set(NODES)), 10, "e1 recovered")
        assert not any(t.done() for t in tasks), "an agent stopped on a failed kernel dump"

        # Losing the reflector keeps the last good dataplane, through several resync passes.
        before = (set(dp1.fdb), dict(dp1.routes), dict(dp1.neighbours), set(dp1.links))
        await refl.stop()
        await asyncio.sleep(1.5)
        assert (set(dp1.fdb), dict(dp1.routes), dict(dp1.neighbours), set(dp1.links)) == before
    finally:
        e1.stop()
        w1.stop()
        codes = await asyncio.gather(*tasks)
        await refl.stop()
    assert codes == [0, 0]
