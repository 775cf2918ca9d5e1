"""The agent's quality gate judges "moved" at the reachability records' rounding.

A median RTT is a float that differs in some digit at every look; compared raw, every agent sent
a quality report every 30 s. Checked: jitter the records cannot show never goes out, however
long it lasts; a move they can show goes out within 30 s (one of a fifth at once); and, against
the reflector's own derivation (``reachability_rules.pair_quality`` with the agent as the pair's
one prober), the gate stays quiet exactly when the pair's record would not change.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fabric import types
from fabric.agent import quality
from fabric.control import reachability_rules
from tests.unit.test_reachability import ALL, MIXED

NK = types.NodeKey
PEER = "c/c1"


def test_jitter_below_the_records_rounding_never_goes_out() -> None:
    g = quality.QualityGate()
    g.mark({PEER: (1.2034, 0.0)}, 0.0)
    jitter = [(1.2101, 0.0012), (1.1987, 0.0), (1.2049, 0.004), (1.16, 0.0049), (1.2499, 0.0)]
    for i, q in enumerate(jitter * 4, start=1):
        assert not g.due({PEER: q}, i * quality.EVERY_S), (i, q)


def test_a_move_the_records_show_waits_its_30_s_one_of_a_fifth_goes_at_once() -> None:
    g = quality.QualityGate()
    g.mark({PEER: (1.2, 0.0)}, 0.0)
    small = {PEER: (1.31, 0.0)}  # 1.3 in a record, under a fifth of 1.2
    assert not g.due(small, quality.EVERY_S - 0.1)
    assert g.due(small, quality.EVERY_S)
    assert g.due({PEER: (1.47, 0.0)}, 1.0)  # 1.5: a fifth and more
    assert g.due({PEER: (1.2, 0.01)}, quality.EVERY_S)  # one lost probe in a hundred shows as 0.01
    assert not g.due({PEER: (1.2, 0.01)}, quality.EVERY_S - 0.1)
    g.mark(small, quality.EVERY_S)
    assert not g.due({PEER: (1.26, 0.0)}, 10 * quality.EVERY_S)  # still 1.3: what was sent


def test_sub_millisecond_and_large_rtts_round_as_the_records_do() -> None:
    g = quality.QualityGate()
    g.mark({PEER: (0.431, 0.0), "b/b1": (123.4, 0.0)}, 0.0)
    assert not g.due({PEER: (0.4349, 0.0), "b/b1": (124.9, 0.0)}, 99.0)  # 0.43 and 120
    assert g.due({PEER: (0.4351, 0.0), "b/b1": (124.9, 0.0)}, 99.0)  # 0.44


measure = st.tuples(st.none() | st.floats(0.01, 1e4, allow_nan=False), st.floats(0, 1, allow_nan=False))


@given(measure, st.floats(-0.3, 0.3), st.floats(-0.05, 0.05))
def test_quiet_exactly_when_the_pair_record_would_not_change(sent: quality.Quality, drift: float,
                                                             dloss: float) -> None:  # fmt: skip
    """``now``: ``sent`` drifted by up to 30 % (RTT) and 0.05 (loss), so both sides of the
    records' rounding come up often."""
    rtt, loss = sent
    now: quality.Quality = (None if rtt is None else rtt * (1 + drift), min(1.0, max(0.0, loss + dloss)))
    targets = reachability_rules.probe_targets(MIXED)
    prober = min(k for k in targets if k.cluster == "a")
    c1 = NK("c", "c1")

    def record(q: quality.Quality) -> object:
        return reachability_rules.pair_quality(MIXED, ALL, {}, {prober: {c1: q}})

    g = quality.QualityGate()
    g.mark({PEER: sent}, 0.0)
    assert g.due({PEER: now}, quality.EVERY_S) == (record(now) != record(sent))
