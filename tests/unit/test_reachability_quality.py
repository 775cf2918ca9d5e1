"""RTT and loss on the control channel: the agent's probe measurements (ProbeState.quality), the
agent's rate limit (fabric.agent.quality.QualityGate), the PeerReport codec of them, the
reflector's per pair aggregation (reachability_rules.pair_quality) and, end to end, a measured
RTT reaching the reachability record of its pair.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric import types
from fabric.agent import probes, quality
from fabric.control import codec, reachability_rules, reflector
from fabric.control.codec import DecodeError
from fabric.control.generated import fabric_pb2 as pb
from tests.unit.test_agent_loop import CLUSTERS, NODES, _agent, _in_sync
from tests.unit.test_reachability import ALL, MIXED
from tests.unit.test_reachability_reflector import A1, B1, C1, PAIRS, fabric, run
from tests.waiting import wait_until_async

NK = types.NodeKey


# --------------------------------------------------------------------------------------------
# The agent: measurements and their rate limit
# --------------------------------------------------------------------------------------------


def test_probe_state_quality_is_median_rtt_in_ms_and_window_loss() -> None:
    ps = probes.ProbeState(interval_s=0.1, multiplier=3)
    ps.set_targets({"c/c1": ("10.0.0.1", "vx-bridge")}, 0.0)
    assert ps.quality() == {"c/c1": (None, 0.0)}
    for seq, rtt in enumerate((0.001, 0.003, 0.002)):
        ps.on_sent("10.0.0.1", "vx-bridge", seq, 1.0 + seq)
        ps.on_reply("10.0.0.1", 1.0 + seq + rtt, seq)
    ps.on_sent("10.0.0.1", "vx-bridge", 9, 5.0)
    ps.expire(6.0)  # unanswered past the detection time: lost
    rtt, loss = ps.quality()["c/c1"]
    assert rtt == pytest.approx(2.0) and loss == pytest.approx(0.25)


def test_quality_gate_sends_moves_not_jitter() -> None:
    g = quality.QualityGate()
    now = 100.0
    first = {"c/c1": (1.0, 0.0)}
    assert g.due(first, now)  # a new peer
    g.mark(first, now)
    assert not g.due({"c/c1": (1.1, 0.01)}, now + 1)  # 10 %, one lost probe: noise
    assert g.due({"c/c1": (1.3, 0.0)}, now + 1)  # 30 %
    assert g.due({"c/c1": (1.0, 0.1)}, now + 1)  # loss moved
    assert g.due({"c/c1": (None, 1.0)}, now + 1)  # stopped answering
    assert g.due({**first, "b/b1": (2.0, 0.0)}, now + 1)  # a peer more
    assert not g.due(first, now + quality.EVERY_S * 2)  # nothing moved: nothing to say
    assert g.due({"c/c1": (1.1, 0.0)}, now + quality.EVERY_S)  # a small move waits its 30 s


# --------------------------------------------------------------------------------------------
# The wire
# --------------------------------------------------------------------------------------------

keys = st.builds(NK, st.sampled_from(["a", "b", "c"]), st.sampled_from(["n1", "n2"]))
measure = st.tuples(st.none() | st.floats(0, 1e5, allow_nan=False), st.floats(0, 1, allow_nan=False))


@given(st.frozensets(keys), st.dictionaries(keys, measure))
def test_peer_report_round_trip(down: frozenset[NK], q: dict[NK, codec.PeerQuality]) -> None:
    msg = pb.SyncNodeRequest.FromString(codec.peer_report_message(down, q).SerializeToString()).peer_report
    assert codec.peer_report_from_pb(msg) == down
    assert codec.peer_quality_from_pb(msg) == q
    # An old agent's report (no quality) decodes to none.
    assert codec.peer_quality_from_pb(codec.peer_report_message(down).peer_report) == {}


@pytest.mark.parametrize("peer, rtt, loss, what", [
    ("nocluster", 1.0, 0.0, "PeerReport.quality"), ("c/c1", -1.0, 0.0, "rtt_ms"), ("c/c1", math.nan, 0.0, "rtt_ms"),
    ("c/c1", math.inf, 0.0, "rtt_ms"), ("c/c1", 1.0, 1.5, "loss"), ("c/c1", 1.0, math.nan, "loss"),
])  # fmt: skip
def test_peer_quality_garbage_is_a_decode_error(peer: str, rtt: float, loss: float, what: str) -> None:
    msg = pb.PeerReport(quality=[pb.PeerQuality(peer=peer, rtt_ms=rtt, loss=loss)])
    with pytest.raises(DecodeError, match=what):
        codec.peer_quality_from_pb(msg)


# --------------------------------------------------------------------------------------------
# The reflector's aggregation
# --------------------------------------------------------------------------------------------


def test_pair_quality_is_the_median_of_connected_probers_over_answering_gateways() -> None:
    targets = reachability_rules.probe_targets(MIXED)
    a_probers = sorted(k for k in targets if k.cluster == "a")
    c1 = NK("c", "c1")
    measured = {p: {c1: (rtt, loss)} for p, rtt, loss in zip(a_probers, (1.0, 2.0, 30.0), (0.0, 0.1, 0.5),
                                                                strict=True)}  # fmt: skip
    q = reachability_rules.pair_quality(MIXED, ALL, {}, measured)
    assert q == {("a", "c"): (2.0, 0.1)}
    # A prober without a session or that reports the gateway unreachable does not count.
    q = reachability_rules.pair_quality(MIXED, ALL - {a_probers[2]}, {a_probers[0]: frozenset({c1})}, measured)
    assert q == {("a", "c"): (2.0, 0.1)}
    # Rounded to two significant digits: jitter below that re-puts nothing.
    q = reachability_rules.pair_quality(MIXED, ALL, {}, {a_probers[0]: {c1: (1.234, 0.012)}})
    assert q == {("a", "c"): (1.2, 0.01)}
    lost = reachability_rules.pair_quality(MIXED, ALL, {}, {a_probers[0]: {c1: (None, 1.0)}})
    assert lost == {("a", "c"): (None, 1.0)}


def test_measured_rtt_reaches_the_record_of_its_pair() -> None:
    async def body() -> None:
        async with fabric() as f:
            sessions = {ann.key: f.agent(ann) for ann in (A1, B1, C1)}
            await wait_until_async(lambda: f.reachable() == PAIRS, 5, "every pair reachable")
            sessions[A1.key].report_unreachable(frozenset(), {C1.key: (1.234, 0.0), B1.key: (5.0, 0.02)})
            ac = await wait_until_async(lambda: (s := f.states().get(("a", "c"))) and s.rtt_ms is not None and s,
                                        5, "a -> c measured")  # fmt: skip
            assert (ac.rtt_ms, ac.loss) == (1.2, 0.0)
            ab = f.states()[("a", "b")]
            assert (ab.rtt_ms, ab.loss) == (5.0, 0.02)
            assert f.states()[("c", "a")].rtt_ms is None  # nobody of c measured
            # Cut: an unreachable pair carries no quality; healed with a new measurement: back.
            sessions[A1.key].report_unreachable(frozenset({C1.key}))
            await wait_until_async(lambda: not f.states()[("a", "c")].reachable, 5, "a -> c cut")
            assert f.states()[("a", "c")].rtt_ms is None
            sessions[A1.key].report_unreachable(frozenset(), {C1.key: (3.0, 0.0)})
            await wait_until_async(lambda: f.states()[("a", "c")].rtt_ms == 3.0, 5, "a -> c measured again")

    run(body())


def test_reports_without_quality_leave_rtt_unset() -> None:
    async def body() -> None:
        async with fabric() as f:
            for ann in (A1, B1, C1):
                f.agent(ann)
            await wait_until_async(lambda: f.reachable() == PAIRS, 5, "every pair reachable")
            assert all(s.rtt_ms is None and s.loss is None for s in f.states().values())

    run(body())


class _QuietProber(probes.TunnelProber):
    """The agent's real prober bookkeeping, without sockets: the test feeds its probes."""

    def start(self) -> None:
        pass


def test_an_agent_reports_its_probes_quality_and_the_record_carries_it(tmp_path: Path) -> None:
    async def body() -> None:
        sock = str(tmp_path / "r.sock")
        refl = reflector.Reflector(types.FabricConfig(clusters=CLUSTERS), grace_period=5, keepalive_interval=0.2,
                                   startup_hold=0, records_startup_hold=0)  # fmt: skip
        await refl.start([f"unix:{sock}"])
        agents = []
        for key in ("east/e1", "west/w1"):
            a, _ = _agent(sock, key)
            a.prober = _QuietProber(a._on_probe_change)
            a.prober.on_sample = a._on_probe_sample
            agents.append(a)
        e1 = agents[0]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            await wait_until_async(lambda: _in_sync(refl, set(NODES)), 10, "both in sync")
            target = await wait_until_async(lambda: next(iter(e1.prober.stats()), None), 10, "e1 probes w1")
            assert target.name == "west/w1"
            t0 = time.monotonic()
            e1.prober.state.on_sent(target.ip, target.device, 1, t0)
            for name, rtt in e1.prober.state.on_reply(target.ip, t0 + 0.004, 1):
                e1._on_probe_sample(name, rtt)
            st = await wait_until_async(lambda: (s := refl.reachability.get(("east", "west"))) and s.rtt_ms and s,
                                        5, "east -> west measured")  # fmt: skip
            assert st.reachable and (st.rtt_ms, st.loss) == (4.0, 0.0)
            assert refl.reachability[("west", "east")].rtt_ms is None  # w1 measured nothing
        finally:
            for a in agents:
                a.stop()
            await asyncio.gather(*tasks)
            await refl.stop()

    run(body())
